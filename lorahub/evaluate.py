"""Batched population evaluator: the few-shot loss of P candidate weightings in one forward pass.

Why not PEFT: scoring a candidate with PEFT means building its state dict, loading it
(``set_peft_model_state_dict``) and running one forward per candidate. PEFT's mixed-batch forward
(``adapter_names=``) would need P registered adapters rebuilt at every generation. Instead we hook the
LoRA-targeted ``nn.Linear`` layers: the batch holds the Q examples repeated for each of P candidates
(row ``p*Q + q``), the base layers run once over all P·Q rows, and each hooked layer adds its
candidate's composed delta with two batched matmuls grouped by candidate:

    y (P, Q·T, out) += (x (P, Q·T, in) @ A_pᵀ (P, in, r)) @ B_pᵀ (P, r, out) · s

Logits are computed only where a target token is predicted: the LM head is a large share of a small
model's FLOPs. Loss per candidate = mean token cross-entropy over its target tokens (prompt and
padding masked), which is what a HF model's ``labels`` loss gives on the Q examples.

Shared prefix (causal LMs): real tasks put one long instruction in front of every example. The tokens
that all Q prompts start with are run once per candidate (P rows, each through its own delta: the
deltas act on q/v from the first layer on, so the prefix's key/value cache depends on the candidate),
its cache is repeated to the P·Q rows, and only the example suffixes run on top of it. A candidate then
costs prefix + Q·suffix tokens instead of Q·(prefix + suffix); the loss is the same (tested to 1e-5).
Below ``min_prefix`` shared tokens the plain path runs (benchmarks/evaluator.py measures the break-even).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .compose import compose_population
from .data import DEFAULT_MAX_LENGTH, Batch, Example, encode, shared_prefix_length
from .models import is_seq2seq
from .store import StackedModules


MIN_SHARED_PREFIX = 16  # shared tokens below which sharing buys nothing (benchmarks/evaluator.py: 11 tokens 1.03x)


class PopulationEvaluator:
    """Scores weightings (P, N) of ``stacked`` modules on ``examples``; use as a context manager.

    Args:
        model: the frozen base model (causal LM or seq2seq), on its evaluation device.
        tokenizer: its tokenizer.
        stacked: the candidate modules, stacked per layer on the model's device.
        examples: the few-shot examples of the new task.
        max_rows: most rows (candidates × examples) in one forward; larger populations are chunked.
        max_length: token limit of one example (a longer prompt is cut from the left, with a warning naming it;
            an answer over the limit is an error naming the example).
        length_groups: run examples of unlike lengths in separate forwards, so that little compute goes to
            padding (None: on a CPU, where a forward's cost is its padded token count, not on a GPU, where
            one wide batch is faster). Causal LMs only; the loss is the same.
        min_prefix: run the prompt prefix shared by all examples once per candidate when it has at least
            this many tokens (causal LMs; 0 turns it off; None: ``MIN_SHARED_PREFIX``). The loss is the same.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        stacked: StackedModules,
        examples: Sequence[Example],
        *,
        max_rows: int = 256,
        max_length: int = DEFAULT_MAX_LENGTH,
        length_groups: bool | None = None,
        min_prefix: int | None = None,
    ):
        self.model, self.stacked = model, stacked
        self.seq2seq = is_seq2seq(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.loss_dtype = torch.promote_types(self.dtype, torch.float32)  # float32, float64 for a float64 model
        self.batch = encode(tokenizer, examples, seq2seq=self.seq2seq, max_length=max_length).to(self.device)
        self.num_examples = len(self.batch)
        if length_groups is None:
            length_groups = self.device.type == "cpu"
        min_prefix = MIN_SHARED_PREFIX if min_prefix is None else min_prefix
        self.prefix_len = 0 if self.seq2seq or not min_prefix else prompt_prefix_length(self.batch, min_prefix)
        rest = self.batch
        if self.prefix_len:  # the shared prefix runs apart; the groups hold the suffixes
            k = self.prefix_len
            self.prefix_ids = self.batch.input_ids[:1, :k]
            rest = Batch(self.batch.input_ids[:, k:], self.batch.attention_mask[:, k:], self.batch.labels[:, k:])
        self.groups = split_by_length(rest) if length_groups and not self.seq2seq else [rest]
        self.chunk = max(1, max_rows // self.num_examples)
        self.evaluations = 0
        self._composed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list[Any] = []
        self._A = {l: a.to(self.device, self.dtype) for l, a in stacked.A.items()}
        self._B = {l: (b * stacked.scaling).to(self.device, self.dtype) for l, b in stacked.B.items()}  # s folded into B

    # hooks -----------------------------------------------------------------------------------
    def __enter__(self) -> "PopulationEvaluator":
        modules = dict(self.model.named_modules())
        for layer in self.stacked.layers:
            self._hooks.append(modules[layer].register_forward_hook(self._make_hook(layer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._composed.clear()

    def _make_hook(self, layer: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            if layer not in self._composed:
                return out
            a_p, b_p = self._composed[layer]  # (P, r, in), (P, out, r)
            P = a_p.shape[0]
            x = inputs[0].reshape(P, -1, inputs[0].shape[-1])  # (P, Q·T, in)
            y = out.reshape(P, -1, out.shape[-1])  # (P, Q·T, out)
            return torch.baddbmm(y, torch.bmm(x, a_p.transpose(1, 2)), b_p.transpose(1, 2)).reshape(out.shape)

        return hook

    # scoring ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, weights: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
        """Mean target-token cross-entropy of each weighting: weights (P, N) -> losses (P,) float32 on CPU.

        A candidate whose loss is NaN or infinite scores +inf (the search goes on). The weights, the loss and its
        sum are in float32, or in float64 for a float64 model (so that its loss is exact before the final
        float32 rounding, as a float64 reference's ``loss.float()`` is: tests/test_reference.py).
        """
        if not self._hooks:
            raise RuntimeError("PopulationEvaluator.score needs its hooks: use it as a context manager, `with PopulationEvaluator(...) as ev:`")
        w = torch.as_tensor(weights, dtype=self.loss_dtype)
        if w.dim() != 2 or w.shape[1] != len(self.stacked):
            raise ValueError(f"weights has shape {tuple(w.shape)}, expected (P, {len(self.stacked)})")
        losses = []
        for start in range(0, w.shape[0], self.chunk):
            losses.append(self._score_chunk(w[start : start + self.chunk].to(self.device)))
        self.evaluations += w.shape[0]
        out = torch.cat(losses).float().cpu()
        return torch.where(torch.isfinite(out), out, torch.full_like(out, math.inf))

    def _score_chunk(self, w: torch.Tensor) -> torch.Tensor:
        P = w.shape[0]
        total = torch.zeros(P, device=w.device, dtype=self.loss_dtype)
        count = torch.zeros(P, device=w.device, dtype=self.loss_dtype)
        for layer in self.stacked.layers:
            self._composed[layer] = compose_population(w, self._A[layer], self._B[layer])
        try:
            prefix = self._prefix_cache(P) if self.prefix_len else None
            for group in self.groups:  # the loss is the mean over all target tokens of all groups
                cache = None
                if prefix is not None:  # candidate p's prefix cache for its rows p·|g| ... p·|g| + |g|-1
                    cache = copy.deepcopy(prefix)
                    cache.batch_repeat_interleave(len(group))
                token_loss, rows = token_losses(self.model, group.repeat(P), self.seq2seq, cache=cache)
                cand = rows // len(group)
                total.index_add_(0, cand, token_loss.to(self.loss_dtype))
                count.index_add_(0, cand, torch.ones_like(token_loss, dtype=self.loss_dtype))
        finally:
            self._composed.clear()
        return total / count

    def _prefix_cache(self, P: int) -> Any:
        """Key/value cache of the shared prefix under each of the P composed candidates (row p: candidate p)."""
        ids = self.prefix_ids.expand(P, -1)
        return self.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache


def prompt_prefix_length(batch: Batch, min_length: int) -> int:
    """Tokens that every row's prompt starts with, never reaching a target token nor the position that
    predicts the first one (each row keeps at least one prompt token); 0 if fewer than ``min_length``."""
    prompts = []
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist()):
        first_target = next((i for i, l in enumerate(labels) if l != -100), len(labels))
        prompts.append(ids[:first_target])
    return shared_prefix_length(prompts, min_length=max(1, min_length))


def split_by_length(batch: Batch, *, slack: float = 1.1) -> list[Batch]:
    """A right-padded causal batch cut into groups of similar length, each trimmed to its longest row.

    Rows are taken shortest first; a group closes when the next row would make its padded size exceed
    ``slack`` × its real tokens.
    """
    lengths = batch.attention_mask.sum(dim=1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is None or (len(g) + 1) * lengths[i] > slack * (sum(lengths[j] for j in g) + lengths[i]):
            groups.append([i])
        else:
            g.append(i)
    out = []
    for g in groups:
        idx, width = torch.tensor(g, device=batch.input_ids.device), max(lengths[i] for i in g)
        out.append(Batch(batch.input_ids[idx, :width], batch.attention_mask[idx, :width], batch.labels[idx, :width]))
    return out


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for the loss; float32 and float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_losses(
    model: Any, batch: Batch, seq2seq: bool, *, cache: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every target token of ``batch`` under ``model`` and the row it belongs to.

    ``cache`` (causal LMs): the key/value cache of a prefix, unpadded, that every row of ``batch`` continues.
    """
    if seq2seq:
        dec_in = model.prepare_decoder_input_ids_from_labels(labels=batch.labels)
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            decoder_input_ids=dec_in, decoder_attention_mask=batch.decoder_attention_mask, use_cache=False,
        ).logits  # (B, L, V): decoder positions are all target positions
        sel = batch.labels != -100
        rows = sel.nonzero()[:, 0]
        return F.cross_entropy(at_least_float32(logits[sel]), batch.labels[sel], reduction="none"), rows
    mask, cache_kw = batch.attention_mask, {}
    if cache is not None:  # the prefix's positions are attended to as well
        k = cache.get_seq_length()
        mask = torch.cat([torch.ones((len(batch), k), dtype=mask.dtype, device=mask.device), mask], dim=1)
        cache_kw = dict(cache=cache, use_cache=True)
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=mask, **(cache_kw or dict(use_cache=False))
    ).last_hidden_state  # (B, T, H)
    targets = batch.labels[:, 1:]  # token t is predicted at position t-1
    sel = targets != -100  # (B, T-1)
    h = hidden[:, :-1][sel]  # (M, H): only the positions that predict a target token
    logits = at_least_float32(model.get_output_embeddings()(h))  # (M, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    rows = sel.nonzero()[:, 0]
    return F.cross_entropy(logits, targets[sel], reduction="none"), rows


def block_losses(model: Any, batch: Batch, n_blocks: int, seq2seq: bool) -> torch.Tensor:
    """Mean answer-token loss of each of the ``n_blocks`` equal row blocks of ``batch``: shape (n_blocks,).

    The one loss of training (a block per task or per model) and of routed composition (one block): the
    mean of :func:`token_losses` per block, so it optimises exactly what the evaluator scores (soft-capping
    included). A block without answer tokens scores 0.
    """
    tok_loss, rows = token_losses(model, batch, seq2seq)
    block = rows // (len(batch) // n_blocks)  # block of each answer token
    sums = torch.zeros(n_blocks, device=tok_loss.device, dtype=tok_loss.dtype).index_add(0, block, tok_loss)
    return sums / torch.bincount(block, minlength=n_blocks).clamp_min(1)
