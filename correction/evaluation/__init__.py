"""Forecast-skill and climate evaluation: metrics, the experiment, plots.

``metrics`` scores forecasts (numpy only), ``experiment`` runs the reference
forecasts (none, poly3, the models, the limit) on a benchmark, ``plots`` draws them.
"""

from __future__ import annotations

from correction.corrections import PolynomialCorrection

from .experiment import REPORT_LEADS, Benchmark, evaluate, fit_polynomial, run_forecasts
from .metrics import ACF_LAGS, VALID_THRESHOLD, clean_for_json, climate_stats, hellinger, valid_time
from .plots import write_plots

__all__ = [
    "ACF_LAGS",
    "REPORT_LEADS",
    "VALID_THRESHOLD",
    "Benchmark",
    "PolynomialCorrection",
    "clean_for_json",
    "climate_stats",
    "evaluate",
    "fit_polynomial",
    "hellinger",
    "run_forecasts",
    "valid_time",
    "write_plots",
]
