"""Train/validation/test splits as contiguous blocks of initial time."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import DEFAULT_SPLIT, SPLIT_NAMES, InputError
from .timeaxis import TimeAxis


def parse_split(spec: Any) -> tuple[str, Any]:
    """``"0.7:0.15:0.15"`` -> fractions; ``"train=0:700,val=710:850"`` -> raw ranges.

    Also accepts a sequence of fractions or a mapping ``{name: (start, end)}``.
    Range ends stay text until the time axis is known (:func:`assign_splits`).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = DEFAULT_SPLIT
    if isinstance(spec, Mapping):
        ranges = {}
        for name, bounds in spec.items():
            if name not in SPLIT_NAMES:
                raise InputError(f"split name {name!r} is not one of {list(SPLIT_NAMES)}")
            start, end = bounds
            ranges[name] = (start, end)
        if not ranges:
            raise InputError("the split names no block")
        return "ranges", ranges
    if isinstance(spec, str) and "=" in spec:
        ranges = {}
        for part in spec.split(","):
            name, sep, bounds = part.partition("=")
            name = name.strip()
            if not sep or name not in SPLIT_NAMES:
                raise InputError(
                    f"split part {part!r} is not NAME=START:END with NAME one of "
                    f"{list(SPLIT_NAMES)}"
                )
            if name in ranges:
                raise InputError(f"split block {name!r} is given twice")
            ranges[name] = bounds.strip()
        return "ranges", ranges
    parts = spec.split(":") if isinstance(spec, str) else list(spec)
    try:
        fractions = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise InputError(
            f"split {spec!r} is neither fractions (0.7:0.15:0.15) nor ranges "
            "(train=0:700,val=710:850,test=860:1000)"
        ) from None
    if not 1 <= len(fractions) <= 3:
        raise InputError(f"split {spec!r} needs 1 to 3 fractions (train:val:test)")
    if any(not (math.isfinite(f) and f >= 0) for f in fractions) or fractions[0] <= 0:
        raise InputError(f"split fractions must be non-negative and train positive: {spec!r}")
    if sum(fractions) > 1 + 1e-9:
        raise InputError(f"split fractions {spec!r} add up to {sum(fractions):g} > 1")
    return "fractions", fractions


def _range_bounds(text: Any, name: str, axis: TimeAxis) -> tuple[float, float]:
    """``"a:b"`` or ``"a..b"`` (ends inclusive, either may be empty) -> numbers."""
    if not isinstance(text, str):
        start, end = text
        return (
            -math.inf if start is None else axis.parse_point(start, f"split {name} start"),
            math.inf if end is None else axis.parse_point(end, f"split {name} end"),
        )
    cuts = [text.index("..")] if ".." in text else [i for i, c in enumerate(text) if c == ":"]
    width = 2 if ".." in text else 1
    last_err = None
    for cut in cuts:
        a, b = text[:cut].strip(), text[cut + width :].strip()
        try:
            start = -math.inf if not a else axis.parse_point(a, f"split {name} start")
            end = math.inf if not b else axis.parse_point(b, f"split {name} end")
        except InputError as err:
            last_err = err
            continue
        return start, end
    raise InputError(
        f"split block {name}={text!r} is not START:END"
        + (f" ({last_err})" if last_err is not None else "")
    )


def _round_boundary(value: float, axis: TimeAxis) -> float | int:
    if axis.is_numeric:
        return float(f"{value:.12g}")
    return int(round(value / 1e9)) * 10**9  # whole seconds


@dataclass(frozen=True)
class SplitPlan:
    labels: np.ndarray  # per sample: "train", "val", "test" or "" (in a gap)
    record: dict[str, Any]  # the boundaries actually used, for the store's attrs


def assign_splits(
    init: np.ndarray,
    spec: Any,
    axis: TimeAxis,
    window: float,
    gap: Any = None,
) -> SplitPlan:
    """Contiguous time blocks (ends inclusive) of the samples' init times.

    Fractions cut the init-time range ``[t0, t1]`` at ``t0 + cumsum(f) * (t1 - t0)``
    and leave a gap centred on each cut: ``gap`` or, by default, the larger of the
    window and 1 % of the range. Samples in a gap belong to no split.
    """
    method, parsed = parse_split(spec)
    init = np.asarray(init)
    labels = np.full(len(init), "", dtype=object)
    record: dict[str, Any] = {"method": method}
    if isinstance(spec, str):
        record["spec"] = spec
    blocks: dict[str, tuple[float, float]] = {}
    if method == "fractions":
        t0, t1 = (float(init.min()), float(init.max())) if len(init) else (0.0, 0.0)
        span = t1 - t0
        g = max(float(window), 0.01 * span) if gap is None else axis.parse_span(gap, "gap")
        if g < 0:
            raise InputError(f"gap must not be negative, got {gap!r}")
        g = _round_boundary(float(g), axis) if not axis.is_numeric else float(g)
        record["gap"] = axis.fmt_span(g)
        cum = np.cumsum(parsed)
        for i, name in enumerate(SPLIT_NAMES[: len(parsed)]):
            if parsed[i] == 0:
                continue
            start = t0 if i == 0 else t0 + cum[i - 1] * span + g / 2
            last = i == len(parsed) - 1 and cum[-1] >= 1 - 1e-9
            end = t1 if last else t0 + cum[i] * span - g / 2
            blocks[name] = (_round_boundary(start, axis), _round_boundary(end, axis))
    else:
        if gap is not None:
            raise InputError("gap applies to fraction splits; time ranges set their own gaps")
        record["gap"] = None
        for name, text in parsed.items():
            start, end = _range_bounds(text, name, axis)
            if start > end:
                raise InputError(f"split block {name} starts after it ends ({text!r})")
            blocks[name] = (start, end)
        ordered = sorted(blocks.items(), key=lambda kv: kv[1][0])
        for (n1, (_, e1)), (n2, (s2, _)) in zip(ordered, ordered[1:], strict=False):
            if s2 <= e1:
                raise InputError(f"split blocks {n1} and {n2} overlap")
    for name in SPLIT_NAMES:
        if name not in blocks:
            continue
        start, end = blocks[name]
        inside = (init >= start) & (init <= end)
        labels[inside & (labels == "")] = name
        record[name] = {
            "start": axis.fmt(start),
            "end": axis.fmt(end),
            "n_samples": int(inside.sum()),
            "first": axis.fmt(init[inside][0]) if inside.any() else None,
            "last": axis.fmt(init[inside][-1]) if inside.any() else None,
        }
    return SplitPlan(labels=labels, record=record)
