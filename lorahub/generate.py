"""Greedy batched generation (left padding + attention mask) and temporary weight merging.

A composed adapter is merged into the weights before generating, so prediction costs exactly what
the base model costs (the reference LoraHub also forgot the attention mask when batching).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Any, Iterator, Mapping, Sequence

import torch

from .data import format_example
from .models import is_seq2seq


@contextlib.contextmanager
def merged_into(model: Any, deltas: Mapping[str, torch.Tensor]) -> Iterator[Any]:
    """Add ΔW to the named Linear weights for the duration of the block, then restore them exactly."""
    modules = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for layer, delta in deltas.items():
                w = modules[layer].weight
                saved[layer] = w.detach().clone()
                w.add_(delta.to(w.device, w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for layer, w0 in saved.items():
                modules[layer].weight.copy_(w0)


class _StopOnNewline:
    """Stop generation once every row has produced a newline (or EOS) after the prompt."""

    def __init__(self, stop_ids: torch.Tensor, prompt_len: int, eos_id: int | None):
        self.stop_ids, self.prompt_len, self.eos_id = stop_ids, prompt_len, eos_id

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kw: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        hit = torch.isin(new, self.stop_ids.to(new.device))
        if self.eos_id is not None:
            hit |= new == self.eos_id
        done = hit.any(dim=1)
        return done.all().expand(input_ids.shape[0]) if done.all() else torch.zeros_like(done)


@lru_cache(maxsize=8)
def _newline_token_ids(tokenizer: Any) -> torch.Tensor:
    ids = [i for tok, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([tok])]
    return torch.tensor(sorted(ids), dtype=torch.long)


def clean_prediction(text: str) -> str:
    """The answer as generated up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip() if text.strip() else ""


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy answers for ``inputs`` (prompts as in training), cut at the first newline."""
    from transformers import StoppingCriteriaList

    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if seq2seq else "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    iterator = range(0, len(inputs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="generate", unit="batch")
    try:
        for start in iterator:
            prompts = [format_example(x, None, seq2seq=seq2seq)[0] for x in inputs[start : start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            if not seq2seq:
                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [_StopOnNewline(_newline_token_ids(tokenizer), enc.input_ids.shape[1], tokenizer.eos_token_id)]
                )
            gen = model.generate(**enc, **kwargs, num_beams=1, temperature=None, top_p=None, top_k=None)
            new = gen if seq2seq else gen[:, enc.input_ids.shape[1] :]
            out.extend(clean_prediction(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out
