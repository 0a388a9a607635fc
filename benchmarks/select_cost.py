"""What choosing the candidates costs: each selector of ``lorahub.select`` on a hub and a BBH task's learning examples.

Loads the base and the hub once, then times every selector (the probe: N single-module evaluations in batched
passes; retrieve: the embedder's first load, then a query; random: nothing) and prints one JSON line each, with
the wall time and the process's CPU time (on a shared CPU the wall time overstates the cost; with one thread the
CPU time is close to what an idle machine would take).
Selectors that need what the hub lacks (retrieve without embeddings) print why they were skipped.

    python benchmarks/select_cost.py --task date_understanding --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lorahub.bench.bbh import load_task
from lorahub.data import as_examples
from lorahub.errors import LorahubError
from lorahub.loading import load_base_for, resolve_store
from lorahub.select import SELECTORS, SelectionTask, select_candidates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="date_understanding", help="BBH task whose 5 learning examples are used")
    ap.add_argument("--hub", default=None, help="module hub (default: the default hub)")
    ap.add_argument("--k", type=int, default=20, help="candidates to select")
    ap.add_argument("--selectors", default=",".join(SELECTORS))
    ap.add_argument("--repeats", type=int, default=2, help="runs per selector (the first includes one-time loads)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = resolve_store(args.hub)
    model, tok, base_name = load_base_for(None, store, args.device)
    examples = as_examples(load_task(args.task).learning_examples())
    task = SelectionTask(examples, model, tok, base_name)
    for name in args.selectors.split(","):
        for run in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                sel = select_candidates(name, store, args.k, 1, task)
            except LorahubError as e:
                print(json.dumps({"selector": name, "skipped": str(e)}))
                break
            print(json.dumps({"selector": name, "run": run + 1, "hub": store.name, "hub_modules": len(store),
                              "task": args.task, "examples": len(examples), "k": args.k,
                              "evaluations": sel.evaluations, "seconds": round(time.perf_counter() - t0, 3),
                              "cpu_seconds": round(time.process_time() - c0, 3),
                              "first": sel.names[:3], "threads": torch.get_num_threads(),
                              "device": str(next(model.parameters()).device), "cpu": platform.processor()}))


if __name__ == "__main__":
    main()
