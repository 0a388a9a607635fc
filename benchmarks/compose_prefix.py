"""End-to-end ``compose`` on a task with a long shared instruction: shared-prefix evaluator vs whole sequences.

Both runs compose the same examples from the same hub with the same seed, in this one process; "whole" sets
``lorahub.evaluate.MIN_SHARED_PREFIX = 0``, which is the evaluator as it was before the shared prefix. The
weights must come out the same (the losses agree to float rounding).

    python benchmarks/compose_prefix.py --tasks BIGBENCH --task natural_instructions__subtask029_winogrande_full_object
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import lorahub.evaluate
from lorahub import compose
from lorahub.bigbench import list_tasks, read_task, split_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", required=True, help="BIG-bench-layout task folder (index.json + tasks/)")
    ap.add_argument("--task", default="natural_instructions__subtask029_winogrande_full_object")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--hub", default=None, help="module hub (default: the default hub)")
    ap.add_argument("--budget", type=int, default=None, help="compose's budget (default: SearchConfig's)")
    ap.add_argument("--num-candidates", type=int, default=None, help="compose's candidates (default: SearchConfig's)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    index = list_tasks(args.tasks)
    held = split_examples(read_task(args.tasks, args.task, index[args.task]).examples, seed=0)[1]
    examples = [{"input": e.input, "output": e.output} for e in held[: args.shots]]
    runs = {}
    default = lorahub.evaluate.MIN_SHARED_PREFIX
    compose(examples[:2], args.hub, budget=4, population=2, num_candidates=2, progress=False)  # warm caches
    for name, threshold in (("whole", 0), ("shared", default)):
        lorahub.evaluate.MIN_SHARED_PREFIX = threshold
        t = time.perf_counter()
        search = {k: v for k, v in (("budget", args.budget), ("num_candidates", args.num_candidates)) if v}
        comp = compose(examples, args.hub, progress=False, **search)
        runs[name] = (time.perf_counter() - t, comp)
    lorahub.evaluate.MIN_SHARED_PREFIX = default
    (t_whole, whole), (t_shared, shared) = runs["whole"], runs["shared"]
    diff = max(abs(whole.weights[n] - shared.weights[n]) for n in whole.weights)
    print(f"task {args.task}: {args.shots} examples; CPU {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"  compose, whole sequences : {t_whole:7.1f} s  loss {whole.loss:.6f}  ({whole.record['evaluations']} evaluations)")
    print(f"  compose, shared prefix   : {t_shared:7.1f} s  loss {shared.loss:.6f}")
    print(f"  speed-up {t_whole / t_shared:.2f}x   largest weight difference {diff:.1e}")


if __name__ == "__main__":
    main()
