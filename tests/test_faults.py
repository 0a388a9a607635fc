"""Faults and concurrency: each long-running command SIGKILLed at random moments and rerun (nothing partial,
nothing duplicated, the uninterrupted run's output); one writer per output (a second process is refused at
once, naming the holder's pid); a killed holder's lock does not block the next run.

The kill trials are subprocesses on tiny inputs (tests/faults.py); benchmarks/fault_injection.py runs the same
checks with more kills.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faults
from lorahub.cli import main
from lorahub.errors import LorahubBusyError
from lorahub.files import lock_file


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> faults.Inputs:
    return faults.make_inputs(tmp_path_factory.mktemp("fault-inputs"))


@pytest.mark.parametrize("name", ["compose", "hub build", "bbh", "train"])
def test_killed_at_random_moments_then_rerun_gives_the_uninterrupted_output(name, inputs, tmp_path):
    counts = faults.inject(faults.commands(inputs)[name], tmp_path / "work", 2, seed=0, rerun_in_process=True)
    assert counts.trials == 2 and counts.failed_reruns == 0, counts.findings
    assert counts.findings == [], counts.findings  # no duplicates, partial outputs, unparsable files, mismatches
    assert counts.survived == counts.kills


def _wait_for_holder(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``proc`` holds the lock of ``out`` (its pid is in the lock file)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the first process ended (status {proc.returncode}) before it was seen holding the lock")
        path = lock_file(out)
        if path.is_file() and path.read_text().split("\n", 1)[0] == str(proc.pid):
            return
        time.sleep(0.02)
    pytest.fail("the first process never took the lock")


def _one_line_refusal(err: str, out: Path, pid: int) -> None:
    assert err.startswith("lorahub: error: ") and err.count("\n") == 1, err
    assert str(out) in err and f"pid {pid}" in err and "another lorahub process" in err


def test_two_bbh_runs_on_one_out_leave_one_row_per_job(inputs, tmp_path, capsys):
    argv = faults.commands(inputs)["bbh"].argv(tmp_path)
    out = tmp_path / "out"
    first = faults.start(argv, tmp_path / "log.txt")
    try:
        _wait_for_holder(out, first)
        t0 = time.perf_counter()
        assert main(argv) == 2  # the second run: refused at once, before it runs or writes anything
        assert time.perf_counter() - t0 < 5
        _one_line_refusal(capsys.readouterr().err, out, first.pid)
        assert first.wait(timeout=180) == 0, (tmp_path / "log.txt").read_text()[-2000:]
    finally:
        first.kill()
    rows = faults.read_jsonl_strict(out / "results.jsonl")
    keys = [(r["task"], r["method"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * (2 + 2)  # 2 tasks x (zero-shot, best-single, lorahub-default x 2 seeds)


HOLDER = """
import sys, time
from contextlib import ExitStack
from lorahub.files import output_lock
with ExitStack() as stack:
    for out in sys.argv[1:]:
        stack.enter_context(output_lock(out))
    print("held", flush=True)
    time.sleep(600)
"""


def test_compose_hub_build_train_refused_while_another_holds_the_output_and_run_once_it_is_killed(inputs, tmp_path,
                                                                                                   capsys):
    from lorahub import compose
    from lorahub.bench.runner import BBHConfig, run_bbh
    from lorahub.hub import build_hub

    cmds = faults.commands(inputs)
    outs = {"compose": tmp_path / "out", "hub build": tmp_path / "hub" / "tiny", "train": tmp_path / "out"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out"), str(tmp_path / "hub" / "tiny")],
                              stdout=subprocess.PIPE, text=True, env=faults.env(), cwd=faults.REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        for name, out in outs.items():
            assert main(cmds[name].argv(tmp_path)) == 2, name
            _one_line_refusal(capsys.readouterr().err, out, holder.pid)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written: no out/, no hub/, no manifest
        # the Python API takes the same lock
        with pytest.raises(LorahubBusyError, match=f"pid {holder.pid}"):
            compose(faults.EXAMPLES, [str(m) for m in inputs.modules], str(inputs.base), out_dir=tmp_path / "out")
        with pytest.raises(LorahubBusyError, match=f"pid {holder.pid}"):
            build_hub(inputs.pool, str(inputs.base), tmp_path / "hub" / "tiny", progress=False)
        with pytest.raises(LorahubBusyError, match=f"pid {holder.pid}"):
            run_bbh(BBHConfig(out=str(tmp_path / "out"), data_dir=str(inputs.bbh), hub=[str(m) for m in inputs.modules],
                              methods=["zero-shot"], base_model=str(inputs.base), progress=False), log=lambda s: None)
        assert list(tmp_path.iterdir()) == []
    finally:
        holder.kill()  # SIGKILL: the holder never releases its lock itself
        holder.wait()
    assert main(cmds["compose"].argv(tmp_path)) == 0  # the kernel released the flock: the next run goes ahead
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert lock_file(tmp_path / "out").read_text().split("\n")[:2] == [str(os.getpid()), str((tmp_path / "out").resolve())]
