"""MixLoRA: shared == naive (outputs and gradients), load-balance loss by hand, save/load, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import tiny_model_and_tokenizer
from lorahub.errors import LorahubError, LorahubIntegrityError, LorahubValueError
from lorahub.mixlora import (
    CONFIG_FILE, WEIGHTS_FILE, MixLoraConfig, MixLoraFFN, attach_mixlora, load_balance_loss, load_mixlora,
    mixlora_aux_loss, mixlora_layers, save_mixlora, set_impl,
)

N = 8


def _mixlora_model(seed: int = 0, **kw):
    """Tiny Llama with MixLoRA attached and every adapter weight random and non-zero."""
    model, tok = tiny_model_and_tokenizer()
    cfg = MixLoraConfig(**{"num_experts": N, "dropout": 0.0, **kw})
    torch.manual_seed(seed)
    params = attach_mixlora(model, cfg)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.2)
    return model, tok, cfg, params


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    return ids, mask


@pytest.mark.parametrize("top_k", [2, 1])
def test_shared_equals_naive_outputs_and_gradients(top_k):
    model, _, cfg, params = _mixlora_model(top_k=top_k)
    ids, mask = _batch(model.config.vocab_size)
    results = {}
    for impl in ("shared", "naive"):
        set_impl(model, impl)
        for p in params:
            p.grad = None
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = logits.float().pow(2).mean() + mixlora_aux_loss(model, mask)
        loss.backward()
        results[impl] = (logits.detach(), [p.grad.clone() for p in params])
    (ls, gs), (ln, gn) = results["shared"], results["naive"]
    routed = {int(e) for m in mixlora_layers(model).values() for e in m.router_topk.unique()}
    assert len(routed) > top_k  # the batch really spreads over several experts
    torch.testing.assert_close(ls, ln, atol=1e-5, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in gs)
    for a, b in zip(gs, gn):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _ffn(top_k: int) -> MixLoraFFN:
    model, _ = tiny_model_and_tokenizer()
    return MixLoraFFN(model.model.layers[0].mlp, MixLoraConfig(num_experts=N, top_k=top_k, dropout=0.0))


def _one_hot_tokens(reps: int = 4) -> torch.Tensor:
    x = torch.zeros(1, N * reps, 64)
    for t in range(N * reps):
        x[0, t, t % N] = 1.0  # token t "is" expert t mod N
    return x


def test_aux_loss_uniform_routing_is_exactly_one():
    ffn = _ffn(top_k=2)
    with torch.no_grad():  # token j: logit 10 for expert j, 9 for expert j+1 -> top-2 {j, j+1}
        w = torch.zeros(N, 64)
        for j in range(N):
            w[j, j], w[(j + 1) % N, j] = 10.0, 9.0
        ffn.router.weight.copy_(w)
    ffn(_one_hot_tokens())
    counts = torch.bincount(ffn.router_topk.flatten(), minlength=N)
    assert counts.tolist() == [8] * N  # every expert gets the same number of assignments
    loss = load_balance_loss(ffn.router_probs, ffn.router_topk, N)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_collapsed_router_is_n():
    for top_k, want in ((1, N), (2, N / 2)):  # top-k: f_0 = 1/k at most (see load_balance_loss)
        ffn = _ffn(top_k)
        with torch.no_grad():
            w = torch.zeros(N, 64)
            w[0, :N] = 20.0  # every token to expert 0 with p = e^20 / (e^20 + 7) ≈ 1
            ffn.router.weight.copy_(w)
        ffn(_one_hot_tokens())
        assert (ffn.router_topk[..., 0] == 0).all()
        loss = load_balance_loss(ffn.router_probs, ffn.router_topk, N)
        assert loss.item() == pytest.approx(want, rel=1e-6)


def test_aux_loss_ignores_padding_and_scales_by_coef():
    # a balanced part plus padded tokens that all go to expert 0: with the mask, still exactly 1
    probs = torch.full((2, N, N), 0.0)
    topk = torch.zeros(2, N, 1, dtype=torch.long)
    for t in range(N):
        probs[0, t, t] = 1.0
        topk[0, t, 0] = t
        probs[1, t, 0] = 1.0  # padding row: collapsed
    mask = torch.tensor([[1] * N, [0] * N])
    assert load_balance_loss(probs, topk, N, mask).item() == pytest.approx(1.0, abs=1e-7)
    assert load_balance_loss(probs, topk, N).item() > 1.5
    # through the model: a zero router gives p = 1/N exactly, hence loss 1 (× coef when scaled)
    model, _, cfg, _ = _mixlora_model(router_aux_loss_coef=0.01)
    with torch.no_grad():
        for m in mixlora_layers(model).values():
            m.router.weight.zero_()
    ids, amask = _batch(model.config.vocab_size)
    model(input_ids=ids, attention_mask=amask)
    assert mixlora_aux_loss(model, amask, scaled=False).item() == pytest.approx(1.0, abs=1e-6)
    assert mixlora_aux_loss(model, amask).item() == pytest.approx(0.01, abs=1e-8)


def test_save_load_round_trip(tmp_path):
    model, _, cfg, _ = _mixlora_model(top_k=2, r=4)
    ids, mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    save_mixlora(model, cfg, tmp_path / "mix")
    meta = json.loads((tmp_path / "mix" / CONFIG_FILE).read_text())
    assert meta["config"]["num_experts"] == N and meta["format_version"] == 1
    fresh, _ = tiny_model_and_tokenizer()
    got_cfg = load_mixlora(fresh, tmp_path / "mix")
    assert got_cfg == cfg
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert not list(tmp_path.glob(".mix.tmp-*"))  # atomic: no temp folder left behind


def test_bad_config_values():
    with pytest.raises(LorahubValueError, match=r"top_k`=9.*num_experts`=8"):
        MixLoraConfig(num_experts=8, top_k=9)
    with pytest.raises(LorahubValueError, match=r"num_experts.*0"):
        MixLoraConfig(num_experts=0, top_k=1)


def test_non_llama_ffn_names_the_module():
    with pytest.raises(LorahubValueError, match=r"'blocks.3.ffn'.*Sequential.*gate_proj"):
        MixLoraFFN(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), MixLoraConfig(), "blocks.3.ffn")
    model, _ = tiny_model_and_tokenizer()
    model.model.layers[1].mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    with pytest.raises(LorahubValueError, match=r"model\.layers\.1\.mlp"):
        attach_mixlora(model, MixLoraConfig())


def test_checkpoint_with_other_expert_count_or_shapes(tmp_path):
    model, _, cfg, _ = _mixlora_model(num_experts=4, top_k=2, r=4)
    folder = save_mixlora(model, cfg, tmp_path / "mix4")
    fresh, _ = tiny_model_and_tokenizer()
    with pytest.raises(LorahubValueError, match=r"num_experts: expected 8, checkpoint has 4"):
        load_mixlora(fresh, folder, expected=MixLoraConfig(num_experts=8, r=4, dropout=0.0))
    # a config that lies about the expert count: the tensors are named
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["config"]["num_experts"] = 8
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(LorahubValueError, match=r"tensor 'model\.layers\.0\.mlp\..*' has 4 experts.*num_experts=8"):
        load_mixlora(fresh, folder)
    assert not mixlora_layers(fresh)
    # another base (intermediate 96 instead of 128): shapes differ, the model is left untouched
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**fresh.config.to_dict(), "intermediate_size": 96}))
    folder = save_mixlora(model, cfg, tmp_path / "mix4b")
    with pytest.raises(LorahubValueError, match=r"tensor 'model\.layers\.0\.mlp\.lora_A_down'.*\[4, 4, 128\].*\[4, 4, 96\]"):
        load_mixlora(other, folder)
    assert not mixlora_layers(other) and type(other.model.layers[0].self_attn.q_proj) is nn.Linear


def test_corrupted_files(tmp_path):
    model, _, cfg, _ = _mixlora_model(num_experts=2, top_k=1, r=2)
    folder = save_mixlora(model, cfg, tmp_path / "mix")
    w = folder / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(LorahubIntegrityError, match=rf"{WEIGHTS_FILE} is corrupted: sha256"):
        load_mixlora(tiny_model_and_tokenizer()[0], folder)
    w.write_bytes(b"not a safetensors file")  # unreadable, with a matching sha256
    meta = json.loads((folder / CONFIG_FILE).read_text())
    from lorahub.files import sha256_file

    meta["weights"]["sha256"] = sha256_file(w)
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(LorahubIntegrityError, match=rf"{WEIGHTS_FILE} cannot be read"):
        load_mixlora(tiny_model_and_tokenizer()[0], folder)
    (folder / CONFIG_FILE).write_text('{"format_version": 1, "config": {"num_')
    with pytest.raises(LorahubIntegrityError, match=CONFIG_FILE):
        load_mixlora(tiny_model_and_tokenizer()[0], folder)
    assert issubclass(LorahubIntegrityError, LorahubError)
