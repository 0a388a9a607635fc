"""Build a hub: one LoRA module per task, a manifest with sha256 and a quality report per module.

:func:`build_hub` is resumable and safe to kill at any point:

- each module folder is written whole or not at all (:func:`lorahub.files.atomic_dir`), then its
  manifest entry is added (:func:`lorahub.store.write_manifest`, atomic);
- a task whose folder and manifest entry exist (weights matching the entry's sha256) is never
  retrained; a folder that was renamed into place just before a kill is adopted from its
  ``lorahub_train.json`` instead of being retrained;
- a module that does not beat the base model on its own held-out examples is not shipped: it is
  recorded under ``"rejected"`` (so a rerun does not train it again) and the next task takes its place;
- a task file with a bad line is skipped with an error naming file and line; the build goes on.

Every event goes to ``<out>/build_log.jsonl``. The quality report (train loss, held-out exact match
of the base and of base+module, greedy decoding cut at the first newline) is stored in the manifest;
:func:`hub_report` turns it into table rows (``lorahub hub report``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import metrics
from .files import append_line, atomic_dir, locked_output, read_json, sha256_file
from .bigbench import list_tasks, parse_unit, read_task, split_examples, unit_name
from .data import Example
from .embed import embed_modules
from .errors import LorahubError, LorahubFileError, LorahubValueError
from .progress import progress_bar
from .store import PACKAGE_HUB_DIR, SAFETENSORS_WEIGHTS, read_manifest, resolve_manifest, weights_file, write_manifest
from .tables import text_table
from .train import TRAIN_REPORT, TrainConfig, TrainedModule, delta_weights, save_module, train_modules

BUILD_LOG = "build_log.jsonl"


def exact_match(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Fraction (0-1) of predictions matching their example's output (LoraHub's normalisation)."""
    return metrics.exact_match(predictions, [e.output for e in examples]) / 100.0


def _max_new_tokens(tokenizer: Any, examples: Sequence[Example]) -> int:
    longest = max(len(tokenizer(" " + e.output.strip(), add_special_tokens=False).input_ids) for e in examples)
    return int(min(64, max(4, longest + 3)))


def heldout_em(model: Any, tokenizer: Any, examples: Sequence[Example], deltas: dict | None = None) -> float:
    """Greedy exact match of ``model`` (plus ΔW ``deltas`` merged for the call) on ``examples``."""
    from .generate import generate, merged_into

    prompts = [e.input for e in examples]
    kw = dict(max_new_tokens=_max_new_tokens(tokenizer, examples), batch_size=25)
    if deltas is None:
        return exact_match(generate(model, tokenizer, prompts, **kw), examples)
    with merged_into(model, deltas):
        return exact_match(generate(model, tokenizer, prompts, **kw), examples)


def manifest_path_for(out_dir: str | os.PathLike) -> Path:
    """``hubs/NAME/`` keeps its manifest beside it, as ``hubs/NAME.json``."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.json"


def _load_manifest(path: Path, skeleton: dict[str, Any]) -> dict[str, Any]:
    """The build's manifest so far (``skeleton`` if new); refused if it was built with other settings."""
    if not path.is_file():
        return skeleton
    data = read_manifest(path)
    for key in ("base_model", "rank", "alpha", "target_modules"):
        if data.get(key) is not None and data[key] != skeleton[key]:
            raise LorahubValueError(
                f"manifest {path} was built with {key}={data[key]!r}, this build asks for {skeleton[key]!r}; "
                "use another --out folder or the same settings"
            )
    data.setdefault("modules", [])
    data.setdefault("rejected", [])
    return data


def _log(out_dir: Path, event: str, **fields: Any) -> None:
    # one write per line: a kill never leaves a broken line in the middle of the log
    append_line(out_dir / BUILD_LOG, json.dumps({"time": round(time.time(), 3), "event": event, "pid": os.getpid(), **fields}))


def _is_finished(entry: dict[str, Any], manifest_dir: Path) -> bool:
    try:
        return sha256_file(weights_file(manifest_dir / entry["location"])) == entry.get("sha256")
    except LorahubFileError:  # no folder or no weights: not finished
        return False


@locked_output("out_dir")  # one build per hub folder: a second one is refused, naming the first one's pid
def build_hub(
    tasks_dir: str | os.PathLike,
    base_model: str | None,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    only: Sequence[str] | None = None,
    *,
    max_modules: int | None = None,
    heldout: int = 50,
    eval_examples: int = 50,
    require_improvement: bool = True,
    name: str | None = None,
    description: str | None = None,
    progress: bool = True,
    device: str | None = None,
    on_module: Callable[[dict[str, Any]], None] | None = None,
    embed: bool = True,
) -> Path:
    """Train one module per task of ``tasks_dir`` into ``out_dir/<task>/``; return the manifest path.

    ``only`` restricts (and orders) the tasks; ``max_modules`` stops once that many modules are in
    the manifest. The manifest is ``out_dir``'s sibling ``<out_dir name>.json``, with locations
    relative to it, as :meth:`lorahub.store.ModuleStore.from_manifest` reads them. With ``embed`` every module
    gets its task embedding (:mod:`lorahub.embed`) as soon as it is saved, and modules of an earlier build
    that lack one get it when the build resumes.
    """
    from .models import DEFAULT_BASE_MODEL, is_seq2seq, load_base

    config = config or TrainConfig()
    base_name = base_model or DEFAULT_BASE_MODEL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath = manifest_path_for(out_dir)
    index = list_tasks(tasks_dir)
    # the units to build, in order: (module name, task, answer format)
    units = [parse_unit(u) for u in only] if only else [(t, "native") for t in index]
    unknown = [t for t, _ in units if t not in index]
    if unknown:
        raise LorahubValueError(f"--only names unknown tasks {unknown[:5]} in {tasks_dir}. Available: {', '.join(list(index)[:10])} ...")
    unit_of = {unit_name(t, f): (t, f) for t, f in units}
    order = list(unit_of)
    skeleton = {
        "name": name or out_dir.name,
        "description": description or f"LoRA modules trained by `lorahub hub build` on {Path(tasks_dir).name} tasks",
        "base_model": base_name, "model_type": None, "rank": config.rank, "alpha": config.alpha,
        "target_modules": sorted(config.target_modules), "train_config": config.to_dict(),
        "modules": [], "rejected": [],
    }
    manifest = _load_manifest(mpath, skeleton)

    # 1) what is already done: manifest entries whose weights check out, folders written just before a kill
    done = {e["name"] for e in manifest["modules"] if _is_finished(e, mpath.parent)}
    manifest["modules"] = [e for e in manifest["modules"] if e["name"] in done]
    for name in order:
        report = out_dir / name / TRAIN_REPORT
        if name not in done and report.is_file() and (out_dir / name / SAFETENSORS_WEIGHTS).is_file():
            entry = read_json(report, "module record")["manifest_entry"]
            entry["sha256"] = sha256_file(out_dir / name / SAFETENSORS_WEIGHTS)
            entry["size_bytes"] = (out_dir / name / SAFETENSORS_WEIGHTS).stat().st_size
            manifest["modules"].append(entry)
            done.add(name)
            _log(out_dir, "adopted", task=name)
    rejected = {r.get("name", r["task"]) for r in manifest["rejected"]}
    todo = [t for t in order if t not in done and t not in rejected]
    embedder = None
    if embed and manifest["modules"]:
        embedder = embed_modules(manifest, mpath, tasks_dir, only_missing=True, progress=progress)
    write_manifest(mpath, manifest)

    def room() -> int:
        return len(todo) if max_modules is None else max(0, max_modules - len(manifest["modules"]))

    if not todo or room() == 0:
        return mpath
    model, tokenizer = load_base(base_model, device=device)
    seq2seq = is_seq2seq(model)
    manifest["model_type"] = "seq2seq" if seq2seq else "causal"
    bar = progress_bar(min(len(todo), room()), "hub build", progress, unit="module")
    try:
        while todo and room() > 0:
            # 2) the next group of tasks (one adapter each, trained in the same steps)
            group: dict[str, tuple[list[Example], list[Example]]] = {}
            while todo and len(group) < min(config.modules_per_step, room()):
                name = todo.pop(0)
                task, fmt = unit_of[name]
                try:
                    examples = read_task(tasks_dir, task, index[task], fmt).examples
                    group[name] = split_examples(examples, seed=config.seed, heldout=heldout)
                except LorahubError as e:
                    _log(out_dir, "skipped", task=name, error=str(e))
                    if progress:
                        print(f"skipping {name}: {e}", flush=True)
            if not group:
                continue
            _log(out_dir, "train_start", tasks=list(group))
            trained = train_modules(model, tokenizer, {t: tr for t, (tr, _) in group.items()}, config, progress=progress)
            # 3) quality report, then write the module atomically and add its manifest entry
            for name, module in trained.items():
                task, fmt = unit_of[name]
                held = group[name][1][:eval_examples]
                t0 = time.time()
                base_em = heldout_em(model, tokenizer, held)
                module_em = heldout_em(model, tokenizer, held, delta_weights(module, config))
                quality = {
                    "train_loss": round(module.train_loss, 4), "base_em": round(base_em, 4),
                    "module_em": round(module_em, 4), "eval_examples": len(held),
                    "train_seconds": round(module.seconds, 1), "eval_seconds": round(time.time() - t0, 1),
                }
                if require_improvement and module_em <= base_em:
                    manifest["rejected"].append({"name": name, "task": task, "format": fmt, **quality})
                    write_manifest(mpath, manifest)
                    _log(out_dir, "rejected", task=name, **quality)
                    continue
                entry = _entry(name, task, fmt, module, config, base_name, seq2seq, index[task], group[name], quality,
                               out_dir, mpath)
                with atomic_dir(out_dir / name) as tmp:
                    weights = save_module(tmp, module, config, base_model_name=base_name, seq2seq=seq2seq,
                                          report={"quality": quality, "manifest_entry": entry})
                    entry["sha256"] = sha256_file(weights)
                    entry["size_bytes"] = weights.stat().st_size
                    os.chmod(tmp, 0o755)  # mkdtemp/mkstemp make private files; modules are for sharing
                    for f in tmp.iterdir():
                        os.chmod(f, 0o644)
                manifest["modules"].append(entry)
                if embed:
                    embedder = embed_modules(manifest, mpath, tasks_dir, model=embedder, only_missing=True)
                write_manifest(mpath, manifest)
                _log(out_dir, "saved", task=name, **quality)
                bar.set_postfix(task=name[:24], em=f"{base_em:.2f}->{module_em:.2f}")
                bar.update(1)
                if on_module is not None:
                    on_module(entry)
    finally:
        bar.close()
    return mpath


def _entry(name, task, fmt, module: TrainedModule, config: TrainConfig, base_name, seq2seq, meta, split, quality,
           out_dir: Path, mpath: Path):
    train, held = split
    ex = train[0]
    return {
        "name": name, "location": os.path.relpath(out_dir / name, mpath.parent), "task": task, "format": fmt,
        "base_model": base_name, "rank": config.rank, "alpha": config.alpha,
        "target_modules": sorted(config.target_modules), "sha256": None,
        "kind": meta.get("kind"), "description": meta.get("description"), "source": meta.get("source"),
        "license": "Apache-2.0 (BIG-bench)" if meta.get("source", "").startswith("bigbench") else None,
        "train_examples": len(train), "heldout_examples": len(held), "steps": config.steps,
        "lr": config.lr, "batch_size": config.batch_size, "mixer": config.mixer,
        "examples": [{"input": ex.input[:300], "output": ex.output[:100]}],
        **quality,
    }


def hub_report(manifest: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per module (and per rejected task) with its quality figures, for a printed table."""
    data = read_manifest(resolve_manifest(manifest))
    rows = []
    for e in data.get("modules", []):
        rows.append({
            "module": e["name"], "format": e.get("format", "native"), "status": "ok", "train_loss": e.get("train_loss"), "base_em": e.get("base_em"),
            "module_em": e.get("module_em"),
            "gain": None if e.get("module_em") is None else round(e["module_em"] - (e.get("base_em") or 0), 4),
            "steps": e.get("steps"), "size_mb": None if e.get("size_bytes") is None else round(e["size_bytes"] / 2**20, 2),
        })
    for r in data.get("rejected", []):
        rows.append({
            "module": r.get("name", r["task"]), "format": r.get("format", "native"), "status": "rejected", "train_loss": r.get("train_loss"), "base_em": r.get("base_em"),
            "module_em": r.get("module_em"), "gain": round(r.get("module_em", 0) - r.get("base_em", 0), 4),
            "steps": None, "size_mb": None,
        })
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`hub_report` rows, with a mean line for the shipped modules."""
    if not rows:
        return "(no modules)"
    cols = list(rows[0])
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        mean = lambda k: sum(r[k] or 0 for r in ok) / len(ok)  # noqa: E731
        cells.append([f"mean of {len(ok)}", "", "", fmt(mean("train_loss")), fmt(mean("base_em")), fmt(mean("module_em")),
                      fmt(mean("gain")), "", fmt(sum(r["size_mb"] or 0 for r in ok))][: len(cols)])
    return text_table(cols, cells)


def flan_t5_large_manifest(ids_file: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``lorahub/hubs/lorahub-flan-t5-large.json`` (or ``out``): LoraHub's 196 FLAN-T5-large modules as hub
    ids, one per line of ``ids_file`` (``lorahub/flan_t5_large-<task>``)."""
    ids = [line.strip() for line in Path(ids_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = Path(out) if out else PACKAGE_HUB_DIR / "lorahub-flan-t5-large.json"
    modules = []
    for repo in ids:
        short = repo.split("/")[-1]
        task = short[len("flan_t5_large-"):] if short.startswith("flan_t5_large-") else short
        modules.append({
            "name": short, "location": f"hf://{repo}", "task": task, "base_model": "google/flan-t5-large",
            "rank": 16, "alpha": 32, "target_modules": ["q", "v"],
        })
    manifest = {
        "name": "lorahub-flan-t5-large",
        "description": "The 196 FLAN-T5-large LoRA modules of LoraHub (arXiv 2307.13269), one per FLAN task, on the Hugging Face hub.",
        "base_model": "google/flan-t5-large", "model_type": "seq2seq", "rank": 16, "alpha": 32,
        "target_modules": ["q", "v"], "source": "https://huggingface.co/lorahub", "modules": modules,
    }
    write_manifest(out, manifest)
    return out
