"""A BBH run: a list of independent jobs (task, method, seed), run in process or on Ray, resumable.

``OUT/``::

    config.json      the protocol (data sha, split, shots, limit, base model, dtype) and each method's spec
    results.jsonl    one line per finished job, appended (one write + fsync) as each job ends
    summary.md       Table-1-style summary, per-task table, speed      (rewritten at the end of each run)
    per_task.png     per-task exact match by method

A rerun with the same OUT skips every job already in results.jsonl. A rerun whose protocol differs, or
that gives a method already in OUT other settings (budget, hub, adapter), is refused: results of two
configurations are never mixed. A crash can at worst leave a partial last line, which is dropped. A run
holds OUT's lock (:func:`lorahub.files.output_lock`) from start to end, so a second run on the same OUT is
refused at once instead of running the same jobs and appending them twice; with Ray only the driver writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..files import append_line, atomic_write_json, output_lock, read_json
from ..errors import LorahubError, LorahubValueError
from ..models import default_device
from ..optimize import SearchConfig
from . import bbh, report
from .methods import DEFAULT_METHODS, Method, Worker, adapter_method, get_method

Job = tuple[str, str, "int | None"]  # (task, method, seed); seed None for methods that do not use one
RESULTS, CONFIG = "results.jsonl", "config.json"  # summary.md and per_task.png: lorahub.bench.report
DEFAULT_SEEDS = [1, 2, 3, 4, 5]  # LoraHub's reproduce_bbh.py


@dataclass
class BBHConfig:
    """Options of ``lorahub bbh``.

    Args:
        out: results folder (resumable; a different configuration is refused).
        tasks: BBH tasks to run (None: all 27 in the data folder).
        methods: method names (see :mod:`lorahub.bench.methods`); ``adapters`` add ``adapter:NAME`` rows.
        seeds: seeds of the seeded methods (LoraHub: 1..5); seedless methods run once.
        limit: test examples per task (None: all but the learning examples).
        base_model: HF id or path (None: the hub's base model).
        hub: hub name or manifest path (None: the default hub); or module folders (a list).
        budget: candidate evaluations of lorahub-default (lorahub-reference keeps LoraHub's 40).
        device: torch device (None: cuda if available).
        data_dir: BBH data folder (None: the package's lorahub/bench/data).
        adapters: PEFT LoRA or MixLoRA folders evaluated as methods ``adapter:<folder name>``.
        shots, split_seed: learning examples per task and the seed that draws them.
        batch_size: prompts per generation batch.
        threads: torch CPU threads per process (None: torch's default).
        ray, ray_address, ray_actors: run the jobs on Ray actors (each loads the model and hub once).
        progress: progress bars (per job and overall).
        reuse_from: an earlier results folder of the same protocol whose rows of hub-independent methods
            (zero-shot, icl, majority, ...) with the same settings are copied rather than rerun: a new hub
            changes nothing for them.
    """

    out: str = field(metadata={"help": "results folder; a rerun with the same folder skips finished jobs"})
    tasks: list[str] | None = field(default=None, metadata={"help": "comma-separated BBH tasks (default: all 27)"})
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS),
                               metadata={"help": "comma-separated methods"})
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS),
                             metadata={"help": "comma-separated seeds of the seeded methods (lorahub-*)"})
    limit: int | None = field(default=None, metadata={"help": "test examples per task, for quick runs"})
    base_model: str | None = field(default=None, metadata={"help": "HF id or local path (default: the hub's base)"})
    hub: Any = field(default=None, metadata={"help": "module hub name or manifest path (default: the default hub)"})
    budget: int = field(default=SearchConfig.budget, metadata={"help": "candidate evaluations of lorahub-default"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available)"})
    data_dir: str | None = field(default=None, metadata={"help": "BBH data folder (default: the package's lorahub/bench/data)"})
    adapters: list[str] = field(default_factory=list, metadata={"help": "PEFT LoRA or MixLoRA folders to evaluate as methods adapter:<folder name>"})
    shots: int = field(default=bbh.SHOTS, metadata={"help": "learning examples per task"})
    split_seed: int = field(default=bbh.SPLIT_SEED, metadata={"help": "seed that draws the learning examples"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generation batch"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process (and per Ray actor)"})
    ray: bool = field(default=False, metadata={"help": "run the jobs on Ray actors (needs the ray extra: pip install 'lorahub[ray]')"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: a local cluster); implies --ray"})
    ray_actors: int | None = field(default=None, metadata={"help": "Ray actors (default: one per GPU, else per CPU)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    reuse_from: str | None = field(default=None, metadata={
        "help": "an earlier --out folder of the same protocol: its rows of methods that do not use the hub (same "
                "settings) are copied, marked reused_from, instead of rerun"})

    def __post_init__(self) -> None:
        for name in ("budget", "shots", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LorahubValueError(f"`{name}` should be a positive integer, but the value passed is {getattr(self, name)!r}")
        for name in ("limit", "threads", "ray_actors"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise LorahubValueError(f"`{name}` should be a positive integer, but the value passed is {v!r}")
        if not self.methods and not self.adapters:
            raise LorahubValueError("no methods given; choose some with --methods or --adapter")
        if not self.seeds:
            raise LorahubValueError("no seeds given; --seeds needs at least one integer")
        for m in self.methods:
            get_method(m)  # an unknown name lists the available ones
        if self.ray_address and not self.ray:
            self.ray = True


# -- configuration and resumability -------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def hub_fingerprint(store: Any) -> dict[str, Any]:
    """Name, size and a sha256 over (module, weights sha256): a hub that changed is another configuration."""
    lines = [f"{name}:{store.weights_sha256(name)}" for name in store.names]
    return {"name": store.name or "module folders", "modules": len(lines),
            "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]}


def check_config(out: Path, protocol: dict[str, Any], specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Write ``out/config.json``, or check it: the same protocol, and the same spec for methods it knows.

    Returns the specs of every method in ``out`` (this run's and earlier runs').
    """
    path = out / CONFIG
    known: dict[str, Any] = {}
    if path.is_file():
        saved = read_json(path, "bbh run config")
        if saved.get("protocol") != protocol:
            diff = [f"{k}: {saved['protocol'].get(k)!r} -> {protocol.get(k)!r}"
                    for k in sorted(set(protocol) | set(saved.get("protocol", {})))
                    if saved.get("protocol", {}).get(k) != protocol.get(k)]
            raise LorahubValueError(
                f"{path} was written by a different configuration ({'; '.join(diff)}); its results would be mixed "
                "with these. Choose another --out, or delete that folder to start again."
            )
        known = saved.get("methods", {})
        for name, spec in specs.items():
            if name in known and known[name] != spec:
                diff = [f"{k}: {known[name].get(k)!r} -> {spec.get(k)!r}" for k in sorted(set(spec) | set(known[name]))
                        if known[name].get(k) != spec.get(k)]
                raise LorahubValueError(
                    f"{path}: method {name!r} already has results with other settings ({'; '.join(diff)}). "
                    "Choose another --out, or delete that folder to start again."
                )
    merged = {**known, **specs}
    atomic_write_json(path, {"fingerprint": _hash(protocol), "protocol": protocol, "methods": merged})
    return merged


def reusable_rows(source: Path, protocol: dict[str, Any], specs: dict[str, dict[str, Any]], done: set[Job],
                  wanted: set[Job]) -> list[dict[str, Any]]:
    """Rows of ``source`` (an earlier ``lorahub bbh --out``) that this run can take as its own: the same protocol
    (data, split, limit, base model, dtype), a method that does not use the hub with the same spec, a job this
    run plans and has not done. Each is marked ``reused_from``; its ``config`` and ``spec`` hashes stay equal."""
    if not (source / CONFIG).is_file():
        raise LorahubValueError(f"--reuse-from {source}: no {CONFIG} there; give the --out folder of an earlier run")
    saved = read_json(source / CONFIG, "bbh run config")
    if saved.get("protocol") != protocol:
        diff = [f"{k}: {saved['protocol'].get(k)!r} vs {protocol.get(k)!r}" for k in sorted(protocol)
                if saved.get("protocol", {}).get(k) != protocol.get(k)]
        raise LorahubValueError(f"--reuse-from {source}: a different protocol ({'; '.join(diff)}); its rows are not "
                                "this run's")
    same = {m for m, spec in specs.items() if "hub" not in spec and saved.get("methods", {}).get(m) == spec}
    return [{**r, "reused_from": str(source)} for r in read_results(source / RESULTS, repair=False)
            if r["method"] in same and job_key(r) in wanted and job_key(r) not in done]


def copy_seed_rows(path: Path, rows: list[dict[str, Any]], p: "Plan", done: set[Job]) -> list[dict[str, Any]]:
    """For the methods of ``p.copied``: append, for each of ``rows`` of the first seed, a copy for every other
    seed not yet in ``done`` (marked ``same_as_seed``); returns the copies. Run after each saved row and at the
    start (a copy lost in a crash is made again)."""
    copies = []
    for row in rows:
        targets = p.copied.get(row["method"], [])
        if targets and row["seed"] not in targets and row.get("same_as_seed") is None and row["task"] in p.tasks:
            for seed in targets:
                if (row["task"], row["method"], seed) not in done:
                    copy = {**row, "seed": seed, "same_as_seed": row["seed"]}
                    append_result(path, copy)
                    copies.append(copy)
    return copies


def read_results(path: Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """The finished jobs; a partial last line (a crash during the write) is skipped, and with ``repair``
    cut off the file (never while another process may be appending: pass ``repair=False`` then)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    rows, good = [], 0
    for lineno, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            break  # the partial tail of an interrupted write (every line is written with its newline): dropped
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise LorahubValueError(f"{path}: line {lineno} is not valid JSON; fix or delete the file") from None
        good += len(line)
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one line with a single write, flushed to disk before the next job starts."""
    append_line(path, json.dumps(row, ensure_ascii=False), sync=True)


def job_key(row: dict[str, Any]) -> Job:
    return (row["task"], row["method"], row["seed"])


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything a run resolved before starting: tasks, methods, jobs, protocol and device."""

    tasks: dict[str, bbh.TaskSplit]
    methods: dict[str, Method]
    jobs: list[Job]
    protocol: dict[str, Any]
    base_model: str
    device: str
    store: Any = None  # the hub as fingerprinted, handed to the workers (a hub being built may grow meanwhile)
    copied: dict[str, list[int]] = field(default_factory=dict)  # method -> seeds whose rows copy the first seed's


def resolve_methods(cfg: BBHConfig, hub_store: Callable[[], Any]) -> dict[str, Method]:
    """The run's methods with their final specs (budget of lorahub-default, hub fingerprint, adapter sha)."""
    methods: dict[str, Method] = {}
    for name in cfg.methods:
        m = get_method(name)
        spec = dict(m.spec)
        if name == "lorahub-default":
            spec["budget"] = cfg.budget
        if m.uses_hub:
            spec["hub"] = hub_fingerprint(hub_store())
        methods[name] = replace(m, spec=spec)
    for folder in cfg.adapters:
        m = adapter_method(folder)
        if m.name in methods:
            raise LorahubValueError(f"two adapters are both named {m.name!r}; rename one folder")
        methods[m.name] = m
    return methods


def plan(cfg: BBHConfig, device: str) -> Plan:
    import torch

    from ..loading import resolve_store
    from ..models import DEFAULT_BASE_MODEL, default_dtype

    store: list[Any] = []

    def hub_store() -> Any:
        if not store:
            store.append(resolve_store(cfg.hub))
        return store[0]

    methods = resolve_methods(cfg, hub_store)
    base = cfg.base_model or (hub_store().base_model if any(m.uses_hub for m in methods.values()) or cfg.hub else None)
    base = base or DEFAULT_BASE_MODEL
    names = list(dict.fromkeys(cfg.tasks)) if cfg.tasks else bbh.task_names(cfg.data_dir)
    tasks = {t: bbh.load_task(t, cfg.data_dir, shots=cfg.shots, seed=cfg.split_seed, limit=cfg.limit) for t in names}
    # a seeded method whose seed changes nothing here runs its first seed only; the other seeds' rows are copies
    copied = {name: list(cfg.seeds[1:]) for name, m in methods.items()
              if m.seeded and m.seed_used is not None and len(cfg.seeds) > 1 and not m.seed_used(m.spec, hub_store())}
    jobs = [(t, name, seed) for t in names for name, m in methods.items()
            for seed in (cfg.seeds[:1] if name in copied else cfg.seeds if m.seeded else [None])]
    protocol = {
        "benchmark": "bbh", "protocol_version": bbh.PROTOCOL_VERSION, "data_sha256": bbh.data_fingerprint(cfg.data_dir),
        "shots": cfg.shots, "split_seed": cfg.split_seed, "limit": cfg.limit, "base_model": base,
        "dtype": str(default_dtype(torch.device(device))).replace("torch.", ""),
    }
    return Plan(tasks, methods, jobs, protocol, base, device, store[0] if store else None, copied)


def run_bbh(cfg: BBHConfig, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or resume) the configured jobs into ``cfg.out``; write summary.md and per_task.png; return all rows.

    The whole run holds ``cfg.out``'s lock: a second run on the same folder raises
    :class:`~lorahub.errors.LorahubBusyError` (naming the holder's pid) before it writes anything.
    """
    out = Path(cfg.out)
    with output_lock(out):
        return run_locked(cfg, out, log)


def run_locked(cfg: BBHConfig, out: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """:func:`run_bbh`'s work, once it holds the lock of ``out``."""
    ray_ctx = _RayCluster(cfg) if cfg.ray else None
    try:
        device = cfg.device or (ray_ctx.device if ray_ctx else str(default_device()))
        p = plan(cfg, device)
        out.mkdir(parents=True, exist_ok=True)
        specs = {name: {**m.spec, "seeded": m.seeded} for name, m in p.methods.items()}
        all_specs = check_config(out, p.protocol, specs)
        fingerprint = _hash(p.protocol)
        existing = read_results(out / RESULTS)
        done = {job_key(r) for r in existing}
        if cfg.reuse_from:
            reused = reusable_rows(Path(cfg.reuse_from), p.protocol, specs, done, set(p.jobs))
            for row in reused:
                append_result(out / RESULTS, row)
            existing += reused
            done |= {job_key(r) for r in reused}
            log(f"bbh: {len(reused)} rows reused from {cfg.reuse_from} (methods that do not use the hub, same protocol)")
        done |= {job_key(r) for r in copy_seed_rows(out / RESULTS, existing, p, done)}
        todo = [j for j in p.jobs if j not in done]
        if p.copied:
            log(f"bbh: {', '.join(p.copied)}: the seed changes nothing here (deterministic selection and search), so "
                f"seed {cfg.seeds[0]} runs and seeds {', '.join(map(str, cfg.seeds[1:]))} copy its rows")
        log(f"bbh: {len(p.tasks)} tasks x {len(p.methods)} methods = {len(p.jobs)} jobs; "
            f"{len(p.jobs) - len(todo)} already in {out / RESULTS}, {len(todo)} to run "
            f"({'ray' if ray_ctx else 'in process'}, device {device}, base {p.base_model})")

        def save(row: dict[str, Any]) -> None:
            row = {**row, "config": fingerprint, "spec": _hash(specs[row["method"]])}
            append_result(out / RESULTS, row)
            done.update(job_key(r) for r in copy_seed_rows(out / RESULTS, [row], p, done))

        if todo:
            worker_args = dict(base_model=p.base_model, hub=p.store or cfg.hub, device=device, threads=cfg.threads,
                               batch_size=cfg.batch_size)
            if ray_ctx:
                ray_ctx.run(todo, p, worker_args, save, progress=cfg.progress)
            else:
                _run_in_process(todo, p, worker_args, save, progress=cfg.progress)
    finally:
        if ray_ctx:
            ray_ctx.close()
    rows = read_results(out / RESULTS)
    text = report.write_report(out, rows, p.protocol, all_specs)
    log(text)
    return rows


def report_bbh(out: str | os.PathLike, *, methods: list[str] | None = None, log: Callable[[str], None] = print) -> str:
    """Rewrite ``out``'s summary.md and per_task.png from its results so far, running nothing.

    Safe beside a run that is still writing to ``out`` (results.jsonl is only read), so a long run can be
    looked at, or its partial results published, before it ends. ``methods``: only these methods' rows (a
    method run later, in another pass, would otherwise hold a partial table to the tasks it has finished);
    the summary names the methods it leaves out.
    """
    out = Path(out)
    if not (out / CONFIG).is_file():
        raise LorahubValueError(f"{out} has no {CONFIG}: not a `lorahub bbh --out` folder, or no run has started there")
    saved = read_json(out / CONFIG, "bbh run config")
    rows = read_results(out / RESULTS, repair=False)
    specs = saved.get("methods", {})
    left_out: Counter[str] = Counter()
    if methods is not None:
        present = sorted({r["method"] for r in rows})
        unknown = [m for m in methods if m not in present]
        if unknown:
            raise LorahubValueError(f"{out} has no results of {', '.join(unknown)}; it has {', '.join(present)}")
        left_out = Counter(r["method"] for r in rows if r["method"] not in methods)
        rows = [r for r in rows if r["method"] in methods]
        specs = {m: s for m, s in specs.items() if m in methods}
    text = report.write_report(out, rows, saved["protocol"], specs, left_out=left_out)
    log(text)
    return text


def _run_in_process(todo: list[Job], p: Plan, worker_args: dict, save: Callable[[dict], None], *, progress: bool) -> None:
    from ..progress import progress_bar

    worker = Worker(**worker_args, progress=progress)  # its bars open inside this one: inner bars, not kept
    bar = progress_bar(len(todo), "bbh jobs", progress, unit="job")
    try:
        for job in todo:
            bar.set_postfix_str(f"{job[0]} / {job[1]}" + ("" if job[2] is None else f" / seed {job[2]}"))
            save(worker.run(job, p.tasks[job[0]], p.methods[job[1]]))
            bar.update(1)
    finally:
        bar.close()


class _RayCluster:
    """A Ray cluster (``--ray-address``, or a local one started here and stopped at the end) and its actors."""

    def __init__(self, cfg: BBHConfig):
        try:
            import ray
        except ImportError:
            raise LorahubError("--ray needs Ray: pip install 'lorahub[ray]'") from None
        self.ray, self.cfg = ray, cfg
        self.started = False
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, include_dashboard=False, logging_level="WARNING")
            self.started = True
        res = ray.cluster_resources()
        self.gpus, self.cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
        self.device = "cuda" if self.gpus else "cpu"
        self.actors: list[Any] = []

    def run(self, todo: list[Job], p: Plan, worker_args: dict, save: Callable[[dict], None], *, progress: bool) -> None:
        from ray.util import ActorPool

        from ..progress import progress_bar

        cpus = self.cfg.threads or 1
        n = self.cfg.ray_actors or (self.gpus if self.gpus else max(1, self.cpus // cpus))
        n = min(n, len(todo))
        Actor = self.ray.remote(num_cpus=cpus, num_gpus=1 if self.gpus else 0)(Worker)
        self.actors = [Actor.remote(**worker_args) for _ in range(n)]  # each loads model and hub once, then many jobs
        tasks_ref = self.ray.put(p.tasks)
        bar = progress_bar(len(todo), f"bbh jobs ({n} ray actors)", progress, unit="job")
        try:
            pool = ActorPool(self.actors)
            for row in pool.map_unordered(lambda a, job: a.run_with.remote(job, tasks_ref, p.methods[job[1]]), todo):
                save(row)
                bar.set_postfix_str(f"{row['task']} / {row['method']}")
                bar.update(1)
        finally:
            bar.close()

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
