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


LONG_PREFIX = ("You are given a short question about everyday objects. Read the whole instruction before you answer, "
               "think about each object in turn, and answer with one word only. ") * 3


@pytest.mark.parametrize("length_groups", [True, False])
def test_shared_prefix_path_equals_plain_path_and_peft(tiny_llama, llama_modules, length_groups):
    """The prompt prefix all examples share runs once per candidate: same losses as running it for every example."""
    model, tok = tiny_llama
    stacked = _stack(model, llama_modules)
    examples = [{"input": LONG_PREFIX + "\nQ: " + q + "\nA:", "output": a} for q, a in
                [("Is a spoon metal?", "yes"), ("Is " + "a very long question " * 6 + "?", "no"),
                 ("Is ice cold?", "yes"), ("Can a cat fly?", "no"), ("Is " + "a long question " * 4 + "?", "maybe not")]]
    W = torch.randn(6, len(stacked), generator=torch.Generator().manual_seed(7))
    W[0] = 0
    with PopulationEvaluator(model, tok, stacked, as_examples(examples), length_groups=length_groups) as ev:
        shared, k = ev.score(W), ev.prefix_len
    with PopulationEvaluator(model, tok, stacked, as_examples(examples), length_groups=length_groups,
                             min_prefix=0) as ev:
        plain = ev.score(W)
        assert ev.prefix_len == 0
    assert k >= 64  # the long instruction (and "\nQ: Is") is shared
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    for p in (0, 3):
        assert shared[p].item() == pytest.approx(peft_loss(model, tok, stacked, W[p], examples), rel=1e-4)
    with PopulationEvaluator(model, tok, stacked, as_examples(examples), max_rows=10) as ev:  # 2 candidates a chunk
        torch.testing.assert_close(ev.score(W), plain, rtol=1e-5, atol=1e-6)


def test_prompt_prefix_never_reaches_the_answer(tokenizer):
    from lorahub.evaluate import prompt_prefix_length

    same = [{"input": "Q: the same prompt for both rows\nA:", "output": o} for o in ("yes", "no")]
    batch = encode(tokenizer, as_examples(same), seq2seq=False)
    k = prompt_prefix_length(batch, 1)
    first_target = int((batch.labels[0] != -100).nonzero()[0])
    assert k == first_target - 1  # the last prompt token stays with each row: it predicts the first answer token
    assert prompt_prefix_length(batch, first_target) == 0  # below min_length: the plain path


def test_soft_capped_loss_is_one_objective(tiny_llama, llama_modules):
    """final_logit_softcapping (Gemma 2): the evaluator, routed composition and the trainer take the same
    capped loss, equal to an independent tanh-capped cross-entropy over the full logits."""
    import torch.nn.functional as F

    from lorahub.compose import delta_weights
    from lorahub.evaluate import block_losses
    from lorahub.generate import merged_into
    from lorahub.routed import RoutedConfig, train_routers
    from lorahub.train import TrainConfig, train_modules

    model, tok = tiny_llama
    cap = model.config.final_logit_softcapping = 0.05  # Llama's forward ignores it; the loss must not
    examples = as_examples(EXAMPLES)
    stacked = _stack(model, llama_modules[:1])  # one module: routed with top-1 and no zero expert gates it by 1
    batch = encode(tok, examples, seq2seq=False)

    def independent(capped: bool = True) -> float:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        if capped:
            logits = torch.tanh(logits / cap) * cap
        return float(F.cross_entropy(logits.flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100))

    base = independent()
    with merged_into(model, delta_weights(composed_layers(stacked, torch.ones(1)), stacked.scaling)):
        one = independent()
    assert abs(base - independent(capped=False)) > 0.01  # the cap matters (random logits are small)
    with PopulationEvaluator(model, tok, stacked, examples) as ev:
        static = ev.score([[0.0], [1.0]])
    run = train_routers(model, tok, stacked, examples, RoutedConfig(steps=1, top_k=1, null_expert=False), seed=0)
    trained = train_modules(model, tok, {"t": examples}, TrainConfig(steps=1, batch_size=len(examples)), progress=False)
    with torch.no_grad():
        blocks = block_losses(model, batch.repeat(2), 2, False)
    for got in (static[0].item(), run.zero_weight_loss, trained["t"].losses[0], *blocks.tolist()):  # B = 0 at step 0
        assert got == pytest.approx(base, rel=1e-5)
    for got in (static[1].item(), run.loss, run.history[0]["loss"]):
        assert got == pytest.approx(one, rel=1e-5)
