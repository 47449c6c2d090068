"""Small helpers for text that people read."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 job``, ``2 jobs``, ``1,234 rows``: a count with its noun in the right number."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def format_eta(eta: float | None) -> str:
    """Seconds as ``mm:ss`` or ``h:mm:ss``; ``--:--`` when unknown."""
    if eta is None:
        return "--:--"
    m, s = divmod(int(round(eta)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def first_line(exc: BaseException | str | None) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    if exc is None:
        return ""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0]
