"""The benchmark generator: schema, determinism, accuracy, and the CLI's errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from correction.storage import open_zarr
from data_pipeline.config import BenchmarkConfig, ConfigError, load_config
from data_pipeline.letkf import gaussian_localization, letkf_update
from data_pipeline.synth import generate
from mecs.cli import main

STORES = [
    "truth.zarr",
    "observations.zarr",
    "analyses.zarr",
    "forecasts_archive.zarr",
    "forecasts.zarr",
]


def _tree_digest(root):
    """Hash every file's relative path and bytes."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_store_schema(tiny_synth, tiny_config):
    cfg = tiny_config
    truth = open_zarr(tiny_synth / "truth.zarr")
    assert truth["X"].dims == ("time", "k") and truth["X"].shape == (cfg.n_cycles + 1, cfg.K)
    assert truth["Y"].dims == ("time_y", "k", "j") and truth.sizes["j"] == cfg.J
    assert truth.attrs["Conventions"].startswith("CF-")
    for name in ["X", "Y"]:
        assert {"units", "long_name"} <= set(truth[name].attrs)
    np.testing.assert_allclose(np.diff(truth["time"].values), cfg.obs_interval, rtol=1e-9)

    obs = open_zarr(tiny_synth / "observations.zarr")
    assert obs.attrs["obs_sigma"] == cfg.obs_sigma
    ana = open_zarr(tiny_synth / "analyses.zarr")
    assert ana["X"].dims == ("time", "k") and "LETKF" in ana.attrs["analysis_method"]
    np.testing.assert_array_equal(ana["time"].values, truth["time"].values)

    for name, lead_max in [
        ("forecasts.zarr", cfg.forecast_lead_max),
        ("forecasts_archive.zarr", cfg.archive_lead_max),
    ]:
        fc = open_zarr(tiny_synth / name)
        assert fc["X"].dims == ("init_time", "lead_time", "k")
        assert fc["lead_time"].values[-1] == pytest.approx(lead_max)
        valid = fc["init_time"].values[:, None] + fc["lead_time"].values[None, :]
        np.testing.assert_allclose(fc["valid_time"].values, valid)
        # lead 0 is the analysis the forecast starts from
        np.testing.assert_allclose(
            fc["X"].isel(lead_time=0).values, ana["X"].sel(time=fc["init_time"]).values
        )
    test_fc = open_zarr(tiny_synth / "forecasts.zarr")
    assert test_fc["init_time"].values.min() >= cfg.test_start

    config = json.loads((tiny_synth / "config.json").read_text())
    assert config["config"] == cfg.to_dict() and config["config"]["seed"] == cfg.seed
    assert sorted(config["stores"]) == sorted(STORES)


def test_forecasts_are_host_runs(tiny_synth, tiny_config):
    from data_pipeline.benchmarks import L96Benchmark

    fc = open_zarr(tiny_synth / "forecasts_archive.zarr")["X"].isel(init_time=slice(0, 3))
    host = L96Benchmark(tiny_config).host()
    x = fc.isel(lead_time=0).values.astype(np.float64)
    for _ in range(5):  # one observation interval
        x = host.step(x)
    np.testing.assert_allclose(x.numpy(), fc.isel(lead_time=1).values, rtol=1e-5, atol=1e-5)


def test_analyses_beat_observations(tiny_synth):
    truth = open_zarr(tiny_synth / "truth.zarr")["X"].values
    ana = open_zarr(tiny_synth / "analyses.zarr")["X"].values
    obs = open_zarr(tiny_synth / "observations.zarr")["X"].values
    rmse = lambda a: float(np.sqrt(np.mean((a[40:] - truth[40:]) ** 2)))  # noqa: E731
    assert rmse(ana) < rmse(obs) < 0.11


def test_same_seed_same_bytes(tiny_synth, tiny_config, tmp_path):
    generate(tiny_config, tmp_path / "again", progress=False, log=lambda _: None)
    assert _tree_digest(tmp_path / "again") == _tree_digest(tiny_synth)
    generate(tiny_config.replace(seed=1), tmp_path / "other", progress=False, log=lambda _: None)
    assert _tree_digest(tmp_path / "other") != _tree_digest(tiny_synth)


def test_noisy_truth(tmp_path, tiny_config):
    cfg = tiny_config.replace(analysis="noisy-truth", obs_sigma=0.2)
    generate(cfg, tmp_path / "nt", progress=False, log=lambda _: None)
    truth = open_zarr(tmp_path / "nt" / "truth.zarr")["X"].values
    err = open_zarr(tmp_path / "nt" / "analyses.zarr")["X"].values - truth
    assert np.std(err) == pytest.approx(0.2, rel=0.05)


def test_letkf_update_pulls_towards_observations():
    rng = np.random.default_rng(0)
    truth = rng.standard_normal(10)
    ens = truth + 1.0 + 0.5 * rng.standard_normal((20, 10))
    obs = truth + 0.01 * rng.standard_normal(10)
    ana = letkf_update(ens, obs, 0.01, gaussian_localization(10, 2.0), 1.0)
    assert np.abs(ana.mean(0) - truth).max() < 0.05
    assert ana.std(0).mean() < ens.std(0).mean()


def test_config_validation():
    with pytest.raises(ConfigError, match="obs_sigma"):
        load_config(obs_sigma=-0.1)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("l97")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['bogus'\]"):
        load_config(bogus=1)
    with pytest.raises(ConfigError, match="whole multiple"):
        BenchmarkConfig(obs_interval=0.033)
    assert load_config("l96-2s-c4").c == 4.0
    assert load_config(quick=True).duration < BenchmarkConfig().duration


def test_config_file(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text("obs_sigma = 0.5\nmembers = 10\n")
    cfg = load_config(path=path, seed=7)
    assert (cfg.obs_sigma, cfg.members, cfg.seed) == (0.5, 10, 7)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "l97"], "invalid choice"),
        (["--obs-sigma", "-1"], "obs_sigma"),
        (["--config", "missing.json"], "cannot read config file"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["synth", "--out", str(out), "--quick", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_non_empty_output(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = main(["synth", "--out", str(out), "--quick"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--overwrite" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_console_script(tmp_path, tiny_config):
    """The installed entry point writes every store and says where."""
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(
        json.dumps({k: v for k, v in tiny_config.to_dict().items() if k != "preset"})
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mecs",
            "synth",
            "--out",
            str(tmp_path / "b"),
            "--config",
            str(cfg_file),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str((tmp_path / "b").resolve()) in proc.stdout
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted([*STORES, "config.json"])


@pytest.mark.slow
@pytest.mark.parametrize("sigma, bound", [(0.1, 0.12), (0.5, 0.35)])
def test_full_length_letkf_accuracy(tmp_path, sigma, bound):
    """The acceptance figure: ~1000 MTU of LETKF cycles on the default preset."""
    result = generate(
        load_config(obs_sigma=sigma), tmp_path / "full", progress=False, log=lambda _: None
    )
    assert result.analysis_rmse <= bound
