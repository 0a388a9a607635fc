"""One progress display for every long-running step: a tqdm bar on a terminal, plain lines otherwise.

A bar opened while another one is open is an inner bar (a composition inside a BBH job, a module's training
inside a hub build): on a terminal it is cleared when it closes (``leave=False``), so it leaves no line per
job; in plain-line mode (a log file, a pipe) it prints nothing, so the log holds the outer progress only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

_open_bars = 0  # enabled bars open now; a bar opened while one is open is an inner one


def _terminal() -> bool:
    """A live display is possible: stderr is a terminal, or tqdm.auto picked a notebook widget."""
    from tqdm.autonotebook import tqdm as notebook_or_std
    from tqdm.std import tqdm as std_tqdm

    return notebook_or_std is not std_tqdm or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class LineProgress:
    """tqdm's ``update``/``set_postfix``/``close`` API, printing a line at most every ``interval`` s to stderr.

    ``silent=True`` prints nothing (progress off, or an inner bar in plain-line mode) but still counts.
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", initial: int = 0,
                 silent: bool = False, interval: float = 10.0):
        self.total, self.desc, self.unit, self.n, self.silent, self.interval = total, desc, unit, initial, silent, interval
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.printed_n = initial
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.silent and time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def _line(self) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        tail = f"  {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{total} {self.unit}  {time.monotonic() - self.t0:.1f} s{tail}", file=sys.stderr, flush=True)
        self.last, self.printed_n = time.monotonic(), self.n

    def close(self) -> None:
        if not self.closed and not self.silent and self.n != self.printed_n:
            self._line()
        self.closed = True

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Tracked:
    """Counts an enabled display as open until it closes (so displays opened meanwhile are inner ones)."""

    def __init__(self, inner: Any):
        self.inner, self.closed = inner, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def close(self) -> None:
        global _open_bars
        if not self.closed:
            self.closed = True
            _open_bars -= 1
            self.inner.close()

    def __enter__(self) -> "_Tracked":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, enabled: bool = True, *, unit: str = "it", initial: int = 0) -> Any:
    """A progress display with tqdm's ``update(n)``, ``set_postfix(**kw)``, ``set_postfix_str``, ``n`` and ``close()``.

    ``enabled=False``: counts silently. Otherwise a tqdm bar when stderr is a terminal (cleared on close if it
    is an inner bar), else plain lines on stderr (none for an inner bar). Close it (or use ``with``).
    """
    global _open_bars
    if not enabled:
        return LineProgress(total, desc, unit=unit, initial=initial, silent=True)
    inner = _open_bars > 0
    if _terminal():
        from tqdm.auto import tqdm

        display: Any = tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=not inner)
    else:
        display = LineProgress(total, desc, unit=unit, initial=initial, silent=inner)
    _open_bars += 1
    return _Tracked(display)
