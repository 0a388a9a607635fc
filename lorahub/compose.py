"""Composition algebra: pure functions, no I/O.

LoraHub composes N modules with weights w by summing A and B *separately*:

    A_w = Σᵢ wᵢ·Aᵢ          # (r, in)
    B_w = Σᵢ wᵢ·Bᵢ          # (out, r)
    ΔW  = B_w · A_w · s     # = Σᵢⱼ wᵢwⱼ·BᵢAⱼ·s, cross terms included; s = alpha / r

This is neither PEFT's ``add_weighted_adapter(combination_type="linear")`` (which puts √|w| on A and B)
nor ``"cat"`` (exactly Σᵢ wᵢBᵢAᵢ at rank N·r). Keeping rank r is what lets the result load as an
ordinary LoRA adapter of the same shape as the modules.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .store import StackedModules


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


def composed_layers(stacked: StackedModules, weights: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer path, the composed (A (r, in), B (out, r)) of one weighting (N,)."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (len(stacked),):
        raise ValueError(f"weights has shape {tuple(w.shape)}, expected ({len(stacked)},) — one per module")
    return {l: compose_one(w.to(stacked.A[l].device), stacked.A[l], stacked.B[l]) for l in stacked.layers}


def delta_weights(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> dict[str, torch.Tensor]:
    """ΔW per layer (out, in) = B · A · scaling: what merging adds to the base weight."""
    return {l: (b.float() @ a.float()) * scaling for l, (a, b) in layers.items()}


def peft_state_dict(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Composed layers as a PEFT adapter state dict (the key names PEFT writes and loads)."""
    sd = {}
    for l, (a, b) in layers.items():
        sd[f"base_model.model.{l}.lora_A.weight"] = a.detach().contiguous()
        sd[f"base_model.model.{l}.lora_B.weight"] = b.detach().contiguous()
    return sd


def l1_penalty(weights: torch.Tensor, coef: float) -> torch.Tensor:
    """LoraHub's regulariser: coef · mean|w| over the modules, per candidate (..., N) -> (...)."""
    return coef * weights.abs().mean(dim=-1)
