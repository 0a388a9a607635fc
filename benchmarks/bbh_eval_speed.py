"""BBH cost, side by side in one process: the shared-prefix cache in generation, length groups in the loss.

(1) ``generate`` with ``share_prefix=True`` (the prompts' common tokens run once, their KV cache reused by
    every batch) vs ``share_prefix=False``, on the first ``--prompts`` ICL and zero-shot prompts of a BBH
    task: seconds and how many answers agree;
(2) ``PopulationEvaluator`` with ``length_groups=True`` (examples of unlike lengths in separate trimmed
    forwards) vs one padded batch, on a task's 5 learning examples and 20 hub modules: seconds for
    ``--evals`` single-candidate evaluations, and the largest loss difference.

    python benchmarks/bbh_eval_speed.py                 # default SmolLM2 base and hub, 2 threads
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lorahub.api import resolve_store
from lorahub.bench import bbh
from lorahub.data import as_examples
from lorahub.evaluate import PopulationEvaluator
from lorahub.generate import generate
from lorahub.models import load_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--generate-task", default="date_understanding")
    ap.add_argument("--loss-tasks", default="causal_judgement,formal_fallacies")
    ap.add_argument("--evals", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_base(None)
    task = bbh.load_task(args.generate_task, None)
    for kind, prompts in (("icl", task.test_icl_prompts), ("zero-shot", task.test_prompts)):
        prompts = prompts[: args.prompts]
        t = time.perf_counter()
        shared = generate(model, tok, prompts, max_new_tokens=8, batch_size=16)
        t_shared = time.perf_counter() - t
        t = time.perf_counter()
        plain = generate(model, tok, prompts, max_new_tokens=8, batch_size=16, share_prefix=False)
        t_plain = time.perf_counter() - t
        print(json.dumps({"generate": f"{args.generate_task} {kind}", "prompts": len(prompts),
                          "shared_s": round(t_shared, 1), "plain_s": round(t_plain, 1),
                          "speedup": round(t_plain / t_shared, 2), "same_answers": sum(a == b for a, b in zip(shared, plain))}),
              flush=True)
    store = resolve_store(None)
    stacked = store.stack(store.names[:20], model, base_name=getattr(model, "lorahub_base_name", None))
    W = torch.randn(args.evals, 20, generator=torch.Generator().manual_seed(0)) * 0.3
    for name in args.loss_tasks.split(","):
        examples = as_examples(bbh.load_task(name, None).learning_examples())
        res = {}
        for grouped in (True, False):
            with PopulationEvaluator(model, tok, stacked, examples, length_groups=grouped) as ev:
                ev.score(W[:1])  # warm-up
                t = time.perf_counter()
                losses = torch.cat([ev.score(W[i : i + 1]) for i in range(args.evals)])
                res[grouped] = (time.perf_counter() - t, losses)
        print(json.dumps({"loss": name, "evals": args.evals, "grouped_s": round(res[True][0], 1),
                          "one_batch_s": round(res[False][0], 1), "speedup": round(res[False][0] / res[True][0], 2),
                          "max_loss_diff": float((res[True][1] - res[False][1]).abs().max())}), flush=True)


if __name__ == "__main__":
    main()
