"""Time axes (numeric model time or datetime64) and forecast-analysis alignment on valid time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from correction.timeunits import PHYSICAL_ALIASES, SECONDS

from .base import NS_PER_HOUR, InputError

# unit names and lengths: the one table of correction.timeunits
_UNIT_NAMES = PHYSICAL_ALIASES
_UNIT_NS = {name: int(seconds) * 10**9 for name, seconds in SECONDS.items()}


def _time_kind(values: np.ndarray, where: str) -> str:
    if np.issubdtype(values.dtype, np.datetime64):
        return "datetime"
    if np.issubdtype(values.dtype, np.timedelta64):
        return "timedelta"
    if np.issubdtype(values.dtype, np.number) and not np.issubdtype(values.dtype, np.bool_):
        return "numeric"
    raise InputError(
        f"{where} has values of type {values.dtype}; expected numbers or datetime64 "
        "(cftime calendars are not supported: open the data with standard calendars)"
    )


@dataclass(frozen=True)
class TimeAxis:
    """Numeric model time, or datetime64/timedelta64 handled as int64 nanoseconds."""

    kind: str  # "numeric" | "datetime" | "timedelta"
    units: str | None = None  # the numeric time's units attribute

    @property
    def is_numeric(self) -> bool:
        return self.kind == "numeric"

    @property
    def unit(self) -> str:
        """Singular time unit of the target's units (``K per hour``)."""
        if not self.is_numeric:
            return "hour"
        if self.units in (None, "", "1"):
            return "model time unit"
        return _UNIT_NAMES.get(self.units.strip().lower(), self.units)

    @property
    def window_units(self) -> str:
        if not self.is_numeric:
            return "hours"
        return "model time units" if self.units in (None, "", "1") else self.units

    def num(self, values: Any) -> np.ndarray:
        """Times as float64 (numeric) or int64 nanoseconds."""
        values = np.asarray(values)
        if self.is_numeric:
            return values.astype(np.float64)
        unit = "datetime64[ns]" if self.kind == "datetime" else "timedelta64[ns]"
        return values.astype(unit).astype(np.int64)

    def to_units(self, span: float) -> float:
        """A span in stored numbers -> the window's units (hours for datetime)."""
        return float(span) if self.is_numeric else float(span) / NS_PER_HOUR

    def fmt(self, value: float | None) -> Any:
        """A time or span for JSON attributes and messages."""
        if value is None or (isinstance(value, float) and math.isinf(value)):
            return None
        if self.is_numeric:
            return float(f"{float(value):.12g}")
        if self.kind == "datetime":
            return str(np.datetime_as_string(np.datetime64(int(value), "ns"), unit="s"))
        return f"{int(value) / NS_PER_HOUR:g}h"

    def fmt_span(self, value: float) -> str:
        return f"{float(value):g}" if self.is_numeric else f"{int(value) / NS_PER_HOUR:g}h"

    def parse_span(self, value: Any, what: str) -> float | int:
        """A window, gap or tolerance: a number (numeric time) or a duration (datetime)."""
        if self.is_numeric:
            try:
                if isinstance(value, bool):
                    raise TypeError
                span = float(value)
            except (TypeError, ValueError):
                raise InputError(
                    f"{what} {value!r} is not a number; times are numeric, so give "
                    "it in the data's time units (for example 0.05)"
                ) from None
            if not math.isfinite(span):
                raise InputError(f"{what} must be finite, got {value!r}")
            return span
        bare = isinstance(value, int | float | np.number) and not isinstance(value, np.timedelta64)
        if isinstance(value, str):  # "6" from a command line: a number, not 6 nanoseconds
            try:
                float(value)
                bare = True
            except ValueError:
                pass
        if bare:
            raise InputError(
                f"{what} {value!r} has no unit; times are datetime64, so give a duration "
                "such as '6h', '90min' or 'PT6H'"
            )
        try:
            return int(pd.Timedelta(value).value)
        except (TypeError, ValueError):
            raise InputError(
                f"{what} {value!r} is not a duration (examples: '6h', '90min', 'PT6H', '1D')"
            ) from None

    def parse_point(self, text: Any, what: str) -> float | int:
        """A split boundary: a number, or an ISO date/time (datetime)."""
        if self.is_numeric:
            try:
                return float(text)
            except (TypeError, ValueError):
                raise InputError(f"{what} {text!r} is not a number") from None
        if self.kind == "timedelta":
            return self.parse_span(text, what)
        try:
            value = np.datetime64(text if not isinstance(text, str) else text.strip(), "ns")
        except (TypeError, ValueError):
            raise InputError(f"{what} {text!r} is not an ISO date or time") from None
        if np.isnat(value):
            raise InputError(f"{what} {text!r} is not an ISO date or time")
        return int(value.astype(np.int64))


def iso_duration(ns: int) -> str:
    """An ISO 8601 duration such as ``PT6H`` or ``PT1H30M``."""
    seconds = ns / 1e9
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = "PT"
    text += f"{int(hours)}H" if hours else ""
    text += f"{int(minutes)}M" if minutes else ""
    text += f"{secs:g}S" if secs else ""
    return text if text != "PT" else "PT0S"


def _check_axis(values: np.ndarray, nums: np.ndarray, where: str, axis: TimeAxis) -> None:
    """Times must be present, unique and strictly increasing."""
    bad = ~np.isfinite(nums) if axis.is_numeric else np.isnat(values)
    if bad.any():
        raise InputError(f"{where} has a missing (NaN/NaT) value at position {np.argmax(bad)}")
    if len(nums) < 2:
        return
    step = np.diff(nums)
    if (step == 0).any():
        i = int(np.argmax(step == 0)) + 1
        raise InputError(f"{where} has duplicate times: {axis.fmt(nums[i])} appears twice")
    if (step < 0).any():
        i = int(np.argmax(step < 0)) + 1
        raise InputError(
            f"{where} is not monotonic increasing: {axis.fmt(nums[i])} follows "
            f"{axis.fmt(nums[i - 1])} (sort the data by time first)"
        )


def match_times(sorted_times: np.ndarray, query: np.ndarray, tol: float) -> np.ndarray:
    """Index of the nearest of ``sorted_times`` to each query, or -1 beyond ``tol``."""
    sorted_times, query = np.asarray(sorted_times), np.asarray(query)
    if len(sorted_times) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    right = np.clip(np.searchsorted(sorted_times, query), 0, len(sorted_times) - 1)
    left = np.clip(right - 1, 0, len(sorted_times) - 1)
    d_right = np.abs(sorted_times[right] - query)
    d_left = np.abs(sorted_times[left] - query)
    idx = np.where(d_left <= d_right, left, right)
    best = np.minimum(d_left, d_right)
    return np.where(best <= tol, idx, -1).astype(np.int64)


@dataclass(frozen=True)
class Alignment:
    """Which forecasts give a sample, and where their analyses are."""

    init_index: np.ndarray  # into the forecasts' init times, one per sample
    valid_index: np.ndarray  # into the analysis times: analysis(t + W)
    state_index: np.ndarray | None  # into the analysis times: analysis(t), or None
    skipped: np.ndarray  # init indices without the analyses they need
    outside: np.ndarray  # per skipped: the needed time lies outside the analysis period


def align(
    analysis_times: np.ndarray,
    init_times: np.ndarray,
    lead: float,
    tol: float,
    state_from_analysis: bool = True,
) -> Alignment:
    """Match each forecast ``(t, lead)`` with the analyses at ``t + lead`` (and ``t``).

    Times are numbers (or int64 nanoseconds), both sorted; a match is the nearest
    analysis within ``tol``.
    """
    ana, init = np.asarray(analysis_times), np.asarray(init_times)
    valid_query = init + lead
    valid = match_times(ana, valid_query, tol)
    ok = valid >= 0
    state = None
    if state_from_analysis:
        state = match_times(ana, init, tol)
        ok &= state >= 0
    skipped = np.flatnonzero(~ok)
    if len(ana):
        lo, hi = ana[0] - tol, ana[-1] + tol
        out = (valid_query[skipped] < lo) | (valid_query[skipped] > hi)
        if state_from_analysis:
            out |= (init[skipped] < lo) | (init[skipped] > hi)
    else:
        out = np.ones(len(skipped), dtype=bool)
    keep = np.flatnonzero(ok)
    return Alignment(
        init_index=keep,
        valid_index=valid[keep],
        state_index=None if state is None else state[keep],
        skipped=skipped,
        outside=out,
    )
