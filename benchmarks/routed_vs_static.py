"""Routed vs static (LoraHub) composition on held-out splits of the hub's own tasks.

    python benchmarks/routed_vs_static.py --out runs/routed_vs_static [--tasks a,b] [--num-candidates 20]
        [--seeds 1,2] [--steps 40] [--limit 45] [--threads 2]

For each task of the hub (default: 6 tasks of ``smollm2-135m-bigbench``): its held-out examples, reproduced
from the hub build's split (``read_task`` + ``split_examples`` with the manifest's ``train_config`` seed and
``--heldout 50``; the task's own module never saw them, and the count is checked against the manifest); the
first ``--shots`` (5) are the few-shot examples, the next ``--limit`` the test set. Candidates: ``--num-candidates``
random hub modules, the task's own module EXCLUDED, drawn with the seed (``ModuleStore.select``), the same for
both methods. Then, on the same examples and candidates:

- static: ``compose()`` with lorahub's defaults (CMA-ES, singles probed, ``--budget`` 40);
- routed: ``compose(method="routed")`` (top-``--top-k`` routers, ``--steps`` AdamW steps, ``--lr``);

and greedy exact match (%) on the test set of the base model, static and routed, with the same max_new_tokens
(the hub build's: longest held-out answer + 3). Writes ``OUT/routed_vs_static.json`` (every row, predictions
included; rewritten after each task, and a rerun with the same settings skips finished rows) and
``OUT/routed_vs_static.md`` (the exact command, then the table).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from lorahub import compose
from lorahub.files import atomic_write_json, atomic_write_text
from lorahub.bigbench import list_tasks, read_task, split_examples
from lorahub.generate import generate
from lorahub.hub import _max_new_tokens
from lorahub.metrics import exact_match
from lorahub.models import load_base
from lorahub.routed import RoutedConfig
from lorahub.store import ModuleStore, resolve_manifest

TASKS = ["color__hex", "linguistic_mappings__plural_regular_json", "arithmetic__2_digit_addition",
         "fact_checker__politifact", "entailed_polarity", "qa_wikidata"]
POOL = Path(__file__).resolve().parents[2] / "shared" / "bigbench"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (json + md)")
    ap.add_argument("--hub", default="smollm2-135m-bigbench", help="hub name or manifest path")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated hub tasks")
    ap.add_argument("--tasks-dir", default=str(POOL), help="the BIG-bench pool the hub was built from")
    ap.add_argument("--num-candidates", type=int, default=20, help="random hub modules, the task's own excluded")
    ap.add_argument("--seeds", default="1", help="comma-separated seeds (candidates and router init)")
    ap.add_argument("--shots", type=int, default=5, help="few-shot examples, taken from the held-out split")
    ap.add_argument("--limit", type=int, default=None, help="test examples per task (default: the rest of the held-out split)")
    ap.add_argument("--heldout", type=int, default=50, help="the hub build's --heldout")
    ap.add_argument("--budget", type=int, default=40, help="static: candidate evaluations")
    ap.add_argument("--steps", type=int, default=40, help="routed: AdamW steps")
    ap.add_argument("--top-k", type=int, default=2, help="routed: modules per token")
    ap.add_argument("--lr", type=float, default=2e-3, help="routed: router learning rate")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return ap.parse_args()


def held_out_split(tasks_dir: str, task: str, meta: dict, seed: int, heldout: int, entry: dict) -> list:
    """The task's held-out examples exactly as the hub build split them (its module never trained on them)."""
    _, held = split_examples(read_task(tasks_dir, task, meta).examples, seed=seed, heldout=heldout)
    want = entry.get("heldout_examples")
    if want is not None and len(held) != want:
        sys.exit(f"task {task}: the split gives {len(held)} held-out examples, the manifest says {want}; "
                 "--heldout or the task file differs from the hub build's")
    return held


def markdown(rows: list[dict], settings: dict, command: str) -> str:
    lines = ["# Routed vs static composition", "", "```", command, "```", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "tasks"), "",
             "Exact match (%) on held-out examples of each hub task (its own module excluded from the candidates); "
             "mean over seeds. Compose seconds are wall time of compose() (search or router training).", "",
             "| task | seeds | n test | base | static | routed | static s | routed s | static loss | routed loss | base loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    wins = [0, 0, 0]
    for t in tasks:
        rs = [r for r in rows if r["task"] == t]
        s, ro = mean(rs, "static_em"), mean(rs, "routed_em")
        wins[0 if ro > s else 1 if ro < s else 2] += 1
        lines.append(f"| {t} | {len(rs)} | {rs[0]['n_test']} | {mean(rs, 'base_em'):.1f} | {s:.1f} | {ro:.1f} | "
                     f"{mean(rs, 'static_seconds'):.0f} | {mean(rs, 'routed_seconds'):.0f} | {mean(rs, 'static_loss'):.3f} | "
                     f"{mean(rs, 'routed_loss'):.3f} | {mean(rs, 'zero_weight_loss'):.3f} |")
    if tasks:
        per_task = [[r for r in rows if r["task"] == t] for t in tasks]
        avg = lambda k: sum(mean(rs, k) for rs in per_task) / len(per_task)  # noqa: E731
        lines.append(f"| **mean of {len(tasks)} tasks** | | | {avg('base_em'):.1f} | {avg('static_em'):.1f} | "
                     f"{avg('routed_em'):.1f} | {avg('static_seconds'):.0f} | {avg('routed_seconds'):.0f} | "
                     f"{avg('static_loss'):.3f} | {avg('routed_loss'):.3f} | {avg('zero_weight_loss'):.3f} |")
        lines += ["", f"Routed beats static on {wins[0]} task(s), loses on {wins[1]}, ties on {wins[2]}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/routed_vs_static.py " + shlex.join(sys.argv[1:])
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    manifest = json.loads(resolve_manifest(args.hub).read_text(encoding="utf-8"))
    split_seed = int(manifest.get("train_config", {}).get("seed", 0))
    entries = {e["task"]: e for e in manifest["modules"]}
    missing = [t for t in tasks if t not in entries]
    if missing:
        sys.exit(f"tasks {missing} have no module in hub {args.hub}: their held-out split is defined by the hub build. "
                 f"Hub tasks: {', '.join(entries)}")
    store = ModuleStore.from_manifest(args.hub)
    settings = {"hub": args.hub, "hub_modules": len(store), "tasks": tasks, "num_candidates": args.num_candidates,
                "shots": args.shots, "limit": args.limit, "heldout": args.heldout, "split_seed": split_seed,
                "budget": args.budget, "steps": args.steps, "top_k": args.top_k, "lr": args.lr}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "routed_vs_static.json", out / "routed_vs_static.md"
    rows: list[dict] = []
    if jpath.is_file():
        old = json.loads(jpath.read_text(encoding="utf-8"))
        same = {k: v for k, v in old["settings"].items() if k != "tasks"} == {k: v for k, v in settings.items() if k != "tasks"}
        if not same:
            sys.exit(f"{jpath} holds results of other settings ({old['settings']}); choose another --out")
        rows = old["rows"]
    done = {(r["task"], r["seed"]) for r in rows}
    print(command, flush=True)
    model, tok = load_base(store.base_model, device=args.device)
    index = list_tasks(args.tasks_dir)
    for task in tasks:
        held = held_out_split(args.tasks_dir, task, index[task], split_seed, args.heldout, entries[task])
        few, test = held[: args.shots], held[args.shots:][: args.limit]
        own = entries[task]["name"]
        pool = ModuleStore([s for n, s in store.specs.items() if n != own], base_model=store.base_model, name=store.name)
        few_dicts = [{"input": e.input, "output": e.output} for e in few]
        inputs, refs = [e.input for e in test], [e.output for e in test]
        max_new = _max_new_tokens(tok, held)
        base_em = None
        for seed in seeds:
            if (task, seed) in done:
                continue
            if base_em is None:
                base_em = exact_match(generate(model, tok, inputs, max_new_tokens=max_new, batch_size=args.batch_size), refs)
            t0 = time.perf_counter()
            static = compose(few_dicts, pool, (model, tok), num_candidates=args.num_candidates, budget=args.budget,
                             seed=seed, progress=False)
            static_s = time.perf_counter() - t0
            static_pred = static.predict(inputs, max_new_tokens=max_new, batch_size=args.batch_size)
            t0 = time.perf_counter()
            routed = compose(few_dicts, pool, (model, tok), num_candidates=args.num_candidates, method="routed",
                             routed=RoutedConfig(top_k=args.top_k, steps=args.steps, lr=args.lr), seed=seed,
                             progress=False)
            routed_s = time.perf_counter() - t0
            routed_pred = routed.predict(inputs, max_new_tokens=max_new, batch_size=args.batch_size)
            assert list(static.weights) == routed.stacked.names  # same candidates
            row = {
                "task": task, "seed": seed, "n_few": len(few), "n_test": len(test), "candidates": routed.stacked.names,
                "base_em": base_em, "static_em": exact_match(static_pred, refs), "routed_em": exact_match(routed_pred, refs),
                "static_seconds": round(static_s, 2), "routed_seconds": round(routed_s, 2),
                "static_loss": static.loss, "routed_loss": routed.loss, "zero_weight_loss": routed.record["zero_weight_loss"],
                "static_evaluations": static.record["evaluations"], "routed_steps": args.steps,
                "num_router_params": routed.record["num_router_params"], "static_weights": static.weights,
                "routed_usage": routed.record["module_usage"], "routed_history": routed.history,
                "predictions": {"static": static_pred, "routed": routed_pred},
            }
            rows.append(row)
            print(f"{task} seed {seed}: EM base {base_em:.1f}  static {row['static_em']:.1f} ({static_s:.0f} s, loss "
                  f"{static.loss:.3f})  routed {row['routed_em']:.1f} ({routed_s:.0f} s, loss {routed.loss:.3f})", flush=True)
            atomic_write_json(jpath, {"command": command, "settings": settings, "rows": rows})
            atomic_write_text(mpath, markdown(rows, settings, command))
    atomic_write_json(jpath, {"command": command, "settings": settings, "rows": rows})
    text = markdown([r for r in rows if r["task"] in tasks and r["seed"] in seeds], settings, command)
    atomic_write_text(mpath, text)
    print(text)


if __name__ == "__main__":
    main()
