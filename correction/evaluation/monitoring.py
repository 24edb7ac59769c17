"""Live skill of served corrections: the service's records matched with later analyses.

A recording service (``record_dir``) keeps a sample of the states it corrected,
the corrections it returned and each request's ``valid_time``. When the analyses
for those times arrive, each recorded sample at an analysis time ``t`` with an
analysis at ``t + w`` (``w`` the analysis interval) is scored the way data
assimilation sees a forecast: the host steps the recorded state ``x`` over
``w`` uncorrected, ``f = M_w(x)``, and with the served correction held over the
window, ``f + w c``. Per field,

    increment reduction = 1 - RMS(a(t+w) - f - w c) / RMS(a(t+w) - f),

the share of the increment (analysis minus forecast) the served correction
removed: 0 for no correction, 1 for a perfect one, below 0 for a harmful one.
For a host sending its analyses at cycle start this is the increment the
training data measure, so :func:`predicted_reduction` (the same figure on an
increment store's held-out split, with its spread over time blocks) says what
the monitoring should find.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from correction.layout import ModelLayout, field_slices
from correction.timeunits import TimeUnitError, scale

from .promotion import _interval


class MonitorError(ValueError):
    """Records or analyses the monitor cannot use; the message names which."""


def read_records(folder: str | Path) -> list[xr.Dataset]:
    """Every complete record file under ``folder`` (``<record_dir>/<model>``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MonitorError(f"no record directory {folder}")
    files = sorted(folder.glob("v*.nc"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    out = []
    for p in files:
        try:
            with xr.open_dataset(p, engine="netcdf4") as ds:
                out.append(ds.load())
        except (OSError, ValueError) as err:
            raise MonitorError(f"record file {p} cannot be read: {err}") from None
    return out


def _times(values: np.ndarray, kind: str) -> np.ndarray:
    """Recorded ``valid_time`` strings as the analyses' time type (NaT/NaN if unset)."""
    if kind == "M":
        return np.array([np.datetime64(v) if v else np.datetime64("NaT") for v in values])
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        with contextlib.suppress(ValueError):  # not a number: never matched
            out[i] = float(v) if v else np.nan
    return out


def score_records(
    records: list[xr.Dataset], analyses: xr.Dataset, host, threshold: float = 0.0
) -> dict[str, Any]:
    """Increment reduction by field and version of the recorded samples (see the module)."""
    if not records:
        raise MonitorError("no record files: is the service recording (record_dir)?")
    times = analyses["time"].values
    w = _interval(times, host)
    per = round(w / host.dt)
    if per < 1 or not math.isclose(per * host.dt, w, rel_tol=1e-6):
        raise MonitorError(f"the analysis interval {w} is not a whole number of host steps")
    kind = times.dtype.kind
    step = times[1] - times[0]
    out: dict[str, Any] = {"versions": {}, "samples": 0, "ood_samples": 0, "unmatched": 0}
    by_version: dict[int, list] = {}
    for ds in records:
        by_version.setdefault(int(ds.attrs["model_version"]), []).append(ds)
    for version, group in sorted(by_version.items()):
        layout = ModelLayout.from_dict(json.loads(group[0].attrs["layout"]))
        missing = [f for f in layout.fields if f not in analyses]
        if missing:
            raise MonitorError(f"the analyses have no field {missing[0]!r}")
        unit = group[0].attrs.get("time_unit")
        host_unit = getattr(host, "time_unit", None)
        try:
            factor = scale(unit, host_unit) if unit and host_unit else 1.0
        except TimeUnitError as err:
            raise MonitorError(f"record unit {unit!r} vs host {host_unit!r}: {err}") from None
        x = np.concatenate([g["state"].values for g in group]).astype(np.float64)
        c = np.concatenate([g["correction"].values for g in group]).astype(np.float64)
        vt = _times(np.concatenate([g["valid_time"].values.astype(str) for g in group]), kind)
        ood = np.concatenate([g["out_of_distribution"].values for g in group])
        out["samples"] += len(x)
        out["ood_samples"] += int(ood.sum())
        pos = np.searchsorted(times, vt)
        ok = (pos < len(times) - 1) & ~(np.isnat(vt) if kind == "M" else np.isnan(vt))
        ok &= np.where(ok, times[np.minimum(pos, len(times) - 1)] == vt, False)
        gap = times[np.minimum(pos + 1, len(times) - 1)] - times[np.minimum(pos, len(times) - 1)]
        if kind == "M":  # the next analysis is one interval later (no gap in the analyses)
            ok &= np.where(ok, gap == step, False)
        else:
            ok &= np.where(ok, np.abs(gap - step) <= 1e-6 * abs(step), False)
        out["unmatched"] += int((~ok).sum())
        if not ok.any():
            continue
        x, c, nxt = x[ok], c[ok], pos[ok] + 1
        a = layout.dataset_to_state(analyses.isel(time=nxt), "time").astype(np.float64)
        f = _host_steps(host, x, per)
        e_u = a - f
        e_c = e_u - w * factor * c
        fields = {}
        for name, sl in field_slices(layout):
            u = e_u if sl is None else e_u[:, sl]
            k = e_c if sl is None else e_c[:, sl]
            ru, rc = float(np.sqrt(np.mean(u * u))), float(np.sqrt(np.mean(k * k)))
            red = 1 - rc / ru if ru > 0 else float("nan")
            fields[name] = {
                "increment_rmse_uncorrected": ru,
                "increment_rmse_corrected": rc,
                "increment_reduction": red,
                "alert": bool(red < threshold),
            }
        out["versions"][str(version)] = {
            "stage": group[-1].attrs.get("model_stage"),
            "scored": int(ok.sum()),
            "fields": fields,
        }
    out["ood_rate"] = out["ood_samples"] / out["samples"] if out["samples"] else 0.0
    out["threshold"] = threshold
    return out


def _host_steps(host, x: np.ndarray, steps: int) -> np.ndarray:
    import torch

    from correction.hosts.base import to_tensor

    state = to_tensor(x, torch.float64)
    with torch.no_grad():
        for _ in range(steps):
            state = to_tensor(host.step(state), torch.float64)
    return state.numpy()


def predicted_reduction(corrector, store: str | Path, split: str = "test", blocks: int = 10):
    """The increment reduction the served version should show: on the store's
    ``split``, ``1 - RMS(increment - window c(state)) / RMS(increment)`` per field,
    and its spread (the standard deviation over ``blocks`` consecutive time blocks).
    With ``target = increment / window`` the window cancels: the figure is
    ``1 - RMS(target - c) / RMS(target)``."""
    from data_pipeline.increments import open_increments

    ds = open_increments(store)
    sel = ds["split"].values == split
    if not sel.any():
        raise MonitorError(f"increment store {store} has no {split!r} samples")
    layout = corrector.layout

    def stacked(role: str) -> np.ndarray:  # [sample, *state_shape] in the layout's order
        parts = [ds[f"{role}_{f}"].values[sel] for f in layout.fields]
        return (np.stack(parts, axis=1) if len(parts) > 1 else parts[0]).astype(np.float64)

    err_u = stacked("target")
    err_c = err_u - corrector(stacked("state"))
    out = {}
    for name, sl in field_slices(layout):
        u = err_u if sl is None else err_u[:, sl]
        k = err_c if sl is None else err_c[:, sl]
        red = 1 - np.sqrt(np.mean(k * k)) / np.sqrt(np.mean(u * u))
        per_block = [
            1 - np.sqrt(np.mean(kb * kb)) / np.sqrt(np.mean(ub * ub))
            for ub, kb in zip(np.array_split(u, blocks), np.array_split(k, blocks), strict=True)
            if len(ub)
        ]
        out[name] = {
            "increment_reduction": float(red),
            "spread": float(np.std(per_block, ddof=1)) if len(per_block) > 1 else 0.0,
            "samples": int(len(u)),
            "blocks": len(per_block),
        }
    return out
