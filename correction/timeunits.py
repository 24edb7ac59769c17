"""Time units of corrections: what "per unit time" means, and converting between units.

A correction is a tendency, state units per unit time, and the unit is the one
the training increments were divided by (``window_units`` of an increments
store): an hour for datetime archives, a model time unit for benchmarks like
Lorenz-96, or a numeric time axis's own unit. A caller stepping in seconds must
not apply a per-hour correction as if it were per second (3,600 times too
large), so artifacts record the unit, the service states it, and a ``dt`` is
converted only between units that convert: physical units among themselves,
model time units only to themselves.
"""

from __future__ import annotations

MODEL_UNIT = "model time unit"
SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_ALIASES = {
    "s": "second",
    "sec": "second",
    "secs": "second",
    "second": "second",
    "seconds": "second",
    "min": "minute",
    "mins": "minute",
    "minute": "minute",
    "minutes": "minute",
    "h": "hour",
    "hr": "hour",
    "hrs": "hour",
    "hour": "hour",
    "hours": "hour",
    "d": "day",
    "day": "day",
    "days": "day",
    "model time unit": MODEL_UNIT,
    "model time units": MODEL_UNIT,
    "mtu": MODEL_UNIT,
    "1": MODEL_UNIT,
}


#: the physical aliases alone (``"h"`` -> ``"hour"``), for readers of time axes' units
PHYSICAL_ALIASES = {k: v for k, v in _ALIASES.items() if v in SECONDS}


class TimeUnitError(ValueError):
    """A time unit that is unknown or does not convert; the message says which."""


def canonical_unit(text: str) -> str:
    """``"h"``, ``"hours"`` -> ``"hour"``; ``"model time units"`` -> ``"model time unit"``."""
    unit = _ALIASES.get(str(text).strip().lower())
    if unit is None:
        raise TimeUnitError(f"unknown time unit {text!r}; use s, min, h, day or 'model time unit'")
    return unit


def seconds_per(unit: str) -> float | None:
    """Seconds in one ``unit``; None for model time units."""
    return SECONDS.get(canonical_unit(unit))


def scale(from_unit: str, to_unit: str) -> float:
    """The factor taking a rate per ``from_unit`` to a rate per ``to_unit``.

    ``rate_per_to = rate_per_from * scale(from, to)`` with ``seconds(to) / seconds(from)``:
    a per-hour correction is 1/3600 of itself per second.
    """
    a, b = canonical_unit(from_unit), canonical_unit(to_unit)
    if a == b:
        return 1.0
    if MODEL_UNIT in (a, b):
        raise TimeUnitError(
            f"cannot convert between {a}s and {b}s: model time units have no length in seconds"
        )
    return SECONDS[b] / SECONDS[a]
