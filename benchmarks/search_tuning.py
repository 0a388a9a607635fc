"""Search settings at LoraHub's budget: few-shot loss reached by CMA-ES variants on BBH tasks' learning examples,
next to the loss that `lorahub-reference` (Cobyla, one at a time) reached on the same (task, seed) — same 20
candidates — in a `lorahub bbh` run.

The single-module probes are scored once per (task, seed) and shared by every variant (they are the same points),
so each variant costs only its own ``--budget`` evaluations. A variant is ``name=start:step:popsize``:
``start`` zero | best-probe, ``step`` CMA-ES's first step in weight units, ``popsize`` its population
(:func:`lorahub.optimize.search`). ``v0.1`` is lorahub 0.1's default (zero start, nevergrad's own step 0.075 for
N ≥ 18 candidates, the probes told to CMA-ES).

    python benchmarks/search_tuning.py --tasks boolean_expressions,dyck_languages --seeds 1,2,3,4,5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lorahub.api import resolve_store
from lorahub.bench import bbh
from lorahub.bench.runner import read_results
from lorahub.data import as_examples
from lorahub.evaluate import PopulationEvaluator
from lorahub.models import load_base
from lorahub.optimize import search

DEFAULT_VARIANTS = ("v0.1=zero:0.075:12,bp-s0.15-p12=best-probe:0.15:12,bp-s0.3-p12=best-probe:0.3:12,"
                    "bp-s0.3-p6=best-probe:0.3:6,zero-s0.6-p6=zero:0.6:6")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="benchmarks/bbh/results/full")
    ap.add_argument("--tasks", default="boolean_expressions,dyck_languages,disambiguation_qa")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append one JSON line per (task, seed) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {}
    for item in args.variants.split(","):
        name, spec = item.split("=")
        start, step, pop = spec.split(":")
        variants[name] = dict(start=start, step=float(step), population=int(pop))
    done = {(r["task"], r["method"], r["seed"]): r for r in read_results(Path(args.run) / "results.jsonl", repair=False)}
    model, tok = load_base(None)
    store = resolve_store(None)
    for task in args.tasks.split(","):
        split = bbh.load_task(task, None)
        for seed in map(int, args.seeds.split(",")):
            t = time.perf_counter()
            names = store.select(20, seed)
            p = next(model.parameters())
            stacked = store.stack(names, model, base_name=getattr(model, "lorahub_base_name", None),
                                  device=p.device, dtype=p.dtype)
            cache: dict[bytes, float] = {}

            with PopulationEvaluator(model, tok, stacked, as_examples(split.learning_examples())) as ev:
                def score(w: np.ndarray) -> list[float]:
                    todo = [row for row in w if row.tobytes() not in cache]
                    if todo:
                        for row, loss in zip(todo, ev.score(np.stack(todo)).numpy()):
                            cache[row.tobytes()] = float(loss)
                    return [cache[row.tobytes()] for row in w]

                score(np.eye(len(names)))
                line = {"task": task, "seed": seed}
                for name, v in variants.items():
                    r = search(score, len(names), budget=args.budget, optimizer="cma", l1=0.05, seed=seed,
                               probes=np.eye(len(names)), **v)
                    line[name] = round(r.loss, 4)
                    line[name + ":objective"] = round(r.objective, 4)
            ref, default = done.get((task, "lorahub-reference", seed)), done.get((task, "lorahub-default", seed))
            line.update({"best-single": round(min(cache[r.tobytes()] for r in np.eye(len(names))), 4),
                         "run:lorahub-default": default and round(default["loss"], 4),
                         "run:lorahub-reference": ref and round(ref["loss"], 4),
                         "same_candidates": bool(ref) and set(ref["weights"]) == set(names),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(json.dumps(line), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
