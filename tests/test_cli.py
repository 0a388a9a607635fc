"""The CLI end to end on a tiny model: compose with a manifest hub, modules list/add/verify, errors."""

from __future__ import annotations

import json

import pytest

from lorahub.cli import main
from lorahub.errors import LorahubFileError
from lorahub.models import load_base

from conftest import EXAMPLES


@pytest.fixture()
def hub(tmp_path, llama_modules):
    manifest = tmp_path / "tiny-hub.json"
    for i, p in enumerate(llama_modules):
        assert main(["modules", "add", str(manifest), str(p), "--task", f"task{i}"]) == 0
    return manifest


def test_cli_compose_writes_adapter(tmp_path, hub, tiny_llama_dir, capsys):
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "adapter"
    code = main(["compose", "--examples", str(ex), "--eval-examples", str(ex), "--hub", str(hub), "--base-model",
                 str(tiny_llama_dir), "--budget", "8", "--population", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "weights:" in text and "held-out exact match (5 examples)" in text
    rec = json.loads((out / "lorahub.json").read_text())
    assert rec["evaluations"] == 8 + 4 and rec["probe_singles"] and rec["command"].startswith("lorahub compose --examples")
    assert "held_out" in rec and set(rec["weights"]) == {"mod0", "mod1", "mod2", "mod3"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_cli_yaml_config_and_flag_override(tmp_path, hub, tiny_llama_dir):
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"examples: {ex}\nhub: {hub}\nbase_model: {tiny_llama_dir}\nbudget: 4\npopulation: 4\nprogress: false\n")
    assert main(["compose", "--config", str(cfg), "--out", str(tmp_path / "o"), "--seed", "3"]) == 0
    assert json.loads((tmp_path / "o" / "lorahub.json").read_text())["seed"] == 3
    cfg.write_text("examples: x\nbudgett: 4\n")
    assert main(["compose", "--config", str(cfg), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_cli_errors_are_clear_and_write_nothing(tmp_path, hub, tiny_llama_dir, capsys):
    ex = tmp_path / "ex.jsonl"
    ex.write_text('{"input": "q", "output": ""}\n')
    out = tmp_path / "adapter"
    assert main(["compose", "--examples", str(ex), "--hub", str(hub), "--base-model", str(tiny_llama_dir),
                 "--out", str(out), "--no-progress"]) == 2
    assert "ex.jsonl:1: 'output' is empty" in capsys.readouterr().err
    assert not out.exists()
    assert main(["compose", "--examples", str(ex), "--out", str(out), "--budget", "4", "--population", "8"]) == 2
    assert "`budget` (4) is smaller than `population` (8)" in capsys.readouterr().err


def test_cli_modules_list_and_verify(hub, capsys):
    assert main(["modules", "list", "--hub", str(hub)]) == 0
    assert "task=task2" in capsys.readouterr().out
    assert main(["modules", "verify", "--hub", str(hub)]) == 0
    data = json.loads(hub.read_text())
    data["modules"][1]["sha256"] = "f" * 64
    hub.write_text(json.dumps(data))
    assert main(["modules", "verify", "--hub", str(hub)]) == 1
    assert "BAD  mod1" in capsys.readouterr().out


def test_base_model_not_found_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time otherwise
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LorahubFileError, match=r"base model 'nobody/no-such-model': hub repo .* is not in the local Hugging Face cache"):
        load_base("nobody/no-such-model")
