"""`lorahub train`: models batched together == trained alone, kill/resume == uninterrupted, expert usage,
saved models reload, clear errors; the CLI end to end on a tiny base."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_and_tokenizer
from lorahub.data import Example, encode
from lorahub.errors import LorahubValueError
from lorahub.mixlora import CONFIG_FILE, WEIGHTS_FILE, MixLoraConfig, MixLoraFFN, attach_mixlora, load_mixlora, save_mixlora
from lorahub.mixlora_train import (
    CHECKPOINT, TRAIN_LOG, USAGE_FILE, MixTrainConfig, RowBlocks, attach_models, detach_models, load_tasks,
    matched_lora_rank, model_configs, model_view, train_mixlora, trainable_params,
)
from lorahub.train import MultiLoraLinear

WORDS = ["red", "green", "blue", "yes", "no"]
FAST = dict(num_experts=4, top_k=2, rank=2, alpha=4.0, steps=3, lr=1e-2, warmup_steps=1, batch_size=3, max_length=64)


def toy_tasks(n: int = 12) -> dict[str, list[Example]]:
    return {name: [Example(f"Q: {name} {i} {WORDS[i % 5]}?\nA:", WORDS[(i + k) % 5]) for i in range(n)]
            for k, name in enumerate(("alpha", "beta", "gamma"))}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / WEIGHTS_FILE))


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


def _plain(model) -> bool:
    return not any(isinstance(m, (MixLoraFFN, MultiLoraLinear, RowBlocks)) for m in model.modules())


def test_matched_lora_rank_and_param_counts(tiny):
    model, _ = tiny
    config = MixTrainConfig(methods=["mixlora", "lora"], **FAST)
    mix = config.mixlora_config()
    fresh, _ = tiny_model_and_tokenizer()
    assert trainable_params(mix, model) == sum(p.numel() for p in attach_mixlora(fresh, mix))  # counted = attached
    r = matched_lora_rank(config, model)
    counts = {k: trainable_params(config.lora_config(k), model) for k in range(1, 4 * r)}
    target = trainable_params(mix, model)
    assert min(counts, key=lambda k: abs(counts[k] - target)) == r  # the closest rank
    cfgs = model_configs(config, model)
    assert (cfgs["lora"].num_experts, cfgs["lora"].top_k, cfgs["lora"].r) == (1, 1, r)
    assert cfgs["lora"].scaling == mix.scaling  # lora alpha keeps MixLoRA's alpha / r
    assert model_configs(replace(config, lora_rank=3), model)["lora"].r == 3


def test_two_models_in_one_batch_equal_each_trained_alone(tiny, tmp_path):
    model, tok = tiny
    tasks = toy_tasks()
    config = MixTrainConfig(methods=["mixlora", "lora"], dropout=0.0, **FAST)
    both = train_mixlora(model, tok, tasks, config, tmp_path / "both", save_every=0, progress=False)
    assert _plain(model)  # left as it came
    for m in ("mixlora", "lora"):
        alone = train_mixlora(model, tok, tasks, replace(config, methods=[m]), tmp_path / m, save_every=0, progress=False)
        assert alone.losses[m] == pytest.approx(both.losses[m], abs=1e-5)
        assert alone.usage[m] == both.usage[m]  # the same routing decisions
        wa, wb = _weights(tmp_path / m / m), _weights(tmp_path / "both" / m)
        assert sorted(wa) == sorted(wb)  # the same saved format, whatever trained beside it
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
        assert any(k.endswith("mlp.lora_B_gate") and wa[k].abs().sum() > 0 for k in wa)  # it trained
    assert both.losses["mixlora"] != pytest.approx(both.losses["lora"], abs=1e-4)  # two different models


def test_kill_then_resume_equals_uninterrupted_run(tiny, tmp_path):
    model, tok = tiny
    tasks = toy_tasks()
    config = MixTrainConfig(methods=["mixlora", "lora"], dropout=0.1, **{**FAST, "steps": 4})  # dropout: RNG state restored
    ref = train_mixlora(model, tok, tasks, config, tmp_path / "ref", save_every=0, progress=False)

    class Killed(Exception):
        pass

    def kill_after_3(done: int) -> None:
        if done == 3:  # the checkpoint holds step 2; step 3 is lost and done again
            raise Killed

    out = tmp_path / "run"
    with pytest.raises(Killed):
        train_mixlora(model, tok, tasks, config, out, save_every=2, progress=False, on_step=kill_after_3)
    assert _plain(model)
    assert json.loads((out / CHECKPOINT / "checkpoint.json").read_text())["step"] == 2
    assert not (out / "mixlora").exists()
    res = train_mixlora(model, tok, tasks, config, out, save_every=2, progress=False)
    assert (res.resumed_from, res.steps_run) == (2, 2)
    assert [e["step"] for e in _log(out)] == [0, 1, 2, 3]  # each step logged once
    assert res.losses == ref.losses and res.usage == ref.usage
    for m in ("mixlora", "lora"):
        wa, wb = _weights(out / m), _weights(tmp_path / "ref" / m)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-6)
    # a finished run is not trained again
    mtime = (out / "mixlora" / WEIGHTS_FILE).stat().st_mtime_ns
    again = train_mixlora(model, tok, tasks, config, out, save_every=2, progress=False)
    assert again.steps_run == 0 and again.losses == res.losses
    assert len(_log(out)) == 4 and (out / "mixlora" / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_expert_usage_counts_every_real_token_k_times(tiny, tmp_path):
    model, tok = tiny
    config = MixTrainConfig(methods=["mixlora", "lora"], **{**FAST, "steps": 2, "top_k": 3})
    res = train_mixlora(model, tok, toy_tasks(), config, tmp_path, save_every=1, progress=False)
    log = _log(tmp_path)
    tokens = sum(e["tokens"] for e in log)
    assert sum(e["rows"][t] for e in log for t in e["rows"]) == 2 * config.batch_size  # task-mixed rows
    for m, k, n in (("mixlora", 3, 4), ("lora", 1, 1)):
        usage = json.loads((tmp_path / m / USAGE_FILE).read_text())
        assert usage == res.usage[m]
        assert sorted(usage) == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert all(len(c) == n and sum(c) == tokens * k for c in usage.values())
    assert log[-1]["expert_usage"]["mixlora"] == res.usage["mixlora"]  # logged at checkpoints


def test_saved_models_reload_with_the_same_logits(tmp_path):
    model, tok = tiny_model_and_tokenizer()
    configs = {"mixlora": MixLoraConfig(num_experts=4, top_k=2, r=2, dropout=0.0),
               "lora": MixLoraConfig(num_experts=1, top_k=1, r=5, dropout=0.0, router_aux_loss_coef=0.0)}
    attached = attach_models(model, configs, seed=0)
    with torch.no_grad():
        for params in attached.params.values():
            for p in params.values():
                p.copy_(torch.randn_like(p) * 0.2)
    batch = encode(tok, toy_tasks(3)["alpha"], seq2seq=False)
    with torch.no_grad():
        rows = model(input_ids=batch.input_ids.repeat(2, 1), attention_mask=batch.attention_mask.repeat(2, 1)).logits
    for m in configs:
        with model_view(model, attached, m):
            save_mixlora(model, configs[m], tmp_path / m)
    detach_models(model, attached)
    assert _plain(model)
    for i, m in enumerate(configs):
        fresh, _ = tiny_model_and_tokenizer()
        assert load_mixlora(fresh, tmp_path / m) == configs[m]
        with torch.no_grad():
            got = fresh(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        torch.testing.assert_close(got, rows[i * len(batch): (i + 1) * len(batch)], atol=1e-5, rtol=1e-5)


def write_pool(root: Path, names, n: int = 16) -> Path:
    (root / "tasks").mkdir(parents=True)
    for k, name in enumerate(names):
        rows = [json.dumps({"input": f"{name} {i}?", "target": WORDS[(i + k) % 5], "choices": WORDS}) for i in range(n)]
        (root / "tasks" / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    (root / "index.json").write_text(json.dumps({nm: {"kind": "multiple_choice"} for nm in names}))
    return root


def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    pool = write_pool(tmp_path / "pool", ["task0", "task1"])
    with pytest.raises(LorahubValueError, match=r"unknown task\(s\) \['nope'\] in .*pool.*Available: task0, task1"):
        load_tasks(pool, ["task0", "nope"], heldout=4)
    with pytest.raises(LorahubValueError, match=r"task 'task0'.*16 examples cannot keep 20 held out"):
        load_tasks(pool, ["task0"], heldout=20)
    with pytest.raises(LorahubValueError, match=r"`top_k`=3 is larger than `num_experts`=2"):
        MixTrainConfig(num_experts=2, top_k=3)
    with pytest.raises(LorahubValueError, match=r"`methods`.*'moe'"):
        MixTrainConfig(methods=["mixlora", "moe"])
    half, tok = tiny_model_and_tokenizer()
    with pytest.raises(LorahubValueError, match=r"needs an fp32 base model, got torch\.bfloat16"):
        train_mixlora(half.to(torch.bfloat16), tok, toy_tasks(), MixTrainConfig(**FAST), tmp_path / "half", progress=False)
    model, tok = tiny
    config = MixTrainConfig(**{**FAST, "steps": 1})
    train_mixlora(model, tok, toy_tasks(), config, tmp_path / "out", progress=False)
    with pytest.raises(LorahubValueError, match=r"other settings \(train\.lr: 0\.01 there, 0\.02 now\).*another --out"):
        train_mixlora(model, tok, toy_tasks(), replace(config, lr=2e-2), tmp_path / "out", progress=False)
    assert _plain(model)


def test_cli_trains_evaluates_and_does_not_retrain(tmp_path, capsys):
    from lorahub.cli import main

    base = tmp_path / "base"
    model, tok = tiny_model_and_tokenizer()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "tasks"
    data.mkdir()
    for name, exs in toy_tasks(16).items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"input": e.input, "output": e.output}) + "\n" for e in exs))
    out = tmp_path / "run"
    argv = ["train", "--method", "mixlora", "lora", "--tasks", str(data), "--out", str(out), "--base-model", str(base),
            "--experts", "4", "--top-k", "2", "--rank", "2", "--steps", "2", "--batch-size", "2", "--max-length", "64",
            "--heldout", "4", "--eval-examples", "3", "--save-every", "1", "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "mixlora:" in text and "trainable parameters" in text and "expert usage of mixlora" in text
    quality = json.loads((out / "quality.json").read_text())
    assert quality["columns"] == ["base", "mixlora", "lora"] and sorted(quality["tasks"]) == ["alpha", "beta", "gamma"]
    assert all(r["n"] == 3 for r in quality["tasks"].values())
    md = (out / "quality.md").read_text()
    assert md.startswith("```\nlorahub train --method mixlora lora") and "| **average** |" in md
    for m in ("mixlora", "lora"):
        assert (out / m / CONFIG_FILE).is_file() and (out / m / USAGE_FILE).is_file()
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "already trained" in text and "quality (from an earlier call)" in text
    assert len(_log(out)) == 2
    assert main([*argv[:-1], "--experts", "2", "--top-k", "3"]) == 2
    assert "`top_k`=3 is larger than `num_experts`=2" in capsys.readouterr().err
    assert main(["train", "--tasks", "nope,task0", "--tasks-dir", str(write_pool(tmp_path / "pool", ["task0"])),
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
