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


def format_duration(seconds: float) -> str:
    """A span as people read it: ``45 s``, ``12 m 05 s``, ``1 h 03 m``, ``2 d 04 h``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} m {s:02d} s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m:02d} m"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"


def format_bytes(n: int) -> str:
    """A size as people read it: ``812 bytes``, ``9.1 MB``, ``3.5 GB``."""
    size = float(n)
    for unit in ("bytes", "kB", "MB"):
        if size < 1024:
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


def first_line(exc: BaseException | str | None) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    if exc is None:
        return ""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0]
