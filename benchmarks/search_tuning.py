"""Selection and search settings, side by side on the BBH tuning tasks: exact match, few-shot loss, evaluations
and compose seconds of each variant, with the paired comparison against ``lorahub-reference``, all in one run.

Each variant is a ``lorahub bbh`` method spec (the keys of :func:`lorahub.api.compose` that the BBH methods
pass): the same prepare and generation code as the BBH table, so a variant that wins here is a spec that can be
registered as is. Defaults are chosen on :data:`lorahub.bench.bbh.TUNING_TASKS` only (every third BBH task); the
other 18 tasks are the confirmation set and are never run here unless named with ``--tasks``.

``--suite pool`` runs the same variants on tasks that neither BBH nor the hub holds: BIG-bench pool tasks
(``--tasks-dir``, the project's pool beside the checkout by default) that no hub module was trained on, a spread
of ``--pool-tasks`` of them in name order (``--pool-families new`` keeps only task families the hub has no module
of), each with BBH's protocol (5 learning examples drawn with seed 42, the first ``--limit`` of the rest as the
test set) and its prompts as the pool renders them (the hub build's own format). A default must hold there too.

One JSON line per (task, seed, variant) goes to ``--out`` (appended; a rerun skips what is there, so a killed
run resumes). Each line carries the EM of the ``majority`` baseline on its test set. The table at the end is
computed from that file.

    python benchmarks/search_tuning.py --seeds 1 --limit 50 --out benchmarks/results/search_tuning.jsonl
    python benchmarks/search_tuning.py --suite pool --seeds 1 --out benchmarks/results/search_tuning_pool.jsonl
    python benchmarks/search_tuning.py --report benchmarks/results/search_tuning.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from lorahub.bench import bbh
from lorahub.bench.methods import LORAHUB_DEFAULT_SPEC, METHODS, Worker, majority_answer
from lorahub.bench.report import top_answer_share
from lorahub.bigbench import list_tasks, read_task
from lorahub.files import append_line
from lorahub.metrics import exact_match

REFERENCE = METHODS["lorahub-reference"].spec
# lorahub-default until December 2026: random candidates, 20 single-module probes, then CMA-ES 40 from the best
DEFAULT_0_2 = {"num_candidates": 20, "budget": 60, "optimizer": "cma", "population": None, "l1": 0.05,
               "probe_singles": True, "probes_in_budget": True, "start": "best-probe", "step": 0.15}
# the budget counts the probes: 20 single modules (one batched pass) + 20 searched = the reference's 40. (Lines
# written before the budget counted them say "budget": 20 without "probes_in_budget": the same computation.)
PROBED = {**DEFAULT_0_2, "budget": 40}
# Cobyla from the best probe, in the reference's objective and the selector's order (best first), so that Cobyla's
# first steps (one coordinate at a time, +0.5 in candidate order) add the likeliest modules first
PROBED_COBYLA = {**PROBED, "optimizer": "ngopt", "population": None, "loss_scale": "per-example",
                 "candidate_order": "sample"}
# (lines of the "+cobyla" variants written before the search cached scored points, 2026-12-02 07:00 UTC, spent one
# of their 20 evaluations re-scoring Cobyla's start; "default" is format+probe+cobyla with that evaluation back)
VARIANTS: dict[str, dict] = {
    "reference": dict(REFERENCE),
    "reference+retrieve": {**REFERENCE, "select": "retrieve"},
    "default-0.2": dict(DEFAULT_0_2),  # random, 20 probes + CMA-ES 40 (60 evaluations)
    "probe+cma": dict(PROBED),  # random (the reference's candidates), 20 probes + CMA-ES 20
    "probe+cobyla": dict(PROBED_COBYLA),  # random, 20 probes + Cobyla 20 from the best
    "retrieve+probe+cma": {**PROBED, "select": "retrieve"},
    "retrieve+probe+cobyla": {**PROBED_COBYLA, "select": "retrieve"},
    "retrieve+cobyla": {**REFERENCE, "select": "retrieve", "loss_scale": "token-mean", "candidate_order": "store"},
    "format+reference": {**REFERENCE, "select": "format+retrieve"},  # the reference's search, most similar first
    "format+probe+cma": {**PROBED, "select": "format+retrieve"},
    "format+probe+cobyla": {**PROBED_COBYLA, "select": "format+retrieve"},
    "default": dict(LORAHUB_DEFAULT_SPEC),  # lorahub-default since December 2026: auto, 20 probes + Cobyla 20
}
FIRST = "reference,format+reference,format+probe+cobyla,format+probe+cma"
ROW_KEYS = ("em", "loss", "objective", "evals", "compose_seconds", "eval_seconds", "weights", "optimizer", "machine",
            "predictions")


POOL = Path(__file__).resolve().parents[2] / "shared" / "bigbench"  # the project's BIG-bench pool, beside the checkout


@dataclasses.dataclass(frozen=True)
class PoolTaskSplit(bbh.TaskSplit):
    """A BIG-bench pool task in the BBH harness: the prompt is the task's rendered input as it is (the format the
    hub's modules were trained in), with no BBH description around it."""

    def prompt(self, question: str) -> str:
        return question


def pool_task_names(tasks_dir: Path, hub: Any, count: int, families: str) -> list[str]:
    """``count`` pool tasks no hub module was trained on, spread evenly over their sorted names (``families="new"``:
    only families, the name before ``__``, that no hub module comes from)."""
    trained = {hub.specs[n].task for n in hub.names}
    unused = sorted(t for t in list_tasks(tasks_dir) if t not in trained)
    if families == "new":
        seen = {t.split("__")[0] for t in trained}
        unused = [t for t in unused if t.split("__")[0] not in seen]
    if count >= len(unused):
        return unused
    return [unused[i * len(unused) // count] for i in range(count)]


def load_pool_task(tasks_dir: Path, name: str, limit: int | None) -> PoolTaskSplit:
    """BBH's split of a pool task (native format): 5 learning examples drawn with seed 42, the rest as the test set."""
    examples = read_task(tasks_dir, name).examples
    learn, test = bbh.split_indices(len(examples))
    test = test[:limit] if limit else test
    return PoolTaskSplit(name, "", tuple(examples[i] for i in learn), tuple(examples[i] for i in test), tuple(learn),
                         len(examples), tuple(sorted({ex.output for ex in examples})))


def majority_em(split: bbh.TaskSplit) -> float:
    """EM of the ``majority`` baseline (the learning examples' most common answer, no model) on ``split``'s test set."""
    return exact_match([majority_answer([ex.output for ex in split.learn])] * len(split.test), split.references)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report(rows: list[dict], baseline: str = "reference") -> str:
    """Per variant: mean EM, how often a job gave its most common answer, few-shot loss, evaluations, compose
    seconds; EM wins/losses/ties against ``baseline`` on the (task, seed) pairs both have; and the EM of the
    ``majority`` baseline on the variant's own jobs (the floor: no model, the examples' most common answer)."""
    by = {(r["task"], r["seed"], r["variant"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | jobs | EM | majority EM, same jobs | top answer % | few-shot loss | evals | compose s | vs "
             + baseline + " (W/L/T, mean ΔEM) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    floor = {(r["task"], r["limit"]): r["majority_em"] for r in rows if "majority_em" in r}
    for task, limit in {(r["task"], r["limit"]) for r in rows} - set(floor):  # lines written before they carried it
        floor[(task, limit)] = majority_em(bbh.load_task(task, None, limit=limit))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        pairs = [(r["em"], by[(r["task"], r["seed"], baseline)]["em"]) for r in mine
                 if (r["task"], r["seed"], baseline) in by]
        w = sum(a > b for a, b in pairs); lo = sum(a < b for a, b in pairs); t = len(pairs) - w - lo
        delta = statistics.mean(a - b for a, b in pairs) if pairs else float("nan")
        mean = lambda k: statistics.mean(r[k] for r in mine)  # noqa: E731
        shares = [top_answer_share(r["predictions"]) for r in mine if r.get("predictions")]
        top = f"{statistics.mean(shares):.0f}" if shares else "–"
        base = statistics.mean(floor[(r["task"], r["limit"])] for r in mine)
        lines.append(f"| {v} | {len(mine)} | {mean('em'):.1f} | {base:.1f} | {top} | {mean('loss'):.3f} | {mean('evals'):.0f} | "
                     f"{mean('compose_seconds'):.1f} | {w}/{lo}/{t}, {delta:+.1f} |")
    return "\n".join(lines)


def tuning_line(split: bbh.TaskSplit, seed: int, variant: str, limit: int, row: dict) -> dict:
    """The results-file line of one (task, seed, variant) from a BBH job row."""
    selection = row.get("selection") or {}
    return {"task": split.name, "seed": seed, "variant": variant, "limit": limit, **{k: row.get(k) for k in ROW_KEYS},
            "selected": selection.get("modules"), "spec": VARIANTS[variant], "majority_em": majority_em(split)}


def rows_from_bbh(folder: Path, tasks: list[str], seeds: list[int], variants: list[str], limit: int,
                  hub: dict) -> list[dict]:
    """Lines for the variants that a ``lorahub bbh`` folder already ran: same spec, same hub, and a test set that
    starts with this one's (``--limit`` keeps the first N of the same split, so a run of all test examples, or of
    a larger limit, holds the predictions for the first ``limit``; its EM is recomputed on those).

    A BBH method whose spec equals a variant's is the same computation (same selection, search and generation
    code, same seed), so its rows are reused rather than recomputed."""
    from lorahub.bench.runner import CONFIG, RESULTS, read_results

    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    ran = config["protocol"].get("limit")
    if ran is not None and ran < limit:
        raise SystemExit(f"{folder}: ran with --limit {ran}, fewer test examples than {limit}")
    same = {}
    for method, spec in config["methods"].items():
        spec = dict(spec)
        if spec.pop("hub", None) != hub:
            continue
        spec.pop("seeded", None)
        same.update({v: method for v in variants if VARIANTS[v] == spec})
    out = []
    splits: dict[str, bbh.TaskSplit] = {}
    for row in read_results(folder / RESULTS, repair=False):
        for v, method in same.items():
            if row["method"] == method and row["task"] in tasks and row["seed"] in seeds:
                if row["task"] not in splits:
                    splits[row["task"]] = bbh.load_task(row["task"], None, limit=limit)
                split = splits[row["task"]]
                preds = row["predictions"][:limit]
                em = exact_match(preds, split.references)
                out.append(tuning_line(split, row["seed"], v, limit, {**row, "predictions": preds, "em": em}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=("bbh", "pool"), default="bbh",
                    help="bbh: BBH's tuning tasks; pool: BIG-bench pool tasks that no hub module was trained on")
    ap.add_argument("--tasks", default=None, help="comma list (default: the tuning third of BBH, or the pool spread)")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--variants", default=FIRST, help=f"comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--limit", type=int, default=50, help="test examples per task for exact match")
    ap.add_argument("--hub", default=None, help="hub name or manifest (default: the default hub)")
    ap.add_argument("--tasks-dir", type=Path, default=POOL, help="--suite pool: the BIG-bench pool folder")
    ap.add_argument("--pool-tasks", type=int, default=12, help="--suite pool: how many tasks")
    ap.add_argument("--pool-families", choices=("all", "new"), default="all",
                    help="--suite pool: new = only task families the hub has no module of")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="results file (default: benchmarks/results/search_tuning[_pool].jsonl)")
    ap.add_argument("--report", default=None, help="only print the table of this results file")
    ap.add_argument("--from-bbh", default=None, metavar="DIR",
                    help="reuse the rows of a `lorahub bbh --out DIR` run whose method spec equals a variant's")
    args = ap.parse_args()
    if args.report:
        print(report(read_rows(Path(args.report))))
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}. Available: {', '.join(VARIANTS)}")
    out = Path(args.out or f"benchmarks/results/search_tuning{'_pool' if args.suite == 'pool' else ''}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    worker = Worker(hub=args.hub, threads=args.threads)
    if args.tasks:
        tasks = args.tasks.split(",")
    elif args.suite == "pool":
        tasks = pool_task_names(args.tasks_dir, worker.store, args.pool_tasks, args.pool_families)
    else:
        tasks = list(bbh.TUNING_TASKS)
    seeds, variants = [int(s) for s in args.seeds.split(",")], args.variants.split(",")
    done = {(r["task"], r["seed"], r["variant"]) for r in read_rows(out)}
    if args.from_bbh:
        from lorahub.bench.runner import hub_fingerprint

        for line in rows_from_bbh(Path(args.from_bbh), tasks, seeds, variants, args.limit, hub_fingerprint(worker.store)):
            if (line["task"], line["seed"], line["variant"]) not in done:
                append_line(out, json.dumps(line))
                done.add((line["task"], line["seed"], line["variant"]))
                print(f"{line['task']} seed {line['seed']} {line['variant']}: from {args.from_bbh}", flush=True)
    template = METHODS["lorahub-default"]
    for task_name in tasks:
        if args.suite == "pool":
            task = load_pool_task(args.tasks_dir, task_name, args.limit)
        else:
            task = bbh.load_task(task_name, None, limit=args.limit)
        for seed in seeds:
            for v in variants:
                if (task_name, seed, v) in done:
                    continue
                method = dataclasses.replace(template, name=v, spec=VARIANTS[v])
                row = worker.run((task_name, v, seed), task, method)
                append_line(out, json.dumps(tuning_line(task, seed, v, args.limit, row)))
                print(f"{task_name} seed {seed} {v}: em {row['em']:.1f} loss {row['loss']:.4f} evals {row['evals']} "
                      f"compose {row['compose_seconds']:.1f}s", flush=True)
    print(report(read_rows(out)))


if __name__ == "__main__":
    main()
