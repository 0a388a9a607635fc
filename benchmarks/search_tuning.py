"""Selection and search settings, side by side on the BBH tuning tasks: exact match, few-shot loss, evaluations
and compose seconds of each variant, with the paired comparison against ``lorahub-reference``, all in one run.

Each variant is a ``lorahub bbh`` method spec (the keys of :func:`lorahub.api.compose` that the BBH methods
pass): the same prepare and generation code as the BBH table, so a variant that wins here is a spec that can be
registered as is. Defaults are chosen on :data:`lorahub.bench.bbh.TUNING_TASKS` only (every third BBH task); the
other 18 tasks are the confirmation set and are never run here unless named with ``--tasks``.

One JSON line per (task, seed, variant) goes to ``--out`` (appended; a rerun skips what is there, so a killed
run resumes). The table at the end is computed from that file.

    python benchmarks/search_tuning.py --seeds 1 --limit 50 --out benchmarks/results/search_tuning.jsonl
    python benchmarks/search_tuning.py --report benchmarks/results/search_tuning.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from lorahub.bench import bbh
from lorahub.bench.methods import METHODS, Worker
from lorahub.files import append_line

REFERENCE = METHODS["lorahub-reference"].spec
DEFAULT = METHODS["lorahub-default"].spec
# probes counted in the budget: 20 single modules (one batched pass) + 20 searched = the reference's 40
PROBED = {**DEFAULT, "probe_singles": True, "budget": 20}
VARIANTS: dict[str, dict] = {
    "reference": dict(REFERENCE),
    "reference+retrieve": {**REFERENCE, "select": "retrieve"},
    "default-0.2": dict(DEFAULT),  # random, 20 probes + CMA-ES 40 (60 evaluations)
    "probe+cma": dict(PROBED),  # random (the reference's candidates), 20 probes + CMA-ES 20
    "probe+cobyla": {**PROBED, "optimizer": "ngopt", "population": None},  # 20 probes + Cobyla from the best
    "retrieve+probe+cma": {**PROBED, "select": "retrieve"},
    "retrieve+probe+cobyla": {**PROBED, "select": "retrieve", "optimizer": "ngopt", "population": None},
    "retrieve+cobyla": {**REFERENCE, "select": "retrieve", "loss_scale": "token-mean", "candidate_order": "store"},
    "format+reference": {**REFERENCE, "select": "format+retrieve"},
    "format+probe+cma": {**PROBED, "select": "format+retrieve"},
    "format+probe+cobyla": {**PROBED, "select": "format+retrieve", "optimizer": "ngopt", "population": None},
}
FIRST = "reference,reference+retrieve,probe+cma,retrieve+probe+cma,retrieve+probe+cobyla"


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report(rows: list[dict], baseline: str = "reference") -> str:
    """Per variant: mean EM, few-shot loss, evaluations, compose seconds; EM wins/losses/ties against ``baseline``
    on the (task, seed) pairs both have."""
    by = {(r["task"], r["seed"], r["variant"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | jobs | EM | few-shot loss | evals | compose s | vs " + baseline + " (W/L/T, mean ΔEM) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        pairs = [(r["em"], by[(r["task"], r["seed"], baseline)]["em"]) for r in mine
                 if (r["task"], r["seed"], baseline) in by]
        w = sum(a > b for a, b in pairs); lo = sum(a < b for a, b in pairs); t = len(pairs) - w - lo
        delta = statistics.mean(a - b for a, b in pairs) if pairs else float("nan")
        mean = lambda k: statistics.mean(r[k] for r in mine)  # noqa: E731
        lines.append(f"| {v} | {len(mine)} | {mean('em'):.1f} | {mean('loss'):.3f} | {mean('evals'):.0f} | "
                     f"{mean('compose_seconds'):.1f} | {w}/{lo}/{t}, {delta:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(bbh.TUNING_TASKS), help="default: the tuning third of BBH")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--variants", default=FIRST, help=f"comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--limit", type=int, default=50, help="test examples per task for exact match")
    ap.add_argument("--hub", default=None, help="hub name or manifest (default: the default hub)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/search_tuning.jsonl")
    ap.add_argument("--report", default=None, help="only print the table of this results file")
    args = ap.parse_args()
    if args.report:
        print(report(read_rows(Path(args.report))))
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}. Available: {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["task"], r["seed"], r["variant"]) for r in read_rows(out)}
    worker = Worker(hub=args.hub, threads=args.threads)
    template = METHODS["lorahub-default"]
    for task_name in args.tasks.split(","):
        task = bbh.load_task(task_name, None, limit=args.limit)
        for seed in map(int, args.seeds.split(",")):
            for v in args.variants.split(","):
                if (task_name, seed, v) in done:
                    continue
                method = dataclasses.replace(template, name=v, spec=VARIANTS[v])
                row = worker.run((task_name, v, seed), task, method)
                line = {"task": task_name, "seed": seed, "variant": v, "limit": args.limit,
                        **{k: row[k] for k in ("em", "loss", "objective", "evals", "compose_seconds", "eval_seconds",
                                               "weights", "optimizer", "machine")},
                        "selected": row["selection"]["modules"] if "modules" in row["selection"] else None,
                        "spec": VARIANTS[v]}
                append_line(out, json.dumps(line))
                print(f"{task_name} seed {seed} {v}: em {row['em']:.1f} loss {row['loss']:.4f} evals {row['evals']} "
                      f"compose {row['compose_seconds']:.1f}s", flush=True)
    print(report(read_rows(out)))


if __name__ == "__main__":
    main()
