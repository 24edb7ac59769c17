"""The qg-eddy / qg-jet benchmarks: presets, coarse-graining, stores, the increment pipeline."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from correction.hosts import make_host
from correction.storage import open_zarr
from data_pipeline.config import ConfigError
from data_pipeline.qg import (
    QG_PRESETS,
    QGBenchmark,
    filter_onset,
    load_qg_config,
    resample,
)
from data_pipeline.qg_stores import generate_qg, run_truth


@pytest.fixture(scope="module")
def quick_qg(tmp_path_factory):
    cfg = load_qg_config("qg-eddy", quick=True, duration=480.0, forecast_lead_max=48.0)
    out = tmp_path_factory.mktemp("qg") / "bench"
    generate_qg(cfg, out, progress=False, log=lambda _: None)
    return cfg, out


def test_presets_state_the_published_parameters():
    eddy, jet = load_qg_config("qg-eddy"), load_qg_config("qg-jet")
    assert (eddy.beta, eddy.delta, eddy.rek) == (1.5e-11, 0.25, 5.787e-7)
    assert (jet.beta, jet.delta, jet.rek) == (1.0e-11, 0.1, 7.0e-8)
    # a sharp cut just below the 64^2 filter's onset (20.8 cycles per domain)
    assert eddy.coarse_cutoff == jet.coarse_cutoff == 20.0 <= filter_onset(64) < 21
    for cfg in (eddy, jet):
        assert (cfg.truth_nx, cfg.host_nx, cfg.dt) == (256, 64, 1.0)
        assert (cfg.L, cfg.rd, cfg.H1, cfg.U1, cfg.U2) == (1.0e6, 15000.0, 500.0, 0.025, 0.0)
    assert set(QG_PRESETS) == {"qg-eddy", "qg-jet"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"truth_nx": 100, "host_nx": 64}, "multiple of host_nx"),
        ({"host_nx": 7}, "even integer"),
        ({"analysis": "4dvar"}, "know 'noisy-truth' and 'letkf'"),
        ({"analysis": "letkf", "obs_stride": 5}, "obs_stride"),
        ({"analysis": "letkf", "letkf_members": 1}, "letkf_members"),
        ({"analysis": "letkf", "letkf_inflation": 0.9}, "letkf_inflation"),
        ({"obs_interval": 2.5}, "whole multiple of dt"),
        ({"colour": 1}, "unknown setting"),
        ({"coarse_cutoff": 21}, "coarse_cutoff=21 must be .* onset, 20.8"),
        ({"coarse_cutoff": 0}, "coarse_cutoff=0"),
        ({"coarse_cutoff": "sharp"}, "coarse_cutoff='sharp'"),
    ],
)
def test_bad_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_qg_config("qg-eddy", **overrides)


def test_coarse_graining_of_a_band_limited_field_is_sampling():
    """A field with only modes the coarse grid resolves: truncation equals evaluating it on
    the coarse grid; zero-padding back up and truncating again is the identity."""
    big, small, L = 64, 16, 1.0e6

    def field(n):
        x = (torch.arange(n, dtype=torch.float64) + 0.0) * (L / n)
        k = 2 * math.pi / L
        f = torch.cos(3 * k * x)[None, :] * torch.sin(2 * k * x)[:, None]
        return torch.stack([f, 0.5 * torch.cos(5 * k * x)[:, None] + 0 * x[None, :]])

    torch.testing.assert_close(resample(field(big), small), field(small), atol=1e-12, rtol=0)
    coarse = field(small)
    torch.testing.assert_close(resample(resample(coarse, big), small), coarse, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cut", [None, "filter"])
def test_coarse_graining_removes_the_scales_the_host_cannot_hold(cut):
    cfg = load_qg_config("qg-eddy", quick=True, coarse_cutoff=cut)
    bench = QGBenchmark(cfg)
    g = torch.Generator().manual_seed(0)
    q = 1e-6 * torch.randn(2, cfg.truth_nx, cfg.truth_nx, generator=g, dtype=torch.float64)
    coarse = bench.coarse_grain(q)
    assert coarse.shape == (2, cfg.host_nx, cfg.host_nx)
    spec = torch.fft.rfft2(coarse).abs()
    assert spec[:, cfg.host_nx // 2, :].max() < 1e-12 * spec.max()  # the Nyquist row is empty
    # and a host step keeps it (nearly) empty: the filter removes what the products alias there
    again = torch.fft.rfft2(bench.host().step(coarse)).abs()
    assert again[:, cfg.host_nx // 2, :].max() < 1e-10 * again.max()


def test_the_stores_and_their_layout(quick_qg):
    cfg, out = quick_qg
    a = open_zarr(out / "analyses.zarr")
    assert a["q"].dims == ("time", "lev", "y", "x") and a["q"].shape[1:] == (2, 32, 32)
    assert a["time"].attrs["units"] == "hours" and a["q"].attrs["units"] == "s-1"
    assert len(a["time"]) == cfg.n_cycles + 1
    f = open_zarr(out / "forecasts_archive.zarr")
    assert f["q"].dims == ("init_time", "lead_time", "lev", "y", "x")
    np.testing.assert_allclose(f["q"].values[:, 0], a["q"].values)  # lead 0 is the analysis
    t = open_zarr(out / "truth.zarr")["q"].values
    noise = a["q"].values - t
    std = t.std(axis=(0, 2, 3))
    np.testing.assert_allclose(noise.std(axis=(0, 2, 3)) / std, cfg.obs_noise, rtol=0.1)
    assert np.abs(t).max() > 0 and np.isfinite(t).all()


def test_the_host_lacks_the_subgrid_forcing(quick_qg):
    """Host forecasts from the coarse-grained truth drift from it: the model error exists
    (a host as good as the truth would stay within the noise)."""
    cfg, out = quick_qg
    bench = QGBenchmark(cfg)
    t = open_zarr(out / "truth.zarr")["q"].values.astype(np.float64)
    per = cfg.steps(cfg.obs_interval, "obs_interval")
    x = torch.from_numpy(t[:-4])
    host = bench.host()
    for _ in range(4 * per):
        x = host.step(x)
    err = np.sqrt(((x.numpy() - t[4:]) ** 2).mean())
    assert err > 0.05 * t.std()


def _resolved_share_of_the_error(host, truth: np.ndarray, per: int) -> float:
    """The share of the one-cycle host error ``truth[i+1] - M(truth[i])`` (its variance)
    at wavenumbers the host filter leaves alone."""
    x = torch.from_numpy(truth[:-1])
    for _ in range(per):
        x = host.step(x)
    power = torch.fft.rfft2(torch.from_numpy(truth[1:]) - x).abs() ** 2
    n = truth.shape[-1]
    ky = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)[None, :]
    weight = torch.where(kx > 0, 2.0, 1.0)  # the rfft's half plane
    resolved = (kx**2 + ky**2).sqrt() <= filter_onset(n)
    return float((power * weight * resolved).sum() / (power * weight).sum())


def test_a_sharp_cut_moves_the_model_error_to_the_resolved_scales(quick_qg):
    """With the host filter as the coarse-graining, nearly all of a cycle's model error
    is the filter damping the band where the truth keeps energy (a correction learns to
    undo the filter); cut below that band, most of it lies at the resolved scales."""
    cfg, out = quick_qg
    assert cfg.coarse_cutoff == 10.0  # the quick preset's cut
    cut = open_zarr(out / "truth.zarr")["q"].values.astype(np.float64)
    filtered = run_truth(replace(cfg, coarse_cutoff="filter"), _truth_rng(cfg), progress=False)
    bench = QGBenchmark(cfg)
    host, per = bench.host(), cfg.steps(cfg.obs_interval, "obs_interval")
    assert _resolved_share_of_the_error(host, filtered, per) < 0.2
    assert _resolved_share_of_the_error(host, cut, per) > 0.5
    # the store's truth is the filtered truth cut (up to the store's float32)
    np.testing.assert_allclose(bench.recut(filtered), cut, rtol=0, atol=1e-6 * cut.std())


def _truth_rng(cfg) -> np.random.Generator:
    """The truth's stream of ``generate_qg`` (the first of the seed's three)."""
    return np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(3)[0])


def test_the_sharp_cut_of_a_filtered_store_is_the_cut_of_the_truth():
    """``recut`` of a host-filtered coarse truth equals coarse-graining with the cut, and
    the cut keeps exactly the wavenumbers up to ``coarse_cutoff``."""
    cfg = load_qg_config("qg-eddy", quick=True, coarse_cutoff=8.5)
    g = torch.Generator().manual_seed(1)
    q = 1e-6 * torch.randn(3, 2, cfg.truth_nx, cfg.truth_nx, generator=g, dtype=torch.float64)
    filtered = QGBenchmark(
        load_qg_config("qg-eddy", quick=True, coarse_cutoff="filter")
    ).coarse_grain(q)
    bench = QGBenchmark(cfg)
    direct = bench.coarse_grain(q)
    np.testing.assert_allclose(bench.recut(filtered.numpy()), direct.numpy(), rtol=0, atol=1e-18)
    n = cfg.host_nx
    spec = torch.fft.rfft2(direct).abs()
    k = torch.sqrt(
        torch.fft.fftfreq(n, d=1.0 / n)[:, None] ** 2
        + torch.fft.rfftfreq(n, d=1.0 / n)[None, :] ** 2
    )
    assert spec[..., k > 8.5].max() < 1e-12 * spec.max()
    kept = torch.fft.rfft2(resample(q, n)).abs()
    torch.testing.assert_close(spec[..., k <= 8.5], kept[..., k <= 8.5], rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match="coarse_cutoff"):
        QGBenchmark(load_qg_config("qg-eddy", quick=True, coarse_cutoff="filter")).recut(
            filtered.numpy()
        )


def test_a_given_truth_must_fit_the_config_and_is_recorded(quick_qg, tmp_path):
    cfg, out = quick_qg
    with pytest.raises(ConfigError, match="given truth has shape"):
        generate_qg(
            cfg, tmp_path / "s", progress=False, log=lambda _: None, truth=np.zeros((3, 2, 8, 8))
        )
    assert not (tmp_path / "s").exists()
    run = open_zarr(out / "truth.zarr")
    assert run.attrs["truth_source"] == "run"
    given = run["q"].values.astype(np.float64)
    generate_qg(cfg, tmp_path / "g", progress=False, log=lambda _: None, truth=given)
    derived = open_zarr(tmp_path / "g" / "truth.zarr")
    assert derived.attrs["truth_source"].startswith("given")
    assert derived["q"].values.tobytes() == run["q"].values.tobytes()


def test_the_same_seed_gives_the_same_bytes(quick_qg, tmp_path):
    cfg, out = quick_qg
    generate_qg(cfg, tmp_path / "again", progress=False, log=lambda _: None)
    for store in ("truth.zarr", "analyses.zarr", "forecasts_archive.zarr", "forecasts.zarr"):
        a = open_zarr(out / store)["q"].values
        b = open_zarr(tmp_path / "again" / store)["q"].values
        assert a.tobytes() == b.tobytes(), store
    short = load_qg_config(
        "qg-eddy",
        quick=True,
        spinup_host_years=0.0,
        duration=24.0,
        forecast_init_every=6.0,
        forecast_lead_max=6.0,
    )
    draws = [run_truth(short, np.random.default_rng(s), progress=False) for s in (0, 0, 1)]
    assert draws[0].tobytes() == draws[1].tobytes() != draws[2].tobytes()


def test_increments_on_the_2d_fields(quick_qg, tmp_path):
    from data_pipeline import build_increments

    cfg, out = quick_qg
    inc = tmp_path / "inc.zarr"
    build_increments(
        out / "analyses.zarr",
        out / "forecasts_archive.zarr",
        cfg.obs_interval,
        inc,
        split=cfg.increment_split(),
    )
    ds = open_zarr(inc)
    target = [v for v in ds.data_vars if "q" in v]
    assert target, list(ds.data_vars)
    assert {"lev", "y", "x"} <= set(ds[target[0]].dims)


def test_the_registered_host_matches_the_benchmark():
    bench = QGBenchmark(load_qg_config("qg-jet", quick=True))
    host = make_host("qg", **bench.host_params())
    assert host == bench.host() and host.state_shape == (2, 32, 32)
    assert bench.layout().state_shape == (2, 32, 32)


def test_mecs_synth_builds_a_qg_preset(tmp_path, capsys):
    from mecs.cli import main

    out = tmp_path / "s"
    code = main(
        [
            "synth",
            "--preset",
            "qg-jet",
            "--quick",
            "--duration",
            "240",
            "--out",
            str(out),
            "--no-progress",
            "--config",
            str(_write(tmp_path / "c.json", '{"forecast_lead_max": 48.0}')),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert open_zarr(out / "analyses.zarr")["q"].shape[1:] == (2, 32, 32)
    bad = _write(tmp_path / "bad.json", '{"analysis": "kalman"}')
    code = main(["synth", "--preset", "qg-jet", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert code == 2
    assert "know 'noisy-truth' and 'letkf'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _write(path, text):
    path.write_text(text)
    return path


def test_column_localization_sees_the_nearby_observations_of_both_layers():
    from data_pipeline.qg_letkf import column_neighbours, observation_indices

    n, stride, radius = 32, 4, 2.0
    obs = observation_indices(n, stride)
    assert len(obs) == 2 * (n // stride) ** 2 and obs[0] == 0 and obs[64] == n * n
    idx, rho = column_neighbours(n, stride, radius)
    assert idx.shape == rho.shape and idx.shape[0] == n * n
    # the column on an observed point sees it with weight 1, in both layers
    assert idx[0, 0] == 0 and rho[0, 0] == 1.0
    half = idx.shape[1] // 2
    np.testing.assert_array_equal(idx[:, half:], idx[:, :half] + len(obs) // 2)
    # periodic: column (0, 0) sees the observation at (0, 28) four points away
    j = list(idx[0, :half]).index(7)  # the 8th observation of the first row is x = 28
    assert rho[0, j] == pytest.approx(math.exp(-0.5 * (4 / radius) ** 2))
    assert (rho <= 1).all() and (rho >= 0).all()


def test_the_column_letkf_is_the_dense_letkf_with_the_same_localization():
    from data_pipeline.letkf import letkf_update
    from data_pipeline.qg_letkf import CUTOFF, column_neighbours, letkf_columns, observation_indices

    n, members, radius = 8, 6, 1.5
    rng = np.random.default_rng(0)
    ens = rng.normal(size=(members, 2, n, n))
    obs_index = observation_indices(n, 1)
    idx, rho = column_neighbours(n, 1, radius)
    obs, sigma = rng.normal(size=len(obs_index)), np.full(len(obs_index), 0.5)
    ours = letkf_columns(ens, obs, obs_index, sigma, idx, rho, 1.1)
    # the l96 filter on the flattened state, every point observed, with the same
    # weights: a column's two layers both see the observations of both layers
    gy, gx = (np.tile(g.ravel(), 2) for g in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    dy, dx = np.abs(gy[:, None] - gy[None, :]), np.abs(gx[:, None] - gx[None, :])
    d = np.hypot(np.minimum(dy, n - dy), np.minimum(dx, n - dx))
    loc = np.where(d <= CUTOFF * radius, np.exp(-0.5 * (d / radius) ** 2), 0.0)
    ref = letkf_update(ens.reshape(members, -1), obs, 0.5, loc, 1.1)
    np.testing.assert_allclose(ours.reshape(members, -1), ref, atol=1e-12)


def test_the_letkf_option_builds_the_stores_from_sparse_observations(tmp_path):
    cfg = load_qg_config(
        "qg-eddy",
        quick=True,
        duration=120.0,
        test_fraction=0.5,
        forecast_lead_max=48.0,
        analysis="letkf",
        obs_stride=2,
        letkf_members=12,
        letkf_localization=2.0,
        obs_noise=0.05,
        letkf_inflation=1.05,
    )
    out = tmp_path / "bench"
    lines = []
    generate_qg(cfg, out, progress=False, log=lines.append)
    truth = open_zarr(out / "truth.zarr")["q"].values
    ana = open_zarr(out / "analyses.zarr")
    assert (
        "LETKF" in ana.attrs["analysis_method"]
        and "512 observations" in (ana.attrs["analysis_method"])
    )
    err = np.sqrt(((ana["q"].values - truth) ** 2).mean(axis=(2, 3)))  # [time, lev]
    spread = truth.std(axis=(0, 2, 3))
    # from a climatological start (members drawn from other times), the first
    # analyses are far closer to the truth than a random state of the flow is
    assert (err[:4] < 0.25 * spread).all(), (err[:4], spread)
    assert any("per column" in line for line in lines)
