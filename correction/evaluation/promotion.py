"""The promotion gate: a candidate version scored against production on held-out analyses.

``mecs promote`` asks one question before a version goes live: on the newest
analyses, which neither version trained on, does the candidate forecast better
than what is served now, and does it stay bounded when run freely? Both versions
run the same hindcasts with the same host (in this process, through the
service's forward path and guardrails, :class:`GuardedCorrection`), from every
``init_every``-th analysis of the held-out period; :func:`verify` scores both
against the analyses valid at each lead, by field and level. The candidate's
RMSE over production's is the figure the rule reads:

- the mean ratio over fields, levels and the rule's leads must be at most
  ``1 - margin`` (better by the margin);
- no field's mean ratio may exceed ``1 + tolerance`` (no field much worse);
- a free run of ``free_run_intervals`` from the newest analysis must stay finite
  and within ``bound_std`` climatological standard deviations of the analyses'
  mean everywhere (no blow-up, no drift out of the climate).

The scores, the rule, the data it read (path and a digest of the times and
values scored) and the decision go into the promotion record.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import xarray as xr

from correction.corrections import ZeroCorrection
from correction.forecast import run_forecast
from correction.guardrails import GuardedCorrection
from correction.inference import Corrector
from correction.timeunits import scale, seconds_per

from .verification import verify


class GateError(ValueError):
    """Settings or data the gate cannot use; the message names which."""


@dataclass(frozen=True)
class GateRule:
    """When a candidate wins (see the module). Leads are in analysis intervals."""

    intervals: int = 4
    leads: tuple[int, ...] | None = None  # None: every lead 1..intervals
    margin: float = 0.01
    tolerance: float = 0.02
    free_run_intervals: int = 200
    bound_std: float = 10.0
    init_every: int = 1
    max_inits: int = 64

    def __post_init__(self) -> None:
        if self.intervals < 1 or self.init_every < 1 or self.max_inits < 1:
            raise GateError("intervals, init_every and max_inits must be >= 1")
        if self.free_run_intervals < 0:
            raise GateError("free_run_intervals must be >= 0 (0: no free run)")
        if self.leads is not None:
            object.__setattr__(self, "leads", tuple(int(v) for v in self.leads))
            bad = [v for v in self.leads if not 1 <= v <= self.intervals]
            if bad or not self.leads:
                raise GateError(f"leads {list(self.leads)} must lie in 1..{self.intervals}")
        for name in ("margin", "tolerance"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -1 < v < 1):
                raise GateError(f"{name} must be a fraction in (-1, 1), got {v}")
        if not (self.bound_std > 0):
            raise GateError(f"bound_std must be positive, got {self.bound_std}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateRule:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GateError(f"unknown gate setting(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as err:
            raise GateError(f"gate settings: {err}") from None

    @property
    def scored_leads(self) -> tuple[int, ...]:
        return self.leads or tuple(range(1, self.intervals + 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["leads"] = list(self.scored_leads)
        return d


def _interval(times: np.ndarray, host) -> float:
    """The analysis interval in host time units (host steps times dt)."""
    if len(times) < 2:
        raise GateError("the analyses have fewer than two times")
    step = np.diff(times)
    if times.dtype.kind == "M":
        per = seconds_per(getattr(host, "time_unit", None) or "")
        if per is None:
            raise GateError("datetime analyses need a host with a physical time unit")
        seconds = step.astype("timedelta64[ns]").astype(np.int64) / 1e9
        step = seconds / per
    step = np.asarray(step, dtype=np.float64)
    if not np.allclose(step, step[0], rtol=1e-6):
        raise GateError("the analyses are not equally spaced in time")
    return float(step[0])


def _source(corrector: Corrector | None, host, cap_std, ood_std, runtime):
    if corrector is None:
        return ZeroCorrection()
    source = GuardedCorrection(
        corrector, cap_std=cap_std, ood_threshold_std=ood_std, runtime=runtime
    )
    unit = getattr(host, "time_unit", None)
    if unit is not None:
        source.time_scale = scale(corrector.time_unit, unit)
    return source


def _digest(ana: xr.Dataset, fields_: list[str]) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ana["time"].values).tobytes())
    for f in fields_:
        h.update(f.encode())
        h.update(np.ascontiguousarray(ana[f].values, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def held_out_start(ana: xr.Dataset, since: Any = None, fraction: float = 0.2) -> int:
    """Index of the first analysis of the held-out period: ``since``, else the store's
    ``test_start`` attribute (``mecs synth`` writes it), else the newest ``fraction``."""
    times = ana["time"].values
    datetime = times.dtype.kind == "M"
    start = since if since is not None else ana.attrs.get("test_start")
    if start is None:
        return int(len(times) * (1 - fraction))
    try:
        start = np.datetime64(start) if datetime else float(start)
    except (TypeError, ValueError):
        raise GateError(f"held-out start {start!r} is not a time of these analyses") from None
    return int(np.searchsorted(times, start))


def score(
    candidate: Corrector,
    production: Corrector,
    host,
    analyses: xr.Dataset,
    rule: GateRule,
    since: Any = None,
    cap_std: float | None = 10.0,
    ood_std: float = 6.0,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Hindcasts and free runs of both versions (and the uncorrected host, for
    context) on the held-out analyses; the figures :func:`decide` reads."""
    layout = candidate.layout
    if tuple(production.layout.state_shape) != tuple(layout.state_shape):
        raise GateError(
            f"candidate state shape {list(layout.state_shape)} is not production's "
            f"{list(production.layout.state_shape)}"
        )
    missing = [f for f in layout.fields if f not in analyses]
    if missing:
        raise GateError(f"the analyses have no field {missing[0]!r} (have {list(analyses)})")
    if tuple(host.state_shape) != tuple(layout.state_shape):
        raise GateError(
            f"host state shape {list(host.state_shape)} is not the model's "
            f"{list(layout.state_shape)}"
        )
    times = analyses["time"].values
    interval = _interval(times, host)
    per = round(interval / host.dt)
    if per < 1 or not math.isclose(per * host.dt, interval, rel_tol=1e-6):
        raise GateError(f"the analysis interval {interval} is not a whole number of host steps")
    first = held_out_start(analyses, since)
    last = len(times) - 1 - rule.intervals  # the longest lead must have an analysis
    picks = np.arange(max(first, 1), last + 1, rule.init_every)[: rule.max_inits]
    if len(picks) == 0:
        raise GateError(
            f"no initial time in the held-out period from {times[min(first, len(times) - 1)]}: "
            f"it needs at least {rule.intervals + 1} analyses"
        )
    x0 = layout.dataset_to_state(analyses.isel(time=picks), "time").astype(np.float64)
    bad = ~np.isfinite(x0.reshape(len(x0), -1)).all(axis=1)
    if bad.any():
        raise GateError(f"the analysis at {times[picks[np.argmax(bad)]]} has NaN or Inf")
    lead = np.arange(rule.intervals + 1) * (times[1] - times[0])
    runs, free = {}, {}
    clim = layout.dataset_to_state(analyses.isel(time=slice(0, max(first, 2))), "time")
    mean, std = clim.mean(axis=0), clim.std(axis=0) + 1e-12
    for label, corrector in (("candidate", candidate), ("production", production), ("none", None)):
        src = _source(corrector, host, cap_std, ood_std, runtime)
        try:
            res = run_forecast(host, x0, rule.intervals * per, src, output_every=per)
            # lead 0 is the analysis itself for every version: not scored
            runs[label] = _as_forecasts(layout, res.states[1:], analyses, times[picks], lead[1:])
        except FloatingPointError as err:
            runs[label] = str(err)
        if rule.free_run_intervals and corrector is not None:
            free[label] = _free_run(
                host, src, x0[-1:], rule.free_run_intervals * per, per, mean, std
            )
    for label, r in runs.items():
        if isinstance(r, str) and label != "none":
            raise GateError(f"the {label} hindcasts left the finite numbers: {r}")
    scored = list(layout.fields)
    cand = verify(runs["candidate"], analyses, scored, reference=runs["production"])
    out = {
        "held_out_start": str(times[first]) if first < len(times) else None,
        "n_inits": int(len(picks)),
        "init_times": [str(t) for t in times[picks]],
        "leads": list(rule.scored_leads),
        "data_digest": _digest(analyses.isel(time=slice(int(picks[0]), None)), scored),
        "fields": {},
        "free_run": free,
    }
    if not isinstance(runs["none"], str):
        none = verify(runs["none"], analyses, scored, reference=runs["production"])
    else:
        none = None
    rows = [v - 1 for v in rule.scored_leads]

    def at_leads(values) -> np.ndarray:  # [lead][level] -> the rule's leads x levels
        return np.array(values, dtype=float).reshape(len(cand["leads"]), -1)[rows]

    for f in scored:
        e = cand["fields"][f]
        ratio = at_leads(e["rmse_vs_reference"])
        entry = {
            "ratio_by_lead": ratio.mean(axis=1).tolist(),
            "ratio": float(np.nanmean(ratio)),
            "candidate_rmse": at_leads(e["rmse"]).mean(axis=1).tolist(),
            "production_rmse": at_leads(e["reference_rmse"]).mean(axis=1).tolist(),
            "candidate_acc": at_leads(e["acc"]).mean(axis=1).tolist(),
            "units": e["units"],
        }
        if none is not None:
            entry["none_rmse"] = at_leads(none["fields"][f]["rmse"]).mean(axis=1).tolist()
        out["fields"][f] = entry
    out["ratio"] = float(np.mean([e["ratio"] for e in out["fields"].values()]))
    return out


def _as_forecasts(layout, states, analyses, inits, lead) -> xr.Dataset:
    """Hindcast states ``[lead, init, *state]`` as ``(init_time, lead_time, ...)`` per field."""
    n_t, n_b = states.shape[:2]
    flat = states.reshape(n_t * n_b, *layout.state_shape)
    per_field = layout.state_to_dataset(flat, analyses, "case")
    data = {}
    for f in layout.fields:
        arr = per_field[f].values.reshape(n_t, n_b, *per_field[f].shape[1:]).swapaxes(0, 1)
        data[f] = (("init_time", "lead_time", *layout.field_dims[f]), arr)
    grid = {d: analyses[d] for d in analyses.coords if set(analyses[d].dims) <= set(layout.sizes)}
    return xr.Dataset(data, coords={"init_time": inits, "lead_time": lead, **grid})


def _free_run(host, src, x0, steps, every, mean, std) -> dict[str, Any]:
    """A free run: finite throughout, and how far it strays from the analyses' climate."""
    try:
        res = run_forecast(host, x0, steps, src, output_every=every)
    except FloatingPointError as err:
        return {"finite": False, "error": str(err), "max_std": None, "steps": steps}
    dev = np.abs(res.states[:, 0] - mean) / std
    return {"finite": True, "max_std": float(dev.max()), "steps": steps}


def decide(scores: dict[str, Any], rule: GateRule) -> tuple[bool, list[str]]:
    """Promote or not, and every reason (the passing checks too, for the record)."""
    reasons, ok = [], True
    ratio = scores["ratio"]
    need = 1 - rule.margin
    better = ratio <= need
    ok &= better
    reasons.append(
        f"mean RMSE ratio candidate/production {ratio:.4f} "
        f"{'<=' if better else '>'} {need:.4f} (margin {rule.margin:g})"
    )
    for f, e in scores["fields"].items():
        if e["ratio"] > 1 + rule.tolerance:
            ok = False
            reasons.append(
                f"field {f}: RMSE ratio {e['ratio']:.4f} > {1 + rule.tolerance:.4f} "
                f"(tolerance {rule.tolerance:g})"
            )
    fr = scores["free_run"].get("candidate")
    if fr is not None:  # the candidate's free run: finite and within bound_std
        if not fr["finite"]:
            ok = False
            reasons.append(f"free run of the candidate: {fr['error']}")
        elif fr["max_std"] > rule.bound_std:
            ok = False
            reasons.append(
                f"free run of the candidate strays {fr['max_std']:.1f} climatological std "
                f"from the analyses' mean (bound {rule.bound_std:g})"
            )
        else:
            reasons.append(
                f"free run of the candidate bounded ({fr['max_std']:.1f} <= "
                f"{rule.bound_std:g} std over {fr['steps']} steps)"
            )
    return bool(ok), reasons
