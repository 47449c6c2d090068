"""Valid rows read by ``bqx ingest``, kept per month on disk until every file is read.

``Spill`` keeps bars, ``TickSpill`` ticks aggregated into minute bars. Both are read back one
month at a time, sorted and unique, so memory holds a month, not the input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bqx.sources.columns import US_PER_MIN


class Spill:
    """Valid rows per month on disk: (time µs, input order, o, h, l, c, v) records."""

    dtype = np.dtype([("t", "<i8"), ("seq", "<i8"), ("v", "<f8", (5,))])

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.seq = 0  # rows added so far
        self.nulls = np.zeros(3, bool)  # some open, high, low is NULL

    def add(self, times: np.ndarray, ohlcv: np.ndarray) -> None:
        if not len(times):
            return
        self.nulls |= np.isnan(ohlcv[:, :3]).any(axis=0)
        rec = np.empty(len(times), dtype=self.dtype)
        rec["t"], rec["v"] = times, ohlcv
        rec["seq"] = np.arange(self.seq, self.seq + len(times))
        self.seq += len(times)
        self._write(rec)

    def _write(self, rec: np.ndarray) -> None:
        """Append records to their months' files."""
        months = (rec["t"] // US_PER_MIN).astype("datetime64[m]").astype("datetime64[M]")
        if months[0] == months[-1] and (months == months[0]).all():
            groups = [(months[0], rec)]
        else:
            order = np.argsort(months, kind="stable")
            ms, starts = np.unique(months[order], return_index=True)
            groups = list(zip(ms, np.split(rec[order], starts[1:]), strict=True))
        for m, part in groups:
            with open(self.dir / f"{m}.bin", "ab") as f:
                f.write(part.tobytes())

    def months(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.bin"))

    def read(self, month: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(times datetime64[us], ohlcv) sorted and unique, the last row read winning; dups."""
        rec = np.fromfile(self.dir / f"{month}.bin", dtype=self.dtype)
        if len(rec) > 1 and not (np.diff(rec["t"]) > 0).all():
            rec = rec[np.lexsort((rec["seq"], rec["t"]))]
            last = np.ones(len(rec), dtype=bool)
            last[:-1] = rec["t"][1:] != rec["t"][:-1]
            dups = int((~last).sum())
            rec = rec[last]
        else:
            dups = 0
        return rec["t"].astype("datetime64[us]"), rec["v"], dups

    def median_close(self, month: str) -> float:
        """The month's price level, from the records as spilled (no need to sort them)."""
        rec = np.fromfile(self.dir / f"{month}.bin", dtype=self.dtype)
        return float(np.median(rec["v"][:, 3]))


class TickSpill(Spill):
    """Ticks aggregated into minute bars: open the first tick, close the last (by time, then
    input order), high and low the extremes, volume the number of ticks.

    Each block of ticks is aggregated at once into partial bars, one per minute it holds
    (with the time and input order of its first and last tick), and those are spilled: a
    month costs about one record per minute and block, not one per tick. Reading a month
    combines its partial bars the same way. Ticks at the same instant are all counted: they
    are not duplicates.
    """

    dtype = np.dtype([("t", "<i8"), ("t0", "<i8"), ("s0", "<i8"), ("t1", "<i8"), ("s1", "<i8"),
                      ("v", "<f8", (5,))])  # fmt: skip

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.ticks = 0

    def add(self, times: np.ndarray, ohlcv: np.ndarray) -> None:
        """Ticks as one-tick bars (``validated_ticks``): open = high = low = close, volume 1."""
        if not len(times):
            return
        rec = np.empty(len(times), dtype=self.dtype)
        rec["t"] = times - times % US_PER_MIN
        rec["t0"] = rec["t1"] = times
        rec["s0"] = rec["s1"] = np.arange(self.seq, self.seq + len(times))
        rec["v"] = ohlcv
        self.seq += len(times)
        self.ticks += len(times)
        self._write(combine(rec))

    def read(self, month: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(minute times datetime64[us], ohlcv) of the month's bars, sorted; no duplicates."""
        rec = combine(np.fromfile(self.dir / f"{month}.bin", dtype=self.dtype))
        return rec["t"].astype("datetime64[us]"), rec["v"], 0


def combine(rec: np.ndarray) -> np.ndarray:
    """Partial minute bars (``TickSpill.dtype``) combined into one per minute, sorted."""
    if not len(rec):
        return rec
    first = rec[np.lexsort((rec["s0"], rec["t0"], rec["t"]))]
    starts = np.flatnonzero(np.r_[True, first["t"][1:] != first["t"][:-1]])
    ends = np.r_[starts[1:], len(first)] - 1
    # the same minutes in the same order, so group i is rows starts[i]..ends[i] in both
    last = rec[np.lexsort((rec["s1"], rec["t1"], rec["t"]))]
    out = np.empty(len(starts), dtype=rec.dtype)
    out["t"], out["t0"], out["s0"] = first["t"][starts], first["t0"][starts], first["s0"][starts]
    out["t1"], out["s1"] = last["t1"][ends], last["s1"][ends]
    v = first["v"]
    out["v"][:, 0] = v[starts, 0]
    out["v"][:, 1] = np.maximum.reduceat(v[:, 1], starts)
    out["v"][:, 2] = np.minimum.reduceat(v[:, 2], starts)
    out["v"][:, 3] = last["v"][ends, 3]
    out["v"][:, 4] = np.add.reduceat(v[:, 4], starts)
    return out
