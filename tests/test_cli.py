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
                 str(tiny_llama_dir), "--budget", "8", "--population", "4", "--optimizer", "cma", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "weights:" in text and "held-out exact match (5 examples)" in text
    rec = json.loads((out / "lorahub.json").read_text())
    assert rec["evaluations"] == 8 and rec["probe_singles"] and rec["command"].startswith("lorahub compose --examples")
    assert "held_out" in rec and set(rec["weights"]) == {"mod0", "mod1", "mod2", "mod3"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_cli_compose_defaults_print_the_weights_that_count(tmp_path, hub, tiny_llama_dir, capsys):
    """The defaults (auto selection, Cobyla): the selector that ran is named, zero weights are summed up in one line."""
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "adapter"
    assert main(["compose", "--examples", str(ex), "--hub", str(hub), "--base-model", str(tiny_llama_dir),
                 "--budget", "8", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    rec = json.loads((out / "lorahub.json").read_text())
    assert "optimizer cobyla:Cobyla" in text and "candidates: 4 by auto (random)" in text
    nonzero = {n: w for n, w in rec["weights"].items() if w != 0}
    shown = [line.split()[-1] for line in text.split("weights:\n")[1].splitlines() if line.startswith("  +")
             or line.startswith("  -")]
    assert sorted(shown) == sorted(nonzero)
    zero = len(rec["weights"]) - len(nonzero)
    assert (f"(the other {zero} candidates: weight 0" in text) == (zero > 0)


def test_cli_yaml_config_and_flag_override(tmp_path, hub, tiny_llama_dir):
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"examples: {ex}\nhub: {hub}\nbase_model: {tiny_llama_dir}\nbudget: 8\npopulation: 4\noptimizer: cma\nprogress: false\n")
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
    assert main(["compose", "--examples", str(ex), "--out", str(out), "--budget", "4", "--population", "8", "--optimizer", "cma"]) == 2
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


# -- one test per command group: flags from field metadata, --config, clear exit-2 errors, output folder checks


def _help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare on single spaces


def test_cli_compose_help_config_and_foreign_out(tmp_path, capsys):
    text = _help(capsys, ["compose"])
    assert "--budget N few-shot evaluations in all, single-module probes included (default: 40)" in text  # ComposeConfig's field help and default
    assert "--progress, --no-progress show progress bars (default: on)" in text and "--quiet" in text
    ex = tmp_path / "ex.jsonl"
    ex.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"examples: {ex}\nbudgett: 4\n")
    assert main(["compose", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['budgett']" in err and "Known keys:" in err and "budget, " in err
    # a folder lorahub did not write is refused at once: before the model loads (that base does not exist)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["compose", "--examples", str(ex), "--out", str(foreign), "--base-model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorahub: error: ") and err.count("\n") == 1 and "notes.txt" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"


def test_compose_progress_counts_probes_and_zero(tmp_path, llama_modules, tiny_llama, capsys):
    """One display: the bar counts w=0, the 4 single-module probes and the budget; off a terminal, plain lines."""
    from lorahub import compose

    compose(EXAMPLES, [str(p) for p in llama_modules], tiny_llama, budget=12, population=4, optimizer="cma", progress=True)
    captured = capsys.readouterr()
    assert "compose: 13/13 eval" in captured.err and "\r" not in captured.err and captured.out == ""


def test_progress_inner_bars_leave_no_lines(capsys):
    from lorahub.progress import progress_bar

    with progress_bar(2, "outer", unit="job") as outer:
        for _ in range(2):
            with progress_bar(3, "inner") as inner:
                inner.update(3)
            outer.update(1)
    with progress_bar(5, "off", enabled=False) as off:
        off.update(5)
    assert off.n == 5
    lines = capsys.readouterr().err.splitlines()  # stderr is no terminal here: plain lines, the outer bar's only
    assert len(lines) == 1 and lines[0].startswith("outer: 2/2 job")
    with progress_bar(1, "again") as bar:  # after the outer one closed, a bar is an outer bar again
        bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("again: 1/1 it")


def test_cli_modules_config_file(tmp_path, hub, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"hub: {hub}\n")
    assert main(["modules", "list", "--config", str(cfg)]) == 0
    assert "task=task2" in capsys.readouterr().out
    cfg.write_text("hubb: x\n")
    assert main(["modules", "verify", "--config", str(cfg)]) == 2
    assert "unknown key(s) ['hubb']. Known keys: hub" in capsys.readouterr().err


def test_cli_hub_report_names_and_foreign_out(tmp_path, capsys):
    from lorahub.cli.flags import parse_names

    manifest = tmp_path / "tiny.json"
    manifest.write_text(json.dumps({"name": "tiny", "modules": [
        {"name": "t1", "location": "t1", "train_loss": 0.5, "base_em": 0.1, "module_em": 0.4, "steps": 50, "size_bytes": 2**20}],
        "rejected": [{"task": "t2", "train_loss": 0.9, "base_em": 0.2, "module_em": 0.1}]}))
    assert main(["hub", "report", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "t1" in out and "rejected" in out and "mean of 1" in out
    text = _help(capsys, ["hub", "build"])
    assert "--target-modules" in text and "--targets" in text and "(default: q_proj,v_proj)" in text
    assert "--rank N LoRA rank r (default: 16)" in text
    names = tmp_path / "names.txt"
    names.write_text("# a comment\nb\n\nc\n")
    assert parse_names(f"a,@{names}") == ["a", "b", "c"] and parse_names(["a,b", "c"]) == ["a", "b", "c"]
    assert parse_names(None) is None
    foreign = tmp_path / "hub_out"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x")
    assert main(["hub", "build", "--tasks", str(tmp_path / "no-tasks"), "--out", str(foreign), "--only", "a,b"]) == 2
    assert "data.csv" in capsys.readouterr().err and [p.name for p in foreign.iterdir()] == ["data.csv"]
    assert not (tmp_path / "hub_out.json").exists()


def test_cli_train_help_names_need_a_pool_and_foreign_out(tmp_path, capsys):
    text = _help(capsys, ["train"])
    assert "--num-experts N, --experts N MixLoRA experts per FFN (default: 8)" in text
    assert "--methods METHOD [METHOD ...], --method METHOD [METHOD ...]" in text and "(default: mixlora)" in text
    assert main(["train", "--tasks", "task0,task1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--tasks 'task0,task1' is not a folder, so it names tasks: give --tasks-dir" in err
    assert not (tmp_path / "run").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "x.bin").write_bytes(b"1")
    assert main(["train", "--tasks", str(tmp_path), "--out", str(foreign), "--quiet"]) == 2
    assert "x.bin" in capsys.readouterr().err and [p.name for p in foreign.iterdir()] == ["x.bin"]


def test_cli_bbh_report_only_on_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bbh", "--out", str(empty), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorahub: error: ") and err.count("\n") == 1 and "has no config.json" in err
    assert list(empty.iterdir()) == []
    assert main(["bbh", "--report-only"]) == 2
    assert "missing required option(s) --out" in capsys.readouterr().err
    text = _help(capsys, ["bbh"])
    assert "--seeds SEED [SEED ...] comma-separated seeds of the seeded methods (lorahub-*) (default: 1,2,3,4,5)" in text
