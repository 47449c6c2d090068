"""Calendar months in UTC: the unit that partitions, jobs and reports are keyed by."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from bqx.errors import BqxError, InvalidOption


@dataclass(frozen=True, order=True)
class Month:
    """A calendar month in UTC; partitions and jobs are keyed by it."""

    year: int
    month: int

    def __post_init__(self) -> None:
        if not (1 <= self.month <= 12) or not (1900 <= self.year <= 2999):
            raise BqxError(f"invalid month {self.year}-{self.month:02d}")

    @classmethod
    def parse(cls, text: str) -> Month:
        """``2024-07`` (also ``2024m07`` and ``2024-07-01``)."""
        m = re.fullmatch(r"\s*(\d{4})[-m](\d{1,2})(?:-\d{1,2})?\s*", str(text))
        if not m:
            raise BqxError(f"invalid month {text!r}: expected YYYY-MM, e.g. 2024-07")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def of(cls, value: date | datetime) -> Month:
        """The UTC month of a date or time (an aware time is converted to UTC first)."""
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return cls(value.year, value.month)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """Exclusive end: the first instant of the next month."""
        return self.next().start

    @property
    def first_day(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def suffix(self) -> str:
        return f"{self.year:04d}m{self.month:02d}"

    def next(self) -> Month:
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def prev(self) -> Month:
        return Month(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    def plus(self, months: int) -> Month:
        """The month ``months`` later (earlier when negative)."""
        year, month0 = divmod(self.year * 12 + self.month - 1 + months, 12)
        return Month(year, month0 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


MonthLike = Month | str | date | datetime


def as_month(value: MonthLike | None, what: str = "month") -> Month | None:
    """A Month from a Month, ``YYYY-MM`` text, a date or a datetime (None stays None)."""
    if value is None or isinstance(value, Month):
        return value
    if isinstance(value, date | datetime):
        return Month.of(value)
    try:
        return Month.parse(value)
    except BqxError:
        raise InvalidOption(what, value, "expected YYYY-MM, e.g. 2024-07") from None


def check_span(start: Month | None, end: Month | None) -> None:
    """Refuse a reversed range (its end before its start) instead of covering nothing."""
    if start is not None and end is not None and end < start:
        raise InvalidOption("end", str(end), f"is before start {start}")


def month_range(start: Month, end: Month) -> list[Month]:
    """Months from start to end, both included."""
    check_span(start, end)
    out, m = [], start
    while m <= end:
        out.append(m)
        m = m.next()
    return out


def in_range(month: Month, start: Month | None, end: Month | None) -> bool:
    """Whether ``month`` lies in [start, end] (either bound may be open)."""
    return (start is None or month >= start) and (end is None or month <= end)


def parse_bound(text: str | date | datetime, param: str, *, end: bool = False) -> datetime:
    """A range bound: an ISO 8601 time (UTC unless it has an offset) or a month ``YYYY-MM``.

    A month as an end bound means the end of that month, so start ``2024-07`` and end
    ``2024-08`` cover July and August.
    """
    if isinstance(value := text, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        month = Month.of(value)
        return month.end if end else month.start
    text = str(text).strip()
    if re.fullmatch(r"\d{4}-\d{1,2}", text):
        month = Month.parse(text)
        return month.end if end else month.start
    try:
        t = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise InvalidOption(
            param, text,
            "give a time such as 2024-07-01T00:00 (UTC unless it has an offset) or a month"
            " such as 2024-07",
        ) from None  # fmt: skip
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
