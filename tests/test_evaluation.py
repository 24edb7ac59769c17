"""Evaluation: valid time, the polynomial baseline, forecasts, free runs, plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from correction.evaluation import (
    Benchmark,
    PolynomialCorrection,
    climate_stats,
    hellinger,
    run_forecasts,
    valid_time,
    write_plots,
)
from correction.hosts import Lorenz96


def test_valid_time_interpolates_first_crossing():
    leads = np.array([0.0, 1.0, 2.0, 3.0])
    assert valid_time(leads, np.array([0.1, 0.4, 0.6, 0.2])) == pytest.approx(1.5)
    assert valid_time(leads, np.array([0.1, 0.2, 0.3, 0.4])) == 3.0  # never crosses
    assert valid_time(leads, np.array([0.1, np.nan, 0.3, 0.4])) == 1.0  # blew up


def test_polynomial_fit_recovers_a_cubic():
    rng = np.random.default_rng(0)
    x = rng.normal(2, 4, (500, 36))
    y = 0.3 - 0.5 * x + 0.02 * x**2 + 0.001 * x**3 + 0.01 * rng.standard_normal(x.shape)
    poly = PolynomialCorrection.fit(x, y)
    np.testing.assert_allclose(poly.coefficients, [0.3, -0.5, 0.02, 0.001], atol=2e-3)
    np.testing.assert_allclose(poly(torch.from_numpy(x)).numpy(), y, atol=0.05)


def test_run_forecasts_marks_blown_up_members():
    host = Lorenz96()
    x0 = 10 + np.random.default_rng(0).standard_normal((2, 36))
    explode = lambda x: torch.where(x[:, :1] > -1e9, 1e6 * torch.ones_like(x), x)  # noqa: E731
    runs = run_forecasts(host, x0, 3, 5, explode)
    assert np.isnan(runs[:, -1]).all()
    calm = run_forecasts(host, x0, 3, 5)
    assert np.isfinite(calm).all() and calm.shape == (2, 4, 36)


def test_climate_stats_and_hellinger():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 4))
    bins = np.linspace(-5, 5, 41)
    s = climate_stats(x, 0.05, bins)
    assert s["bounded"] and abs(s["mean"]) < 0.05 and abs(s["std"] - 1) < 0.05
    assert abs(s["acf"]["0.05"]) < 0.05  # white noise
    width = bins[1] - bins[0]
    assert hellinger(s["hist"], s["hist"], width) == pytest.approx(0.0, abs=1e-6)
    shifted = climate_stats(x + 4, 0.05, bins)
    assert hellinger(s["hist"], shifted["hist"], width) > 0.8


def test_evaluate_on_tiny_benchmark(tiny_synth, tmp_path):
    """The limit beats the uncorrected host; the coupling-informed cubic helps too."""
    from correction.evaluation import evaluate

    bench = Benchmark.open(tiny_synth)
    # a cubic fitted to the true coupling of the stored truth (a cheap stand-in model)
    y = bench.truth_y.values.astype(np.float64)
    coupling = -(bench.config["h"] * bench.config["c"] / bench.config["b"]) * y.sum(-1)
    poly = PolynomialCorrection.fit(bench.truth_x[: len(coupling)], coupling)
    metrics = evaluate(
        bench,
        {"cubic-of-truth": poly},
        poly=poly,
        lead_max=2.0,
        free_run=5.0,
        keep_trajectories=True,
    )
    f = metrics["forecasts"]
    assert set(f) == {"none", "poly3", "cubic-of-truth", "limit"}
    assert f["limit"]["rmse_at"]["1.0"] < f["none"]["rmse_at"]["1.0"]
    assert f["poly3"]["rmse_at"]["1.0"] < f["none"]["rmse_at"]["1.0"]
    assert f["none"]["gap_closed"] == 0.0 and f["limit"]["gap_closed"] == 1.0
    assert metrics["free_run"]["poly3"]["bounded"]
    # the schema mecs verify writes too: kind, and per-field scores by lead
    assert metrics["schema"] == "mecs-evaluation/1" and metrics["kind"] == "truth"
    assert f["none"]["fields"]["X"]["rmse"] == list(f["none"]["rmse"])
    names = sorted(p.name for p in write_plots(metrics, tmp_path / "plots"))
    assert names == ["climate_pdf.png", "hovmoller.png", "rmse_vs_lead.png"]
    assert all((tmp_path / "plots" / n).stat().st_size > 5000 for n in names)
