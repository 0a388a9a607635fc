"""Modules per hour when training M=1 vs M=8 tasks per step (one adapter per task over a shared frozen base).

    python benchmarks/train_throughput.py                        # SmolLM2-135M, 3 timed steps each
    python benchmarks/train_throughput.py --steps 2 --batch-size 4 --module-steps 50

modules/hour = M * 3600 / (seconds per step * steps per module). Both runs use the same tasks,
batch size per task and sequence cap, in one process, after one untimed warm-up step each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lorahub.bigbench import list_tasks, read_task
from lorahub.models import load_base
from lorahub.train import TrainConfig, train_modules

TASKS = [
    "color__rgb", "entailed_polarity", "anachronisms", "intent_recognition",
    "arithmetic__2_digit_addition", "qa_wikidata", "winowhy", "fact_checker__fever",
]


def seconds_per_step(model, tok, tasks, config: TrainConfig) -> float:
    warm = TrainConfig(**{**config.to_dict(), "steps": 1})
    train_modules(model, tok, tasks, warm, progress=False)  # warm-up: allocator, kernels
    t0 = time.perf_counter()
    train_modules(model, tok, tasks, config, progress=False)
    return (time.perf_counter() - t0) / config.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=str(Path(__file__).resolve().parents[2] / "shared" / "bigbench"), help="BIG-bench-layout task folder")
    p.add_argument("--base-model", default=None, help="base model (default: smollm2-135m-instruct)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    p.add_argument("--batch-size", type=int, default=8, help="examples of each task per step")
    p.add_argument("--max-length", type=int, default=256, help="token cap per example")
    p.add_argument("--module-steps", type=int, default=50, help="steps one module needs (for modules/hour)")
    p.add_argument("--m", type=int, nargs=2, default=[1, 8], metavar=("M1", "M2"), help="modules per step to compare")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base(args.base_model)
    index = list_tasks(args.tasks)
    names = [t for t in TASKS if t in index] or list(index)
    examples = {n: read_task(args.tasks, n, index[n]).examples for n in names[: max(args.m)]}
    rows = []
    for m in args.m:
        tasks = dict(list(examples.items())[:m])
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, modules_per_step=m)
        sps = seconds_per_step(model, tok, tasks, cfg)
        rows.append((m, sps, m * 3600 / (sps * args.module_steps)))
    device = next(model.parameters()).device
    print(f"device={device} threads={torch.get_num_threads()} batch/task={args.batch_size} "
          f"max_length={args.max_length} steps/module={args.module_steps}")
    print(f"{'M':>3}  {'s/step':>8}  {'modules/hour':>12}")
    for m, sps, mph in rows:
        print(f"{m:>3}  {sps:>8.2f}  {mph:>12.2f}")
    print(f"ratio M={rows[1][0]} / M={rows[0][0]}: {rows[1][2] / rows[0][2]:.2f}x modules/hour")


if __name__ == "__main__":
    main()
