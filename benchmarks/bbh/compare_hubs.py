"""Two `lorahub bbh` runs side by side on the same test examples: per task and method, exact match of run A and
run B, with the means over BBH's option-letter tasks (targets "(A)", "(B)", ...) and over the others.

Run A may be a full run: its predictions are scored on the first ``--limit`` test examples only (``--limit`` keeps
the first N of the same split, so they are the examples a ``--limit N`` run sees), and only ``--seeds`` are used.

    python benchmarks/bbh/compare_hubs.py benchmarks/bbh/results/full benchmarks/bbh/results/hub96-quick \\
        --limit 50 --seeds 1 --methods best-single,lorahub-reference,lorahub-default
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lorahub.bench import bbh
from lorahub.bench.runner import read_results
from lorahub.bigbench import LETTER_ANSWER
from lorahub.metrics import exact_match
from lorahub.tables import markdown_table


def letter_tasks() -> set[str]:
    """BBH tasks whose targets are option letters (at least 90% of them: movie_recommendation and ruin_names
    have a few text targets in BBH's data)."""
    out = set()
    for name in bbh.task_names():
        task = bbh.load_task(name)
        targets = [ex.output for ex in task.learn + task.test]
        if sum(bool(LETTER_ANSWER.fullmatch(t)) for t in targets) >= 0.9 * len(targets):
            out.add(name)
    return out


def scores(run: Path, limit: int, seeds: set[int | None], methods: list[str]) -> dict[tuple[str, str], float]:
    """(task, method) -> mean EM over ``seeds`` of the predictions on the first ``limit`` test examples."""
    refs = {}
    by: dict[tuple[str, str], list[float]] = {}
    for r in read_results(run / "results.jsonl", repair=False):
        if r["method"] not in methods or (r["seed"] not in seeds and r["seed"] is not None):
            continue
        if r["task"] not in refs:
            refs[r["task"]] = bbh.load_task(r["task"], limit=limit).references
        preds = r["predictions"][:limit]
        if len(preds) < len(refs[r["task"]]):
            raise SystemExit(f"{run}: {r['task']} {r['method']} has {len(preds)} predictions, fewer than --limit")
        by.setdefault((r["task"], r["method"]), []).append(exact_match(preds, refs[r["task"]]))
    return {k: statistics.mean(v) for k, v in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--methods", default="best-single,lorahub-reference,lorahub-default")
    ap.add_argument("--labels", default="A,B", help="column labels of the two runs")
    args = ap.parse_args()
    methods = args.methods.split(",")
    seeds = {int(s) for s in args.seeds.split(",")}
    a, b = (scores(run, args.limit, seeds, methods) for run in (args.run_a, args.run_b))
    la, lb = args.labels.split(",")
    started = sorted({t for t, _ in a} & {t for t, _ in b})
    tasks = [t for t in started if all((t, m) in d for m in methods for d in (a, b))]  # compare on finished tasks only
    if len(tasks) < len(started):
        print(f"(left out, not every method finished in both runs: {', '.join(sorted(set(started) - set(tasks)))})\n")
    letters = letter_tasks()
    header = ["task"] + [f"{m} {lab}" for m in methods for lab in (la, lb)]
    rows = [[t] + [f"{d.get((t, m), float('nan')):.1f}" for m in methods for d in (a, b)] for t in tasks]
    for group, members in (("option-letter tasks", letters), ("other tasks", set(bbh.task_names()) - letters)):
        ts = [t for t in tasks if t in members]
        if ts:
            rows.append([f"**mean, {len(ts)} {group}**"] + [
                f"**{statistics.mean(d[(t, m)] for t in ts if (t, m) in d):.1f}**" if any((t, m) in d for t in ts) else "–"
                for m in methods for d in (a, b)])
    print(markdown_table(header, rows, ["---"] + ["---:"] * (len(header) - 1)))


if __name__ == "__main__":
    main()
