"""Skill and climate metrics: valid time, climate statistics, PDF distance.

Numpy only: the same functions score any forecast, whoever produced it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

VALID_THRESHOLD = 0.5
ACF_LAGS = (0.05, 0.25, 0.5, 1.0)


def valid_time(leads: np.ndarray, normalised_rmse: np.ndarray) -> float:
    """First lead where the normalised RMSE exceeds the threshold (interpolated)."""
    above = np.flatnonzero(~(normalised_rmse <= VALID_THRESHOLD))
    if len(above) == 0:
        return float(leads[-1])
    i = above[0]
    if i == 0 or not np.isfinite(normalised_rmse[i]):
        return float(leads[i])
    e0, e1 = normalised_rmse[i - 1], normalised_rmse[i]
    return float(leads[i - 1] + (VALID_THRESHOLD - e0) / (e1 - e0) * (leads[i] - leads[i - 1]))


def climate_stats(x: np.ndarray, dt: float, bins: np.ndarray) -> dict[str, Any]:
    """Mean, std, lag autocorrelation and a histogram of a run ``[time, K]``."""
    finite = np.isfinite(x).all(axis=1)
    n_ok = int(np.argmin(finite)) if not finite.all() else len(x)
    x = x[:n_ok]
    anomalies = x - x.mean(axis=0)
    var = (anomalies**2).mean(axis=0)
    acf = {}
    for lag in ACF_LAGS:
        s = int(round(lag / dt))
        if 0 < s < len(x):
            acf[str(lag)] = float(np.mean((anomalies[:-s] * anomalies[s:]).mean(axis=0) / var))
    hist, _ = np.histogram(x, bins=bins, density=True)
    return {
        "bounded": bool(n_ok == len(finite)),
        "length": float(n_ok * dt),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "acf": acf,
        "hist": hist.tolist(),
    }


def hellinger(p: np.ndarray, q: np.ndarray, width: float) -> float:
    """Hellinger distance between two densities on the same bins (0 same, 1 disjoint)."""
    p, q = np.asarray(p) * width, np.asarray(q) * width
    return float(np.sqrt(max(0.0, 1.0 - np.sum(np.sqrt(p * q)))))


def clean_for_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop private entries and turn NaN into null so the file is strict JSON."""

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items() if not k.startswith("_")}
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return fix(metrics)
