"""Inputs the model cannot take and files lorahub will not trust: each is one clear line naming the culprit,
and nothing partial is left behind.

Long examples (warned once, answer kept whole; an answer over the limit is an error), modules holding NaN/inf,
pickled ``.bin`` files (refused, never unpickled), broken manifest JSON (file and line, in every reader), a full
or read-only output location (simulated: we run as root, so chmod cannot make a folder read-only), and the
clean-up of what a killed writer left.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES, make_module, tiny_model_and_tokenizer
from lorahub.cli import main
from lorahub.data import encode, read_jsonl
from lorahub.errors import LorahubFileError, LorahubIntegrityError, LorahubValueError
from lorahub.files import append_line, atomic_dir, atomic_write_json, sweep_stale
from lorahub.store import ModuleStore, read_module


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lorahub" and r.levelno == logging.WARNING]


def test_long_example_is_warned_once_by_file_and_line_and_keeps_its_answer(tiny, tmp_path, caplog):
    _, tok = tiny
    f = tmp_path / "train.jsonl"
    long_input = "Q: " + "red green blue " * 40 + "?\nA:"
    f.write_text(json.dumps({"input": "Q: short?\nA:", "output": "yes"}) + "\n"
                 + json.dumps({"input": long_input, "output": "green"}) + "\n")
    examples = read_jsonl(f)
    answer = tok(" green", add_special_tokens=False).input_ids + [tok.eos_token_id]
    full = len(tok(long_input.rstrip(), add_special_tokens=True).input_ids) + len(answer)
    with caplog.at_level(logging.WARNING, logger="lorahub"):
        batch = encode(tok, examples, seq2seq=False, max_length=32)
        encode(tok, examples, seq2seq=False, max_length=32)  # the trainer encodes the same examples every step
    lines = _warnings(caplog)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"{f}:2 ({full} tokens)" in lines[0] and "32-token limit" in lines[0] and "cut from the left" in lines[0]
    assert batch.input_ids.shape[1] == 32 and batch.attention_mask[1].sum() == 32
    assert batch.labels[1][-len(answer):].tolist() == answer and (batch.labels[1] != -100).sum() == len(answer)
    assert batch.labels[0][batch.labels[0] != -100].tolist() == tok(" yes", add_special_tokens=False).input_ids + [tok.eos_token_id]

    f.write_text(json.dumps({"input": "Q: x?\nA:", "output": "red " * 40}) + "\n")
    with pytest.raises(LorahubValueError, match=rf"{f}:1: the answer alone is \d+ tokens, over the 32-token limit"):
        encode(tok, read_jsonl(f), seq2seq=False, max_length=32)
    with pytest.raises(LorahubValueError, match=r"task_examples\[0\]: the answer alone"):  # no file: the index
        from lorahub.data import as_examples

        encode(tok, as_examples([{"input": "Q: x?\nA:", "output": "red " * 40}]), seq2seq=False, max_length=32)


def test_compose_max_length_reaches_the_evaluator(tiny, tmp_path, caplog):
    from lorahub import compose
    from lorahub.config import ComposeConfig

    model, tok = tiny
    mods = [make_module(model, tmp_path / f"m{i}", seed=i) for i in range(2)]
    examples = EXAMPLES + [{"input": "Q: " + "blue " * 30 + "?\nA:", "output": "yes"}]
    with caplog.at_level(logging.WARNING, logger="lorahub"):
        comp = compose(examples, [str(m) for m in mods], (model, tok), budget=4, population=2, optimizer="cma", progress=False,
                       max_length=24)
    assert comp.record["max_length"] == 24
    assert any("task_examples[5]" in w and "24-token limit" in w for w in _warnings(caplog))
    assert ComposeConfig(examples="x", out="y", max_length=64).max_length == 64
    with pytest.raises(LorahubValueError, match="max_length"):
        ComposeConfig(examples="x", out="y", max_length=0)


def test_module_with_nan_or_inf_is_refused_naming_module_and_tensor(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = tiny
    folder = make_module(model, tmp_path / "bad", seed=0)
    weights = folder / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[1]
    state[key][0, 0] = float("inf")
    save_file(state, str(weights))
    with pytest.raises(LorahubValueError, match=rf"module 'bad': tensor '{key}' in .* holds NaN or inf"):
        read_module(folder)


def test_pickled_bin_is_refused_and_never_unpickled(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    model, _ = tiny
    folder = make_module(model, tmp_path / "legacy", seed=0)
    state = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**state, "extra": Payload()}, folder / "adapter_model.bin")
    with pytest.raises(LorahubIntegrityError) as e:
        read_module(folder)
    message = str(e.value)
    weights = folder / "adapter_model.bin"
    assert message.startswith(f"refused: {weights} holds Python objects, not plain tensors; lorahub never unpickles it")
    assert "\n" not in message and not marker.exists()
    # the only loading with weights_only=False is inside the conversion command, marked as for trusted files
    head, command = message.split("python -c ", 1)
    assert "weights_only=False" not in head and "trust" in head and "weights_only=False" in command
    manifest = tmp_path / "hub.json"
    assert main(["modules", "add", str(manifest), str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorahub: error: refused: {weights}") and err.count("\n") == 1 and not marker.exists()
    assert not manifest.exists()

    # the command converts a plain-tensor .bin (that the user trusts) into safetensors
    torch.save(state, weights)
    subprocess.run(f"{sys.executable} -c {command}", shell=True, check=True)
    weights.unlink()
    assert read_module(folder).rank == 4


def test_broken_manifest_json_names_file_and_line_in_every_reader(tmp_path, capsys):
    from lorahub.hub import build_hub

    manifest = tmp_path / "hub" / "tiny.json"
    manifest.parent.mkdir()
    manifest.write_text('{\n  "name": "tiny",\n  "modules": [,]\n}\n')
    where = rf"{manifest} is not valid JSON \(.* at line 3\)"
    with pytest.raises(LorahubValueError, match=where):
        ModuleStore.from_manifest(manifest)
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "t.jsonl").write_text('{"input": "a", "output": "b"}\n')
    with pytest.raises(LorahubValueError, match=where):  # the hub build's reader: before any model loads
        build_hub(pool, str(tmp_path / "no-model"), tmp_path / "hub" / "tiny", progress=False)
    for argv in (["hub", "report", str(manifest)], ["modules", "list", "--hub", str(manifest)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{manifest} is not valid JSON" in err and "line 3" in err


def _no_temp(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_full_or_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, tiny_llama_dir, llama_modules,
                                                               capsys):
    import lorahub.export
    import lorahub.files

    target = tmp_path / "record.json"
    atomic_write_json(target, {"v": 1})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(lorahub.files.os, "fsync", full)
        with pytest.raises(LorahubFileError, match=rf"cannot write {target}: No space left on device \(ENOSPC\)"):
            atomic_write_json(target, {"v": 2})
        with pytest.raises(LorahubFileError, match=r"cannot write .*results.jsonl: No space left"):
            append_line(tmp_path / "results.jsonl", "{}", sync=True)
    assert json.loads(target.read_text()) == {"v": 1} and _no_temp(tmp_path)

    folder = tmp_path / "adapter"
    with pytest.raises(LorahubFileError, match=rf"cannot write {folder}: Permission denied \(EACCES\)"):
        with atomic_dir(folder) as tmp:
            (tmp / "a.txt").write_text("half")
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    assert not folder.exists() and _no_temp(tmp_path)
    with monkeypatch.context() as m:  # the folder beside the output cannot even take a temp folder
        m.setattr(lorahub.files.tempfile, "mkdtemp", lambda **k: full())
        with pytest.raises(LorahubFileError, match=rf"cannot write {folder}: No space left"):
            with atomic_dir(folder):
                pass

    # the CLI: one line, exit 2, no temp folder beside or inside the output
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "composed"
    monkeypatch.setattr(lorahub.export, "write_adapter_files", full)
    assert main(["compose", "--examples", str(ex), "--modules", *map(str, llama_modules), "--base-model",
                 str(tiny_llama_dir), "--budget", "6", "--population", "2", "--optimizer", "cma", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err  # (transformers' own "Loading weights" bar may come before it)
    assert err.endswith("\n") and err.count("lorahub: error") == 1
    assert err.splitlines()[-1] == (f"lorahub: error: cannot write {out}: No space left on device (ENOSPC); nothing "
                                    "was left half-written there")
    assert _no_temp(tmp_path) and sorted(p.name for p in out.iterdir()) == ["best_weights.json"]


def test_a_killed_writers_leftovers_are_swept_and_an_interrupted_swap_is_undone(tmp_path):
    done = subprocess.Popen(["true"])
    done.wait()
    dead, alive = done.pid, os.getpid()
    (tmp_path / f".adapter.tmp-{dead}-x1y2").mkdir()  # atomic_dir's temp folder
    (tmp_path / f".adapter.tmp-{dead}-x1y2" / "adapter_model.safetensors").write_text("half")
    (tmp_path / f".adapter.old-{dead}").mkdir()  # killed between the two renames: adapter/ is missing
    (tmp_path / f".adapter.old-{dead}" / "lorahub.json").write_text("{}")
    (tmp_path / f".record.json.tmp-{dead}-abc").write_text("{")  # atomic_write_text's temp file
    (tmp_path / f".per_task.png.tmp-{dead}.png").write_text("")  # the BBH plot's
    (tmp_path / f".mine.tmp-{alive}-abc").write_text("")  # a live writer's: kept
    (tmp_path / ".hidden").write_text("")  # not lorahub's: kept
    swept = sweep_stale(tmp_path)
    assert len(swept) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".hidden", f".mine.tmp-{alive}-abc", "adapter"])
    assert (tmp_path / "adapter" / "lorahub.json").read_text() == "{}"

    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": ')  # a kill cut the last append
    append_line(log, '{"c": 3}')
    assert log.read_text() == '{"a": 1}\n{"c": 3}\n'
