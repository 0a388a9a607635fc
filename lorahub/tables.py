"""Tables as text: one plain-text layout (for the terminal) and one markdown layout (for cards and reports)."""

from __future__ import annotations

from typing import Sequence


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a dashed rule under the head; trailing spaces stripped."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]], align: Sequence[str] | None = None) -> str:
    """A markdown table; ``align`` gives each column's rule (``---``, ``---:``), default ``---`` for all."""
    rule = align or ["---"] * len(head)
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in [head, rule, *rows])
