"""The batched population evaluator against an independent computation: PEFT's loss on the composed adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from lorahub.compose import composed_layers, compose_population, peft_state_dict
from lorahub.data import as_examples, encode
from lorahub.evaluate import PopulationEvaluator
from lorahub.models import is_seq2seq
from lorahub.store import ModuleStore

from conftest import EXAMPLES


def _stack(model, paths):
    store = ModuleStore()
    for p in paths:
        store.add_path(p)
    return store.stack(store.names, model)


def peft_loss(model, tokenizer, stacked, weights, examples) -> float:
    """Independent: compose the adapter, load it into PEFT, take the HF labels loss."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    cfg = {k: v for k, v in stacked.config.items() if k in LoraConfig.__dataclass_fields__}
    cfg.pop("base_model_name_or_path", None)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**{**cfg, "inference_mode": True}))
    res = set_peft_model_state_dict(peft_model, peft_state_dict(composed_layers(stacked, torch.as_tensor(weights))))
    assert not [k for k in res.unexpected_keys if "lora" in k]
    batch = encode(tokenizer, as_examples(examples), seq2seq=is_seq2seq(model))
    kw = {"decoder_attention_mask": batch.decoder_attention_mask} if is_seq2seq(model) else {}
    with torch.no_grad():
        out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, **kw)
    return float(out.loss)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_population_loss_matches_peft(kind, tiny_llama, tiny_t5, llama_modules, t5_modules):
    model, tok = tiny_llama if kind == "llama" else tiny_t5
    stacked = _stack(model, llama_modules if kind == "llama" else t5_modules)
    g = torch.Generator().manual_seed(1)
    W = (torch.rand(5, len(stacked), generator=g) * 3 - 1.5)
    W[0] = 0  # w = 0 is the base model
    with PopulationEvaluator(model, tok, stacked, as_examples(EXAMPLES)) as ev:
        ours = ev.score(W)
    for p in range(W.shape[0]):
        ref = peft_loss(model, tok, stacked, W[p], EXAMPLES)
        assert ours[p].item() == pytest.approx(ref, rel=1e-4), f"candidate {p}"
    assert len(set(round(x, 6) for x in ours.tolist())) == W.shape[0]  # the weights matter


def test_population_equals_sequential_and_chunks(tiny_llama, llama_modules):
    model, tok = tiny_llama
    stacked = _stack(model, llama_modules)
    W = torch.randn(7, len(stacked), generator=torch.Generator().manual_seed(3))
    ex = as_examples(EXAMPLES)
    with PopulationEvaluator(model, tok, stacked, ex) as ev:
        together = ev.score(W)
        one_by_one = torch.cat([ev.score(W[p : p + 1]) for p in range(7)])
    with PopulationEvaluator(model, tok, stacked, ex, max_rows=10) as ev:  # 2 candidates per chunk
        chunked = ev.score(W)
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, chunked, rtol=1e-5, atol=1e-6)


def test_hooks_removed_after_use(tiny_llama, llama_modules):
    model, tok = tiny_llama
    stacked = _stack(model, llama_modules)
    batch = encode(tok, as_examples(EXAMPLES), seq2seq=False)
    before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with PopulationEvaluator(model, tok, stacked, as_examples(EXAMPLES)) as ev:
        ev.score(torch.ones(2, len(stacked)))
    after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(before, after)
    with pytest.raises(RuntimeError, match="context manager"):
        ev.score(torch.ones(1, len(stacked)))


def test_non_finite_loss_scores_inf(tiny_llama, llama_modules):
    model, tok = tiny_llama
    stacked = _stack(model, llama_modules)
    layer = stacked.layers[0]
    stacked.A[layer][1, 0, 0] = float("nan")  # module 1 is poisoned
    with PopulationEvaluator(model, tok, stacked, as_examples(EXAMPLES)) as ev:
        W = torch.zeros(2, len(stacked))
        W[0, 0] = 1.0
        W[1, 1] = 1.0
        # einsum multiplies NaN by every weight, so both candidates see NaN; both must score +inf, not raise
        losses = ev.score(W)
    assert torch.isinf(losses).all()


def test_compose_population_is_weighted_sum():
    A, B = torch.randn(3, 4, 6), torch.randn(3, 5, 4)
    W = torch.randn(2, 3)
    a, b = compose_population(W, A, B)
    for p in range(2):
        torch.testing.assert_close(a[p], sum(W[p, i] * A[i] for i in range(3)))
        torch.testing.assert_close(b[p], sum(W[p, i] * B[i] for i in range(3)))


def test_length_groups_cut_padding_and_keep_the_loss(tiny_llama, llama_modules):
    """Examples of unlike lengths run in separate, trimmed forwards (CPU default): same loss as PEFT's."""
    from lorahub.evaluate import split_by_length

    model, tok = tiny_llama
    stacked = _stack(model, llama_modules)
    examples = [{"input": "Q: hi\nA:", "output": "yes"}, {"input": "Q: " + "a long question " * 12 + "\nA:", "output": "no"},
                {"input": "Q: ho\nA:", "output": "no"}, {"input": "Q: " + "a long question " * 11 + "?\nA:", "output": "yes"}]
    W = torch.randn(3, len(stacked), generator=torch.Generator().manual_seed(5))
    with PopulationEvaluator(model, tok, stacked, as_examples(examples)) as ev:
        grouped, groups = ev.score(W), ev.groups
    with PopulationEvaluator(model, tok, stacked, as_examples(examples), length_groups=False) as ev:
        one_batch = ev.score(W)
    assert [len(g) for g in groups] == [2, 2]
    full = encode(tok, as_examples(examples), seq2seq=False)
    assert sum(g.attention_mask.numel() for g in groups) < 0.7 * full.attention_mask.numel()
    assert all(bool(g.attention_mask[:, -1].any()) for g in groups)  # trimmed to the group's longest row
    torch.testing.assert_close(grouped, one_batch, rtol=1e-5, atol=1e-6)
    for p in range(3):
        assert grouped[p].item() == pytest.approx(peft_loss(model, tok, stacked, W[p], examples), rel=1e-4)
    lengths = torch.tensor([[1] * n + [0] * (10 - n) for n in (3, 10, 10, 4)])
    parts = split_by_length(type(full)(lengths, lengths, lengths))
    assert [p.attention_mask.sum(1).tolist() for p in parts] == [[3], [4], [10, 10]]
