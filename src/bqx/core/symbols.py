"""Instrument symbols ("pairs"): one grammar, the same name in every command and output."""

from __future__ import annotations

import re
from collections.abc import Sequence

from bqx.errors import BqxError, InvalidOption

# The 28 crosses of the report: every pair of AUD CAD CHF EUR GBP JPY NZD USD in market order.
REPORT_PAIRS: tuple[str, ...] = (
    "audcad", "audchf", "audjpy", "audnzd", "audusd", "cadchf", "cadjpy", "chfjpy",
    "euraud", "eurcad", "eurchf", "eurgbp", "eurjpy", "eurnzd", "eurusd", "gbpaud",
    "gbpcad", "gbpchf", "gbpjpy", "gbpnzd", "gbpusd", "nzdcad", "nzdchf", "nzdjpy",
    "nzdusd", "usdcad", "usdchf", "usdjpy",
)  # fmt: skip

_PAIR_RE = re.compile(r"[A-Za-z]{6}")


def is_pair(name: str) -> bool:
    """Whether ``name`` is a valid symbol in its stored (lower-case) form."""
    return bool(_PAIR_RE.fullmatch(name)) and name == name.lower()


def validate_pair(pair: str) -> str:
    """Return the pair lowercased, or refuse anything that is not six ASCII letters."""
    if not isinstance(pair, str) or not _PAIR_RE.fullmatch(pair.strip()):
        raise BqxError(f"invalid pair name {pair!r}: a pair is six ASCII letters, e.g. EURUSD")
    return pair.strip().lower()


def parse_pairs(text: str | Sequence[str] | None) -> list[str] | None:
    """Parse ``EURUSD,GBPUSD`` (or a list) into validated lowercase names, order kept."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    pairs = [validate_pair(p) for p in items if p.strip()]
    if not pairs:
        raise InvalidOption("pairs", text, "give at least one pair, e.g. EURUSD")
    return list(dict.fromkeys(pairs))
