"""Fault injection: start a ``lorahub`` command as a subprocess, SIGKILL it at random moments, rerun it to the end,
and check what it left: nothing partial, everything parses, nothing duplicated, the same output as an
uninterrupted run.

Used by tests/test_faults.py (2 kills per command, for CI) and benchmarks/fault_injection.py (N kills). Every
command runs on tiny inputs built here (:func:`make_inputs`: a 2-layer random Llama with a 400-token BPE
tokenizer, 3 random LoRA modules, few-shot examples, a 2-task BBH-style folder, a task pool), so a run takes
seconds, most of it the subprocess importing torch.

The kill delay of trial k is drawn uniformly in [0, T) (``random.Random(seed)``), T the command's measured
uninterrupted duration; each trial starts from an empty folder, is killed once, and is then rerun to completion.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
WORDS = ["red", "green", "blue", "yes", "no"]
EXAMPLES = [
    {"input": "Q: What is 2 plus 2?\nA:", "output": "4"},
    {"input": "Q: Name the capital of France.\nA:", "output": "Paris"},
    {"input": "Q: Is the sky blue?\nA:", "output": "yes"},
    {"input": "Q: Spell cat backwards.\nA:", "output": "tac"},
    {"input": "Q: What colour is grass?\nA:", "output": "green"},
]


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Paths of the tiny inputs every command runs on."""

    root: Path
    base: Path
    modules: list[Path]
    examples: Path
    bbh: Path
    pool: Path
    tasks: Path


def make_inputs(root: Path) -> Inputs:
    """Write the tiny base model, modules and data sets under ``root`` (about a second)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import make_module, tiny_model_and_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    model.config.name_or_path = str(base)
    modules = [make_module(model, root / f"mod{i}", seed=i, base_name=str(base)) for i in range(3)]
    examples = root / "examples.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    bbh = root / "bbh"
    bbh.mkdir()
    for k, name in enumerate(["alpha", "beta"]):
        ex = [{"input": f"not {WORDS[(i + k) % 2]} and {WORDS[i % 2]} is", "target": WORDS[(i * 7 + k) % 2]}
              for i in range(12)]
        (bbh / f"{name}.json").write_text(json.dumps({"canary": "x", "examples": ex}))
    (bbh / "task_prefixes.json").write_text(json.dumps({"alpha": "Evaluate it.", "beta": "Evaluate it again."}))
    pool = root / "pool"
    (pool / "tasks").mkdir(parents=True)
    for k, name in enumerate(["task0", "task1", "task2"]):
        rows = [json.dumps({"input": f"{name} {i}?", "target": WORDS[(i + k) % 5], "choices": WORDS}) for i in range(16)]
        (pool / "tasks" / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    (pool / "index.json").write_text(json.dumps({n: {"kind": "multiple_choice", "source": "test"}
                                                 for n in ["task0", "task1", "task2"]}))
    tasks = root / "tasks"
    tasks.mkdir()
    for k, name in enumerate(["alpha", "beta", "gamma"]):
        rows = [{"input": f"Q: {name} {i} {WORDS[i % 5]}?\nA:", "output": WORDS[(i + k) % 5]} for i in range(16)]
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Inputs(root, base, modules, examples, bbh, pool, tasks)


# -- what a command's output must look like -----------------------------------------------------------


def read_jsonl_strict(path: Path) -> list[dict]:
    """Every line of a JSONL file, which must all be whole JSON objects (raises otherwise)."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        raise ValueError(f"{path}: the last line is cut")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-6) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def close(a: Any, b: Any, tol: float = 1e-6) -> bool:
    """Equal, with floats (also inside lists and dicts) to ``tol``."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol * max(1.0, abs(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    return a == b


@dataclass
class Command:
    """A lorahub command, the output it writes in a trial folder, and how to read and check that output."""

    name: str
    argv: Callable[[Path], list[str]]  # trial folder -> lorahub arguments
    outputs: list[str]  # names the command may leave in the trial folder (the output and its siblings)
    snapshot: Callable[[Path], dict[str, Any]]  # trial folder -> the output's deterministic content
    duplicates: Callable[[Path], list[str]]  # trial folder -> duplicated rows, modules or steps
    out: str = "out"  # the output folder the command locks, relative to the trial folder


def compose_snapshot(trial: Path) -> dict[str, Any]:
    out = trial / "out"
    record = json.loads((out / "lorahub.json").read_text())
    return {"files": sorted(p.name for p in out.iterdir()), "tensors": tensors(out / "adapter_model.safetensors"),
            "weights": record["weights"], "loss": record["loss"], "evaluations": record["evaluations"],
            "best": json.loads((out / "best_weights.json").read_text())["weights"],
            "config": json.loads((out / "adapter_config.json").read_text())}


def hub_snapshot(trial: Path) -> dict[str, Any]:
    manifest = json.loads((trial / "hub" / "tiny.json").read_text())
    keep = ("name", "task", "location", "train_loss", "base_em", "module_em", "train_examples", "heldout_examples")
    return {"modules": [{k: e.get(k) for k in keep} for e in manifest["modules"]],
            "rejected": [r.get("name", r.get("task")) for r in manifest.get("rejected", [])],
            "folders": sorted(p.name for p in (trial / "hub" / "tiny").iterdir() if p.is_dir()),
            "tensors": {e["name"]: tensors(trial / "hub" / e["location"] / "adapter_model.safetensors")
                        for e in manifest["modules"]}}


def hub_duplicates(trial: Path) -> list[str]:
    manifest = json.loads((trial / "hub" / "tiny.json").read_text())
    names = [e["name"] for e in manifest["modules"]] + [r.get("name", r.get("task")) for r in manifest.get("rejected", [])]
    return sorted({n for n in names if names.count(n) > 1})


BBH_FIELDS = ("task", "method", "seed", "predictions", "em", "evals", "n_test", "n_learn", "config", "spec")


def bbh_snapshot(trial: Path) -> dict[str, Any]:
    rows = read_jsonl_strict(trial / "out" / "results.jsonl")
    return {"rows": {json.dumps([r.get(k) for k in BBH_FIELDS]) for r in rows},  # a set: order is not part of it
            "floats": {json.dumps([r["task"], r["method"], r["seed"]]): {"loss": r.get("loss"), "weights": r.get("weights")}
                       for r in rows},
            "config": json.loads((trial / "out" / "config.json").read_text()),
            "summary": (trial / "out" / "summary.md").is_file()}


def bbh_duplicates(trial: Path) -> list[str]:
    keys = [(r["task"], r["method"], r["seed"]) for r in read_jsonl_strict(trial / "out" / "results.jsonl")]
    return sorted({str(k) for k in keys if keys.count(k) > 1})


def train_snapshot(trial: Path) -> dict[str, Any]:
    out = trial / "out"
    quality = json.loads((out / "quality.json").read_text())
    return {"mixlora": tensors(out / "mixlora" / "mixlora_model.safetensors"),
            "lora": tensors(out / "lora" / "mixlora_model.safetensors"),
            "quality": quality["tasks"], "average": quality["average"],
            "steps": [r["step"] for r in read_jsonl_strict(out / "train_log.jsonl")],
            "losses": [r["loss"] for r in read_jsonl_strict(out / "train_log.jsonl")],
            "checkpoint": json.loads((out / "checkpoint" / "checkpoint.json").read_text())["step"]}


def train_duplicates(trial: Path) -> list[str]:
    steps = [r["step"] for r in read_jsonl_strict(trial / "out" / "train_log.jsonl")]
    return sorted({f"step {s}" for s in steps if steps.count(s) > 1})


def hub_build_flags() -> list[str]:
    """``--no-embed`` where the build embeds modules by default (it would load a sentence embedder)."""
    from dataclasses import fields

    from lorahub.cli.hub import HubBuildConfig

    return ["--no-embed"] if "embed" in {f.name for f in fields(HubBuildConfig)} else []


def commands(inp: Inputs) -> dict[str, Command]:
    """compose (--out), hub build, bbh and train, each on the tiny inputs."""
    mods = [str(m) for m in inp.modules]
    return {
        "compose": Command(
            "compose",
            lambda t: ["compose", "--examples", str(inp.examples), "--modules", *mods, "--base-model", str(inp.base),
                       "--budget", "8", "--population", "4", "--optimizer", "cma", "--seed", "1", "--out", str(t / "out"), "--no-progress"],
            ["out"], compose_snapshot, lambda t: []),
        "hub build": Command(
            "hub build",
            lambda t: ["hub", "build", "--tasks", str(inp.pool), "--out", str(t / "hub" / "tiny"), "--base-model",
                       str(inp.base), "--rank", "4", "--alpha", "8", "--steps", "6", "--batch-size", "2",
                       "--max-length", "64", "--heldout", "4", "--eval-examples", "4", "--no-require-improvement",
                       *hub_build_flags(), "--no-progress"],
            ["hub"], hub_snapshot, hub_duplicates, "hub/tiny"),
        "bbh": Command(
            "bbh",
            lambda t: ["bbh", "--out", str(t / "out"), "--data-dir", str(inp.bbh), "--base-model", str(inp.base),
                       "--modules", *mods, "--limit", "3", "--methods", "zero-shot,best-single,lorahub-default",
                       "--seeds", "1,2", "--budget", "8", "--threads", "1", "--no-progress"],
            ["out"], bbh_snapshot, bbh_duplicates),
        "train": Command(
            "train",
            lambda t: ["train", "--method", "mixlora", "lora", "--tasks", str(inp.tasks), "--out", str(t / "out"),
                       "--base-model", str(inp.base), "--experts", "4", "--top-k", "2", "--rank", "2", "--steps", "12",
                       "--batch-size", "2", "--max-length", "64", "--heldout", "4", "--eval-examples", "3",
                       "--save-every", "3", "--threads", "1", "--quiet"],
            ["out"], train_snapshot, train_duplicates),
    }


# -- running and killing ------------------------------------------------------------------------------


def env() -> dict[str, str]:
    """The subprocesses' environment: one thread, offline, the repository's lorahub first on the path."""
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return e


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "lorahub.cli", *argv], cwd=REPO, env=env(),
                                stdout=f, stderr=subprocess.STDOUT)


def run_to_end(argv: list[str], log: Path, timeout: float = 300) -> float:
    """Run to completion; return its wall time; raise with the log's tail if it fails."""
    t0 = time.perf_counter()
    proc = start(argv, log)
    rc = proc.wait(timeout=timeout)
    if rc != 0:
        raise RuntimeError(f"lorahub {' '.join(argv[:2])} exited {rc}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def run_in_process(argv: list[str], log: Path) -> float:
    """The same run through ``lorahub.cli.main`` in this process (no interpreter start-up: cheaper in CI)."""
    import contextlib

    import torch

    from lorahub.cli import main

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"lorahub {' '.join(argv[:2])} exited {rc}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def kill_after(argv: list[str], log: Path, delay: float) -> int | None:
    """Start the command and SIGKILL it after ``delay`` s; its pid, or None if it had already ended by then."""
    proc = start(argv, log)
    try:
        proc.wait(timeout=delay)
        return None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)  # no clean-up of any kind, like a crash or the OOM killer
        proc.wait()
        return proc.pid


def held_lock(out: Path, pid: int) -> bool:
    """Whether process ``pid`` had taken the lock of ``out`` (it writes its pid there once it holds it)."""
    from lorahub.files import lock_file

    path = lock_file(out)
    return path.is_file() and path.read_text().split("\n", 1)[0] == str(pid)


def leftovers(trial: Path, allowed: list[str]) -> list[str]:
    """Temp files or folders anywhere under ``trial``, and names beside the output that the command does not own."""
    from lorahub.files import TEMP_NAME

    bad = [str(p.relative_to(trial)) for p in trial.rglob("*")
           if TEMP_NAME.match(p.name) or ".tmp-" in p.name or ".old-" in p.name]
    bad += [p.name for p in trial.iterdir() if p.name not in allowed and p.name != "log.txt"]
    return sorted(set(bad))


def unparsable(trial: Path) -> list[str]:
    """JSON, JSONL and safetensors files under ``trial`` that do not read back whole."""
    bad = []
    for p in sorted(trial.rglob("*")):
        try:
            if p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
            elif p.suffix == ".jsonl":
                read_jsonl_strict(p)
            elif p.suffix == ".safetensors":
                tensors(p)
        except Exception as e:  # noqa: BLE001  # any failure to read is the finding
            bad.append(f"{p.relative_to(trial)}: {type(e).__name__}: {str(e)[:100]}")
    return bad


def mismatches(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Keys whose content differs from the uninterrupted run's (tensors to 1e-6, floats to 1e-6 relative)."""
    import torch

    bad = []
    for k in ref:
        a, b = ref[k], got.get(k)
        if isinstance(a, dict) and a and all(isinstance(v, torch.Tensor) for v in a.values()):
            ok = isinstance(b, dict) and same_tensors(a, b)
        elif isinstance(a, dict) and a and all(isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values())
                                               for v in a.values()):
            ok = isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[n], b[n]) for n in a)
        else:
            ok = close(a, b)
        if not ok:
            bad.append(k)
    return bad


@dataclass
class Counts:
    """What :func:`inject` found for one command."""

    command: str
    trials: int = 0
    kills: int = 0  # trials whose process was still running when killed
    kills_at_work: int = 0  # of which the process had taken its output's lock (start-up and imports were done)
    ended_before_kill: int = 0
    survived: int = 0  # killed, rerun to the end, and nothing below was found
    duplicates: int = 0  # trials with a duplicated row, module or step
    partial: int = 0  # trials with a temp file left, or a name beside the output that is not the command's
    unparsable: int = 0  # trials with a JSON / JSONL / safetensors file that does not read back whole
    mismatches: int = 0  # trials whose final output differs from the uninterrupted run's
    failed_reruns: int = 0  # trials whose rerun did not finish with status 0
    seconds: float = 0.0  # the uninterrupted run's wall time (the kill delays are drawn below it)
    findings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inject(command: Command, work: Path, n: int, seed: int = 0, *, rerun_in_process: bool = False) -> Counts:
    """Kill ``command`` at ``n`` random moments (each in a fresh folder), rerun it to the end, check each output.

    ``rerun_in_process``: rerun through :func:`run_in_process` rather than a new interpreter (the kill and the
    uninterrupted reference run are always subprocesses).
    """
    counts = Counts(command.name)
    ref_dir = work / "reference"
    ref_dir.mkdir(parents=True)
    counts.seconds = run_to_end(command.argv(ref_dir), ref_dir / "log.txt")
    reference = command.snapshot(ref_dir)
    rng = random.Random(f"{seed}:{command.name}")  # each command its own moments
    rerun = run_in_process if rerun_in_process else run_to_end
    for k in range(n):
        trial = work / f"trial{k}"
        trial.mkdir()
        log = trial / "log.txt"
        delay = rng.uniform(0, counts.seconds)
        counts.trials += 1
        pid = kill_after(command.argv(trial), log, delay)
        killed = pid is not None
        counts.kills += killed
        counts.kills_at_work += killed and held_lock(trial / command.out, pid)
        counts.ended_before_kill += not killed
        try:
            rerun(command.argv(trial), log)
        except Exception as e:  # noqa: BLE001
            counts.failed_reruns += 1
            counts.findings.append(f"trial {k} (kill at {delay:.2f} s): rerun failed: {e}")
            continue
        found = {"partial": leftovers(trial, command.outputs), "unparsable": unparsable(trial)}
        try:
            found["duplicates"] = command.duplicates(trial)
            found["mismatches"] = mismatches(reference, command.snapshot(trial))
        except Exception as e:  # noqa: BLE001  # an output that cannot even be read is a mismatch
            found["mismatches"] = [f"{type(e).__name__}: {e}"]
        for kind, items in found.items():
            if items:
                setattr(counts, kind, getattr(counts, kind) + 1)
                counts.findings.append(f"trial {k} (kill at {delay:.2f} s): {kind}: {items[:5]}")
        counts.survived += killed and not any(found.values())
    return counts
