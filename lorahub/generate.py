"""Greedy batched generation (left padding + attention mask) and temporary weight merging.

A composed adapter is merged into the weights before generating, so prediction costs exactly what
the base model costs (the reference LoraHub also forgot the attention mask when batching). Prompts are
batched by length, and the tokens all prompts share (task description, in-context examples) run once.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Mapping, Sequence

import torch

from .data import format_example, pad_rows, shared_prefix_length
from .models import is_seq2seq
from .progress import progress_bar


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
    share_prefix: bool = True,
) -> list[str]:
    """Greedy answers for ``inputs`` (prompts as in training), cut at the first newline.

    Prompts are batched by length (little padding) and answers returned in input order. For a causal LM,
    the tokens that all prompts start with (a task description, in-context examples) are run once and
    their key/value cache is shared by every batch (``share_prefix``): each row is then
    ``[shared prefix][left padding][own tokens]`` with the padding masked and positions counted past it,
    which is what plain left padding computes, without recomputing the prefix for every prompt.
    """
    seq2seq = is_seq2seq(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts_all = [format_example(x, None, seq2seq=seq2seq)[0] for x in inputs]
    token_rows = tokenizer(prompts_all, add_special_tokens=True).input_ids if prompts_all else []
    order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))
    n_shared = shared_prefix_length(token_rows) if share_prefix and not seq2seq else 0
    prefix_cache = None
    if n_shared:
        prefix = torch.tensor([token_rows[0][:n_shared]], dtype=torch.long, device=device)
        prefix_cache = model(input_ids=prefix, use_cache=True).cache
    out: list[str] = [""] * len(prompts_all)
    with progress_bar(-(-len(order) // batch_size), "generate", progress, unit="batch") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            if seq2seq:
                old_side, tokenizer.padding_side = tokenizer.padding_side, "right"
                try:
                    enc = tokenizer([prompts_all[i] for i in idx], return_tensors="pt", padding=True).to(device)
                finally:
                    tokenizer.padding_side = old_side
                ids, mask = enc.input_ids, enc.attention_mask
            else:
                ids, mask = pad_rows([token_rows[i][n_shared:] for i in idx], pad_id, left=True)
                ids, mask = ids.to(device), mask.to(device)
                if n_shared:
                    ids = torch.cat([prefix.expand(len(idx), -1), ids], dim=1)
                    mask = torch.cat([torch.ones((len(idx), n_shared), dtype=mask.dtype, device=device), mask], dim=1)
                    cache = copy.deepcopy(prefix_cache)
                    cache.batch_repeat_interleave(len(idx))
                    kwargs["cache"] = cache
                # each row stops at its first newline (transformers' StopStringCriteria); the answer is cut there
                kwargs.update(stop_strings=["\n"], tokenizer=tokenizer)
            gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs, num_beams=1, temperature=None,
                                 top_p=None, top_k=None)
            new = gen if seq2seq else gen[:, ids.shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = clean_prediction(text)
            bar.update(1)
    return out
