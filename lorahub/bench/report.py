"""summary.md (a table like LoraHub's Table 1, the paper's figures alongside) and per_task.png, from results.jsonl.

Seeded methods give two rows, as in the paper: *avg* (per task, the mean over seeds; then the mean over
tasks) and *best* (per task, the best seed; then the mean over tasks). Every average is a macro average
over the tasks that the method has results for; the ``tasks`` column says how many.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_text
from ..metrics import normalize
from ..tables import markdown_table
from .bbh import TUNING_TASKS
from .methods import DEFAULT_METHODS, METHODS

SUMMARY, PLOT = "summary.md", "per_task.png"  # written into a `lorahub bbh --out` folder

# arXiv 2307.13269, Table 1: FLAN-T5-large, average exact match over the 27 BBH tasks; tokens per example
PAPER_FLAN_T5_LARGE = [
    ("Zero-shot", 27.0, None),
    ("In-context learning (5 examples)", 37.3, "~598"),
    ("IA3 fine-tuning", 31.6, None),
    ("LoRA tuning", 37.7, None),
    ("Full fine-tuning", 42.1, None),
    ("LoraHub avg (5 seeds)", 34.7, "~112"),
    ("LoraHub best (5 seeds)", 41.2, "~112"),
]


def _order(methods: list[str]) -> list[str]:
    return sorted(methods, key=lambda m: (DEFAULT_METHODS.index(m) if m in DEFAULT_METHODS else len(DEFAULT_METHODS), m))


def _label(method: str) -> str:
    m = METHODS.get(method)
    return m.label if m and m.label else method


def rows_that_ran(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose job ran: a row copied to another seed (``same_as_seed``) cost nothing, so it is left out of
    the seconds and speeds."""
    return [r for r in rows if r.get("same_as_seed") is None]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per table row: method, kind (""/avg/best), em, tasks, seeds, tokens, seconds, speeds."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    table = []
    for method in _order(list(by_method)):
        rs = by_method[method]
        per_task: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            per_task[r["task"]].append(r["em"])
        seeds = sorted({r["seed"] for r in rs}, key=lambda s: (s is None, s))
        ran = rows_that_ran(rs)
        n_test, eval_s = sum(r["n_test"] for r in ran), sum(r["eval_seconds"] for r in ran)
        evals, compose_s = sum(r["evals"] for r in ran), sum(r["compose_seconds"] for r in ran)
        common = {
            "method": method, "label": _label(method), "tasks": len(per_task),
            "seeds": [s for s in seeds if s is not None],
            "tokens": statistics.mean(r["tokens_per_example"] for r in rs),
            "compose_seconds": compose_s, "eval_seconds": eval_s, "jobs_run": len(ran),
            "examples_per_second": n_test / eval_s if eval_s else None,
            "evals_per_second": evals / compose_s if evals and compose_s else None,
            "top_answer": statistics.mean(top_answer_share(r["predictions"]) for r in rs)
            if all(r.get("predictions") for r in rs) else None,
            "per_task": {t: statistics.mean(v) for t, v in per_task.items()},
            "task_jobs": {t: len(v) for t, v in per_task.items()},
        }
        if seeds == [None]:
            table.append({**common, "kind": "", "em": statistics.mean(common["per_task"].values())})
        else:
            table.append({**common, "kind": "avg", "em": statistics.mean(statistics.mean(v) for v in per_task.values())})
            table.append({**common, "kind": "best", "em": statistics.mean(max(v) for v in per_task.values())})
    return table


def top_answer_share(predictions: list[str]) -> float:
    """How often a job gave its most common answer, ×100 (after the metric's normalisation): 100 means one
    answer for every question, whatever the question said."""
    counts = Counter(normalize(p) for p in predictions)
    return 100.0 * max(counts.values()) / len(predictions)


def complete_tasks(rows: list[dict[str, Any]]) -> set[str]:
    """Tasks on which every method of the run has all its seeds: the tasks a partial run can compare on."""
    seeds_of: dict[str, set] = defaultdict(set)
    done: dict[tuple[str, str], set] = defaultdict(set)
    for r in rows:
        seeds_of[r["method"]].add(r["seed"])
        done[(r["task"], r["method"])].add(r["seed"])
    tasks = {r["task"] for r in rows}
    return {t for t in tasks if all(done[(t, m)] == seeds for m, seeds in seeds_of.items())}


def search_comparison(rows: list[dict[str, Any]], a: str = "lorahub-default", b: str = "lorahub-reference") -> list[str]:
    """Lines comparing the few-shot loss two searches reached on the same (task, seed), and whether the lower loss
    went with the higher exact match: a lower loss is a better search, whether it also predicts the test set
    better is what the exact-match split says."""
    by_key = {(r["task"], r["method"], r["seed"]): r for r in rows if r.get("loss") is not None}
    pairs = [(x, by_key[(t, b, s)]) for (t, m, s), x in by_key.items() if m == a and (t, b, s) in by_key]
    if not pairs:
        return []
    lower = [x["em"] - y["em"] for x, y in pairs if x["loss"] < y["loss"]]
    other = [x["em"] - y["em"] for x, y in pairs if not x["loss"] < y["loss"]]
    split = "; ".join(f"{d} {statistics.mean(v):+.2f} ({len(v)} pairs)" for d, v in
                      (("where its loss was lower", lower), ("elsewhere", other)) if v)
    return ["", f"Search: `{a}` reached a lower few-shot loss than `{b}` on {len(lower)} of {len(pairs)} (task, seed) "
            f"pairs (same 20 candidates per pair); mean best loss {statistics.mean(x['loss'] for x, _ in pairs):.3f} vs "
            f"{statistics.mean(y['loss'] for _, y in pairs):.3f}. Exact match of `{a}` − `{b}`: {split}."]


def seed_choice(rows: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    """Exact match of ``method`` when each task keeps the seed whose few-shot objective was lowest (what a user
    can choose without the test set), beside the mean over seeds and the best seed (chosen on the test set): how
    much the few-shot objective tells about the test set. Tasks with fewer than 2 seeds that ran are left out;
    None if no task has 2."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows_that_ran(rows):
        if r["method"] == method and r.get("objective") is not None:
            by_task[r["task"]].append(r)
    runs = [rs for rs in by_task.values() if len(rs) >= 2]
    if not runs:
        return None
    return {"method": method, "tasks": len(runs),
            "chosen": statistics.mean(min(rs, key=lambda r: r["objective"])["em"] for rs in runs),
            "mean": statistics.mean(statistics.mean(r["em"] for r in rs) for rs in runs),
            "best": statistics.mean(max(r["em"] for r in rs) for rs in runs)}


def seed_choice_lines(rows: list[dict[str, Any]], method: str = "lorahub-reference") -> list[str]:
    c = seed_choice(rows, method)
    if c is None:
        return []
    return ["", f"Seeds of `{method}` chosen by the few-shot objective (the lowest per task, {c['tasks']} tasks): "
            f"{c['chosen']:.1f} exact match, against {c['mean']:.1f} for the mean over seeds and {c['best']:.1f} for "
            "the best seed (chosen on the test set)."]


def paired_difference(rows: list[dict[str, Any]], a: str, b: str, *, resamples: int = 10_000,
                      seed: int = 0) -> dict[str, Any] | None:
    """Exact match of ``a`` minus ``b`` on the (task, seed) pairs both have: wins, losses, ties, the mean and two
    bootstrap 95% intervals of the mean (percentile, ``resamples`` draws): over pairs, and over tasks (whole
    tasks resampled with their seeds; wider, since a task's seeds share its test set). None without pairs."""
    em = {(r["task"], r["method"], r["seed"]): r["em"] for r in rows}
    pairs = sorted((t, s, em[(t, a, s)] - em[(t, b, s)]) for (t, m, s) in em if m == a and (t, b, s) in em)
    if not pairs:
        return None
    d = np.array([x for _, _, x in pairs])
    rng = np.random.default_rng(seed)
    by_pair = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    tasks = sorted({t for t, _, _ in pairs})
    sums = np.array([sum(x for t2, _, x in pairs if t2 == t) for t in tasks])
    counts = np.array([sum(1 for t2, _, _ in pairs if t2 == t) for t in tasks])
    draw = rng.integers(0, len(tasks), (resamples, len(tasks)))
    by_task = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    return {"a": a, "b": b, "pairs": len(d), "tasks": len(tasks), "wins": int((d > 0).sum()),
            "losses": int((d < 0).sum()), "ties": int((d == 0).sum()), "mean": float(d.mean()),
            "ci_pairs": tuple(float(x) for x in np.percentile(by_pair, [2.5, 97.5])),
            "ci_tasks": tuple(float(x) for x in np.percentile(by_task, [2.5, 97.5]))}


def paired_lines(rows: list[dict[str, Any]], a: str = "lorahub-default", b: str = "lorahub-reference") -> list[str]:
    p = paired_difference(rows, a, b)
    if p is None:
        return []
    return ["", "## Paired comparison", "",
            f"`{a}` − `{b}`, exact match on the {p['pairs']} (task, seed) pairs both ran ({p['tasks']} tasks): "
            f"**{p['mean']:+.2f}** points; {a} wins {p['wins']}, loses {p['losses']}, ties {p['ties']}. "
            f"Bootstrap 95% interval of the mean (10,000 resamples): [{p['ci_pairs'][0]:+.2f}, {p['ci_pairs'][1]:+.2f}] "
            f"over pairs, [{p['ci_tasks'][0]:+.2f}, {p['ci_tasks'][1]:+.2f}] over tasks (whole tasks resampled)."]


def split_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The table's avg figures on the tuning tasks (:data:`TUNING_TASKS`, where defaults were chosen) and on the
    others (confirmation), apart; nothing unless the run has tasks of both. Pass the table's rows: in a partial
    run, only the tasks every method finished, so that the columns compare on the same tasks."""
    tasks = {r["task"] for r in rows}
    tuning, confirm = tasks & set(TUNING_TASKS), tasks - set(TUNING_TASKS)
    if not tuning or not confirm:
        return []
    body = []
    for t in aggregate(rows):
        if t["kind"] == "best":
            continue
        mean = lambda ts: statistics.mean(v for k, v in t["per_task"].items() if k in ts) if ts & set(t["per_task"]) else None  # noqa: E731
        body.append([t["label"], t["kind"], _f(mean(tuning)), _f(mean(confirm))])
    return ["", "## Tuning and confirmation tasks", "",
            f"The {len(tuning)} tuning tasks (every third BBH task, `lorahub.bench.bbh.TUNING_TASKS`: "
            + ", ".join(sorted(tuning)) + ") are where lorahub's defaults are tuned since December 2026 "
            f"(benchmarks/search_tuning.py); the other {len(confirm)} are the confirmation set. Defaults older than "
            "that were chosen on other tasks (docs/results.md, \"Search settings\").",
            "", markdown_table(["method", "", "tuning tasks", "confirmation tasks"], body, ["---", "---", "---:", "---:"])]


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def summary_markdown(rows: list[dict[str, Any]], protocol: dict[str, Any], specs: dict[str, dict]) -> str:
    started = sorted({r["task"] for r in rows})
    complete = complete_tasks(rows)
    partial = bool(complete) and len(complete) < len(started)
    compared = [r for r in rows if r["task"] in complete] if partial else rows  # the tasks every row is averaged on
    table = aggregate(compared)
    hubs = {s["hub"]["name"]: s["hub"]["modules"] for s in specs.values() if "hub" in s}
    limit = protocol.get("limit")
    lines = [
        "# BIG-Bench Hard: lorahub bbh",
        "",
        f"Base model `{protocol['base_model']}` ({protocol['dtype']})"
        + "".join(f", hub `{h}` ({n} modules)" for h, n in hubs.items())
        + f". Per task, {protocol['shots']} learning examples drawn with seed {protocol['split_seed']}; "
        + ("the rest" if not limit else f"the first {limit} of the rest (--limit)")
        + " are the test set. Exact match ×100 after strip(), lower() and removing \".\"; each figure is the "
        "mean over the `tasks` column's tasks. Seeded methods: *avg* = mean over seeds, *best* = best seed per "
        "task. Tokens = mean prompt tokens per test example. *Top answer* = how often a job gave its most common "
        "answer, % of its test questions (100: one answer to every question), averaged over jobs. Seconds are "
        "summed over the method's jobs that ran (a row copied to another seed, `same_as_seed`, cost nothing); "
        "compose = few-shot search or scoring (selection included), eval = greedy generation on the test set; "
        "compose s / job = compose s ÷ jobs run.",
        "",
        f"Tasks with every method and seed finished: {len(complete)} (BBH has 27); started: {len(started)}.",
        "",
        *([f"**Partial run**: {len(complete)} of the {len(started)} tasks started have every method and seed "
           "finished; the table below averages over those tasks only, so that the rows compare on the same "
           "tasks. The per-task table shows every finished job.", ""] if partial else []),
        markdown_table(
            ["method", "", "exact match", "tasks", "seeds", "top answer %", "tokens / example", "compose s",
             "compose s / job", "eval s", "eval examples/s", "compose evals/s"],
            [[t["label"], t["kind"], f"{t['em']:.1f}", t["tasks"], ",".join(map(str, t["seeds"])) or "–",
              _f(t["top_answer"]), f"{t['tokens']:.0f}", f"{t['compose_seconds']:.1f}",
              _f(t["compose_seconds"] / t["jobs_run"] if t["jobs_run"] else None), f"{t['eval_seconds']:.1f}",
              _f(t["examples_per_second"]), _f(t["evals_per_second"], "{:.2f}")] for t in table],
            ["---", "---", "---:", "---:", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"],
        ),
    ]
    ran = rows_that_ran(rows)
    compose_h = sum(r["compose_seconds"] for r in ran) / 3600
    eval_h = sum(r["eval_seconds"] for r in ran) / 3600
    machines = sorted({r.get("machine") or "not recorded" for r in ran})
    copied = f" ({len(rows) - len(ran)} more rows are copies of a seed that changes nothing)" if len(ran) < len(rows) else ""
    lines += ["", f"Job time, summed over the {len(ran)} finished jobs that ran{copied}: {compose_h + eval_h:.2f} h (compose "
              f"{compose_h:.2f} h, eval {eval_h:.2f} h; loading the model and hub not included). Machines: "
              + "; ".join(machines) + "."]
    lines += search_comparison(rows)
    lines += seed_choice_lines(rows)
    lines += paired_lines(rows)
    lines += split_lines(compared)
    shown = lambda spec: {k: v for k, v in spec.items() if k not in ("hub", "seeded")}  # noqa: E731
    settings = [f"- `{m}`: " + ", ".join(f"{k}={v}" for k, v in shown(s).items()) for m, s in specs.items() if shown(s)]
    if settings:
        lines += ["", "Settings:", *settings]
    lines += [
        "",
        "## For orientation only: the paper's figures on another model",
        "",
        "LoraHub (arXiv 2307.13269), Table 1: **FLAN-T5-large** (783M parameters) with its 196 FLAN modules, "
        "average over the 27 tasks. A different base model and hub: not comparable with the rows above.",
        "",
        markdown_table(["method (FLAN-T5-large, paper)", "exact match", "tokens / example"],
                       [(name, f"{em:.1f}", tok or "–") for name, em, tok in PAPER_FLAN_T5_LARGE], ["---", "---:", "---:"]),
        "",
        "## Per task",
        "",
    ]
    full = [t for t in (aggregate(rows) if partial else table) if t["kind"] != "best"]
    cols = [(t["method"], t["kind"]) for t in full]
    n_test = {r["task"]: r["n_test"] for r in rows}

    def cell(t: dict[str, Any], task: str) -> str:
        n = t["task_jobs"].get(task, 0)
        part = f" ({n} of {len(t['seeds'])} seeds)" if t["kind"] and 0 < n < len(t["seeds"]) else ""
        return _f(t["per_task"].get(task)) + part

    lines.append(markdown_table(["task", "n test", *(m + (" (avg)" if k else "") for m, k in cols)],
                                [[task, n_test[task], *(cell(t, task) for t in full)] for task in started],
                                ["---", *["---:"] * (len(cols) + 1)]))
    return "\n".join(lines) + "\n"


def plot_per_task(rows: list[dict[str, Any]], path: Path) -> bool:
    """Grouped horizontal bars: per task, exact match by method (seeded: mean over seeds). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = [t for t in aggregate(rows) if t["kind"] != "best"]
    tasks = sorted({r["task"] for r in rows}, reverse=True)
    height = 0.8 / max(1, len(table))
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.25 * len(tasks) * max(1, len(table)) ** 0.5))
    for j, t in enumerate(table):  # the first method on top within each task
        ys = [i + ((len(table) - 1) / 2 - j) * height for i in range(len(tasks))]
        ax.barh(ys, [t["per_task"].get(task, 0.0) for task in tasks], height=height,
                label=t["method"] + (" (avg over seeds)" if t["kind"] else ""))
    ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
    ax.set_ylim(-0.6, len(tasks) - 0.4)
    ax.set_xlabel("exact match (%)")
    ax.set_xlim(0, 100)
    ax.set_title("BBH per task")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06 if len(tasks) > 8 else -0.25), ncol=3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any], specs: dict[str, dict], *,
                 left_out: dict[str, int] | None = None) -> str:
    """Write summary.md and per_task.png under ``out``; return the summary text. ``left_out``: rows of
    results.jsonl not in ``rows`` (method -> count), named in the summary."""
    if not rows:
        text = "no results yet\n"
    else:
        text = summary_markdown(rows, protocol, specs)
        if left_out:
            text += ("\nNot in this summary (`--report-only --methods`): "
                     + ", ".join(f"{m} ({n} rows)" for m, n in sorted(left_out.items())) + ".\n")
        if not plot_per_task(rows, out / PLOT):
            text += "\n(per_task.png not written: matplotlib is missing; pip install 'lorahub[plots]')\n"
    atomic_write_text(out / SUMMARY, text)
    return text
