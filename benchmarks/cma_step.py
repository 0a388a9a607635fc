"""CMA-ES step size at LoraHub's budget: few-shot loss reached by CMA-ES with a wider first step, on BBH tasks'
learning examples, next to the losses that `lorahub-default` (CMA-ES, nevergrad's default step) and
`lorahub-reference` (Cobyla) reached on the same (task, seed) — same 20 candidates — in a `lorahub bbh` run.

    python benchmarks/cma_step.py --run benchmarks/bbh/results/full --tasks date_understanding,disambiguation_qa --seeds 2,4
"""

from __future__ import annotations

import argparse
import json
import time

import nevergrad as ng
import torch

from lorahub import optimize
from lorahub.api import compose, resolve_store
from lorahub.bench import bbh
from lorahub.bench.runner import read_results
from lorahub.models import load_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="benchmarks/bbh/results/full")
    ap.add_argument("--tasks", default="date_understanding,disambiguation_qa")
    ap.add_argument("--seeds", default="2,4")
    ap.add_argument("--scale", type=float, default=4.0, help="ParametrizedCMA scale (nevergrad's default: 1)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = f"cma-scale{args.scale:g}"
    optimize.OPTIMIZERS[name] = lambda param, budget, pop: ng.optimizers.ParametrizedCMA(popsize=pop, scale=args.scale)(
        param, budget=budget, num_workers=pop)
    from pathlib import Path

    done = {(r["task"], r["method"], r["seed"]): r for r in read_results(Path(args.run) / "results.jsonl", repair=False)}
    model, tok = load_base(None)
    store = resolve_store(None)
    for task in args.tasks.split(","):
        split = bbh.load_task(task, None)
        for seed in map(int, args.seeds.split(",")):
            t = time.perf_counter()
            comp = compose(split.learning_examples(), store, (model, tok), num_candidates=20, budget=40,
                           optimizer=name, l1=0.05, probe_singles=True, seed=seed, progress=False)
            ref, default = done.get((task, "lorahub-reference", seed)), done.get((task, "lorahub-default", seed))
            print(json.dumps({"task": task, "seed": seed, name: round(comp.loss, 4),
                              "lorahub-default": default and round(default["loss"], 4),
                              "lorahub-reference": ref and round(ref["loss"], 4),
                              "same_candidates": bool(ref) and set(ref["weights"]) == set(comp.weights),
                              "seconds": round(time.perf_counter() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
