"""Instrument symbols ("pairs"): one grammar, the same name in every command and output.

A symbol is what a broker or exchange calls an instrument: ``EURUSD``, ``XAUUSD``,
``EURUSD.m``, ``EURUSDm``, ``US500``, ``GER40``, ``BTCUSDT``, ``6E``, ``ESZ4``. The grammar:

- 1 to ``MAX_SYMBOL`` ASCII letters, digits, ``.``, ``_`` and ``-``, starting and ending with
  a letter or digit (so never ``..``, never a path, never a quote or a space);
- case-insensitive: ``EURUSD.m`` and ``eurusd.M`` are one instrument. bqx stores it lower case
  (table names) and shows it upper case (``display``) everywhere a person or a reader sees it:
  messages, JSON, export paths, feature files;
- not a name that collides with bqx's own tables or partitions: ``RESERVED`` words, and no
  ending ``_YYYY`` or ``_YYYYmMM`` (``bqx_eurusd_2024m07`` is EURUSD's July partition).

Why 32: the longest names in use are exchange contracts such as ``BTC-27DEC24-100000-C`` (20)
or ``1000000MOGUSDT`` (14); and PostgreSQL truncates names at 63 bytes, where the longest name
bqx builds from a symbol is a partition, ``bqx_{symbol}_2024m07`` (symbol + 12), which leaves
19 bytes for the affixes of a custom ``--source-table`` pattern (``m1_`` takes 3).
Names are always quoted identifiers in SQL (``store/names.py``); ``.`` and ``-`` make them
need the quotes in a hand-written query too: ``SELECT … FROM bqx."bqx_eurusd.m"``.
"""

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

MAX_SYMBOL = 32
_SYMBOL_RE = re.compile(rf"[a-z0-9](?:[a-z0-9._-]{{0,{MAX_SYMBOL - 2}}}[a-z0-9])?")
# a partition's suffix (store/ddl.py names partitions {table}_{YYYY}m{MM}; a yearly one would
# be {table}_{YYYY}): a symbol ending so would name another symbol's partition
_PARTITION_TAIL = re.compile(r"_\d{4}(m\d{2})?$")
# bqx's own tables are bqx_{word}, beside the targets bqx_{symbol} in the same schema
# (the ledger of store/ledger.py, the source versions of store/versions.py; a test keeps this
# list and those modules in step)
RESERVED = frozenset(
    {
        "runs",
        "jobs",
        "attempts",
        "targets",
        "source_versions",
        "target_versions",
        "generated_months",
        "verifications",
    }
)  # bqx_{name}: the ledger's tables
EXAMPLES = "e.g. EURUSD, EURUSD.m, XAUUSD, US500, BTCUSDT, 6E"


def _problem(name: str) -> str | None:
    """Why ``name`` (lower case, stripped) is not a symbol, or None when it is one."""
    if len(name) > MAX_SYMBOL:
        return f"longer than {MAX_SYMBOL} characters"
    if not _SYMBOL_RE.fullmatch(name):
        return (
            f"a symbol is 1 to {MAX_SYMBOL} letters, digits, '.', '_' or '-', starting and"
            f" ending with a letter or digit ({EXAMPLES})"
        )
    if name in RESERVED:
        return f"{name.upper()} is the name of one of bqx's own tables"
    if _PARTITION_TAIL.search(name):
        return "a symbol may not end in _YYYY or _YYYYmMM (bqx's partition names end so)"
    return None


def is_pair(name: str) -> bool:
    """Whether ``name`` is a valid symbol in its stored (lower-case) form."""
    return isinstance(name, str) and name == name.lower() and _problem(name) is None


def validate_pair(pair: str) -> str:
    """The symbol in its stored form (lower case), or a one-line refusal saying why not."""
    if not isinstance(pair, str):
        raise BqxError(f"invalid pair name {pair!r}: a symbol is text ({EXAMPLES})")
    name = pair.strip().lower()
    # ASCII before lowering: the Kelvin sign lowers to "k"
    ascii_ = pair.isascii()
    why = _problem(name) if ascii_ else "only ASCII letters, digits, '.', '_' and '-'"
    if why:
        shown = repr(pair) if len(pair) <= 40 else repr(pair[:40]) + "…"
        raise BqxError(f"invalid pair name {shown}: {why}")
    return name


def display(pair: str) -> str:
    """The one name a person or a reader sees: upper case (``EURUSD.M``, ``BTCUSDT``)."""
    return pair.upper()


def parse_pairs(text: str | Sequence[str] | None) -> list[str] | None:
    """Parse ``EURUSD,GBPUSD`` (or a list) into validated lowercase names, order kept."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    pairs = [validate_pair(p) for p in items if not isinstance(p, str) or p.strip()]
    if not pairs:
        raise InvalidOption("pairs", text, "give at least one pair, e.g. EURUSD")
    return list(dict.fromkeys(pairs))
