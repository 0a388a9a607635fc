"""Exact match as LoraHub computes it: ``strip().lower()`` with "." removed, reported ×100."""

from __future__ import annotations

from typing import Sequence


def normalize(text: str) -> str:
    return text.strip().lower().replace(".", "").strip()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference after :func:`normalize`."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return 100.0 * sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)
