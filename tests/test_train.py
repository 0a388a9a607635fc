"""The trainer: multi-adapter steps equal single-adapter steps, the MoSLoRA fold is exact, modules load in PEFT."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model_and_tokenizer
import torch

from lorahub.data import Example, encode
from lorahub.errors import LorahubValueError
from lorahub.evaluate import block_losses
from lorahub.store import read_module
from lorahub.train import (
    TrainConfig,
    adapters_disabled,
    attach_adapters,
    delta_weights,
    detach_adapters,
    save_module,
    train_modules,
)


def toy_task(name: str, n: int = 24) -> list[Example]:
    words = ["red", "green", "blue", "yes", "no"]
    return [Example(f"Q: {name} {i} {words[i % 5]}\nA: ", words[(i + len(name)) % 5]) for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


def test_config_checks_name_the_field():
    with pytest.raises(LorahubValueError, match="`rank` should be a positive integer"):
        TrainConfig(rank=0)
    with pytest.raises(LorahubValueError, match="dropout"):
        TrainConfig(dropout=1.5)
    assert TrainConfig(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]
    assert TrainConfig(rank=8, alpha=32).scaling == 4.0


def _randomize_b(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


def test_mixer_fold_gives_the_same_outputs(tiny):
    from lorahub.generate import merged_into

    model, tok = tiny
    config = TrainConfig(rank=4, alpha=8, dropout=0.0, mixer=True)
    batch = encode(tok, toy_task("fold", 4), seq2seq=False)
    layers = attach_adapters(model, ["t"], config)
    try:
        _randomize_b(layers)
        assert all(not torch.allclose(l.lora_M[0], torch.eye(4)) for l in layers.values())
        with torch.no_grad():
            unfolded = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            with adapters_disabled(layers):
                base = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        folded = {p: l.folded(0) for p, l in layers.items()}  # A <- M A, plain LoRA of rank 4
    finally:
        detach_adapters(model, layers)
    assert all(a.shape == (4, 64) for a, _ in folded.values())
    deltas = {p: b @ a * config.scaling for p, (a, b) in folded.items()}
    with torch.no_grad(), merged_into(model, deltas):
        merged = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert (unfolded - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged, unfolded, atol=1e-5, rtol=1e-5)


def test_multi_adapter_step_equals_single_adapter_steps(tiny):
    model, tok = tiny
    config = TrainConfig(rank=4, alpha=8, dropout=0.0, batch_size=3)
    tasks = {n: toy_task(n, 6)[:3] for n in ("alpha", "beta", "gamma")}
    # gradients of one batched forward/backward vs one per task
    rows = [ex for n in tasks for ex in tasks[n]]
    layers = attach_adapters(model, list(tasks), config)
    try:
        _randomize_b(layers)
        init = {p: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for p, l in layers.items()}
        losses = block_losses(model, encode(tok, rows, seq2seq=False), 3, False)
        losses.sum().backward()
        grads = {p: (l.lora_A.grad.clone(), l.lora_B.grad.clone()) for p, l in layers.items()}
    finally:
        detach_adapters(model, layers)
    for i, name in enumerate(tasks):
        single = attach_adapters(model, [name], config)
        try:
            with torch.no_grad():
                for p, l in single.items():
                    l.lora_A.copy_(init[p][0][i : i + 1])
                    l.lora_B.copy_(init[p][1][i : i + 1])
            loss = block_losses(model, encode(tok, tasks[name], seq2seq=False), 1, False)
            loss.sum().backward()
            torch.testing.assert_close(loss[0], losses[i].detach(), atol=1e-5, rtol=1e-5)
            for p, l in single.items():
                torch.testing.assert_close(l.lora_A.grad[0], grads[p][0][i], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(l.lora_B.grad[0], grads[p][1][i], atol=1e-5, rtol=1e-4)
        finally:
            detach_adapters(model, single)


def test_training_three_modules_together_equals_training_each_alone(tiny):
    model, tok = tiny
    config = TrainConfig(rank=4, alpha=8, dropout=0.0, batch_size=2, steps=3, lr=1e-2, warmup_steps=1, modules_per_step=3)
    tasks = {n: toy_task(n, 8) for n in ("alpha", "beta", "gamma")}
    together = train_modules(model, tok, tasks, config, progress=False)
    assert not any(isinstance(m, torch.nn.Module) and hasattr(m, "lora_A") for m in model.modules())  # detached
    for name, exs in tasks.items():
        alone = train_modules(model, tok, {name: exs}, config, progress=False)[name]
        assert alone.losses == pytest.approx(together[name].losses, abs=1e-5)
        for p, (a, b) in alone.layers.items():
            torch.testing.assert_close(a, together[name].layers[p][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b, together[name].layers[p][1], atol=1e-5, rtol=1e-4)
        assert together[name].losses[-1] < together[name].losses[0]  # it learns


def test_saved_module_loads_in_peft_and_in_the_store(tiny, tmp_path):
    from peft import PeftModel

    from lorahub.generate import merged_into

    model, tok = tiny
    config = TrainConfig(rank=4, alpha=8, steps=2, batch_size=2, mixer=True, target_modules=["q_proj", "v_proj"])
    module = train_modules(model, tok, {"colours": toy_task("colours")}, config, progress=False)["colours"]
    # make B non-trivial so the comparison below means something
    module.layers = {p: (a, torch.randn(b.shape) * 0.05) for p, (a, b) in module.layers.items()}
    save_module(tmp_path / "m", module, config, base_model_name="tiny-llama", seq2seq=False)
    save_module(tmp_path / "legacy", module, config, base_model_name="tiny-llama", seq2seq=False, legacy_bin=True)
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["task_type"], cfg["base_model_name_or_path"]) == (4, 8, "CAUSAL_LM", "tiny-llama")
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in state.values())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    for folder in ("m", "legacy"):
        loaded = read_module(tmp_path / folder)
        assert loaded.rank == 4 and len(loaded.layers) == 4
        a, b = module.layers["model.layers.1.self_attn.v_proj"]
        torch.testing.assert_close(loaded.layers["model.layers.1.self_attn.v_proj"][0], a.half().float())
    assert (tmp_path / "legacy" / "adapter_model.bin").is_file()

    x = encode(tok, toy_task("colours", 3), seq2seq=False)
    with torch.no_grad(), merged_into(model, delta_weights(module, config)):
        want = model(input_ids=x.input_ids, attention_mask=x.attention_mask).logits
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "m")).eval()
    try:
        with torch.no_grad():
            got = peft_model(input_ids=x.input_ids, attention_mask=x.attention_mask).logits
    finally:
        peft_model.unload()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
