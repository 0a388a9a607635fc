"""Composition algebra and PEFT's LoRA key names: pure functions, no I/O.

LoraHub composes N modules with weights w by summing A and B *separately*:

    A_w = Σᵢ wᵢ·Aᵢ          # (r, in)
    B_w = Σᵢ wᵢ·Bᵢ          # (out, r)
    ΔW  = B_w · A_w · s     # = Σᵢⱼ wᵢwⱼ·BᵢAⱼ·s, cross terms included; s = alpha / r

This is neither PEFT's ``add_weighted_adapter(combination_type="linear")`` (which puts √|w| on A and B)
nor ``"cat"`` (exactly Σᵢ wᵢBᵢAᵢ at rank N·r). Keeping rank r is what lets the result load as an
ordinary LoRA adapter of the same shape as the modules.
"""

from __future__ import annotations

import re
from typing import Mapping, Protocol

import torch

Layers = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # layer path -> (A (r, in), B (out, r))
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")


class Stacked(Protocol):
    """N modules stacked per layer (:class:`lorahub.store.StackedModules`): A [N, r, in], B [N, out, r]."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]

    @property
    def layers(self) -> list[str]: ...

    def __len__(self) -> int: ...


def lora_key(layer: str, half: str) -> str:
    """The state-dict key PEFT writes (and loads) for ``layer``'s ``"A"`` or ``"B"`` matrix."""
    return f"base_model.model.{layer}.lora_{half}.weight"


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """(layer path, "A" or "B") of a PEFT LoRA key (with or without the prefix, named adapters too); else None."""
    m = _LORA_KEY.match(key)
    return (m["path"], m["ab"]) if m else None


def compose_population(
    weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composed (A, B) for P weightings at once.

    weights (P, N), A (N, r, in), B (N, out, r) -> A_p (P, r, in), B_p (P, out, r).
    """
    w = weights.to(A.dtype)
    return torch.einsum("pn,nri->pri", w, A), torch.einsum("pn,nor->por", w, B)


def compose_one(weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Composed (A, B) for one weighting: weights (N,) -> A (r, in), B (out, r)."""
    a, b = compose_population(weights.reshape(1, -1), A, B)
    return a[0], b[0]


def composed_layers(stacked: Stacked, weights: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer path, the composed (A (r, in), B (out, r)) of one weighting (N,)."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (len(stacked),):
        raise ValueError(f"weights has shape {tuple(w.shape)}, expected ({len(stacked)},) — one per module")
    return {l: compose_one(w.to(stacked.A[l].device), stacked.A[l], stacked.B[l]) for l in stacked.layers}


def delta_weights(layers: Layers, scaling: float, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ΔW per layer (out, in) = B · A · scaling in fp32: what merging adds to the base weight.

    ``dtype``: round A and B to it first, so that ΔW is that of the module as saved (e.g. fp16)."""
    if dtype is not None:
        layers = {l: (a.to(dtype), b.to(dtype)) for l, (a, b) in layers.items()}
    return {l: (b.float() @ a.float()) * scaling for l, (a, b) in layers.items()}


def peft_state_dict(layers: Layers, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Layers as a PEFT adapter state dict (A then B per layer), optionally cast and moved, contiguous."""
    return {lora_key(l, half): t.detach().to(device=device, dtype=dtype).contiguous()
            for l, ab in layers.items() for half, t in zip("AB", ab)}


def l1_penalty(weights: torch.Tensor, coef: float) -> torch.Tensor:
    """LoraHub's regulariser: coef · mean|w| over the modules, per candidate (..., N) -> (...)."""
    return coef * weights.abs().mean(dim=-1)
