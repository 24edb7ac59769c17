"""Bring your own model: a centre-shaped archive through the whole chain, by the command line.

The archive, in the issue's shape: five fields on a periodic 16 x 32 lat/lon grid
(t, u, v, q on three pressure levels, surface pressure), 6-hourly datetime64
analyses in monthly netCDF files, an archive of forecasts under IFS's
``time``/``step`` names with leads 0-12 h from a host that lacks a constant
tendency of the truth (the model error). The host model runs as an external
process over ``mecs-step/1`` (``correction.reference_host --model grid``). The
chain: increments -> pretrain -> emulator (process host) -> finetune
``emulator``, ``unrolled`` and ``hybrid`` (process host) -> an emulator of the
archive alone (``archive:``) -> serve -> hindcasts through the service with the
process host -> verify against the analyses, with the archive's uncorrected
forecasts as the reference. The corrected hindcasts must beat the archive at the
longest lead for every field and level (area-weighted RMSE against analyses).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import xarray as xr

from correction import artifacts
from correction.reference_host import grid_means, grid_tendency
from mecs.cli import main

FIELDS = ("t", "u", "v", "q")  # on LEVELS, then "ps"
LEVELS = (850.0, 500.0, 250.0)
UNITS = {"t": "K", "u": "m s-1", "v": "m s-1", "q": "kg kg-1", "ps": "Pa"}
NLAT, NLON = 16, 32
SPREAD = np.repeat([5.0, 5.0, 5.0, 0.002], 3).tolist() + [500.0]  # per channel
BIAS = np.repeat([0.4, 0.2, -0.2, 1e-4], 3).tolist() + [40.0]  # per toy time unit
HOST = (
    f"process:{sys.executable} -m correction.reference_host --model grid --channels 13 "
    f"--nlat {NLAT} --nlon {NLON} --dt 3 --time-unit hour"
)
STEPS_PER_6H = 2  # the toy's step (0.1 of its own time) stands for 3 hours


def _dataset(values, time_dims, coords):
    """Channels ``[..., 13, lat, lon]`` -> the five fields, levels first."""
    out = {}
    for i, f in enumerate(FIELDS):
        part = values[..., 3 * i : 3 * i + 3, :, :].astype(np.float32)
        out[f] = ((*time_dims, "lev", "lat", "lon"), part, {"units": UNITS[f]})
    out["ps"] = (
        (*time_dims, "lat", "lon"),
        values[..., 12, :, :].astype(np.float32),
        {"units": "Pa"},
    )
    return xr.Dataset(out, coords=coords)


def _archive(tmp_path, n=360, seed=0):
    rng = np.random.default_rng(seed)
    spread = np.array(SPREAD).reshape(-1, 1, 1)
    mean = grid_means(3, 4)
    x = mean + spread * rng.standard_normal((13, NLAT, NLON))
    truth = []
    for _ in range(n):
        for _ in range(STEPS_PER_6H):
            x = x + 0.1 * grid_tendency(x, BIAS) + 0.02 * spread * rng.standard_normal(x.shape)
        truth.append(x.copy())
    truth = np.array(truth)
    ana = truth + 0.01 * spread * rng.standard_normal(truth.shape)
    times = np.datetime64("2023-01-01T00", "ns") + np.arange(n) * np.timedelta64(6, "h")
    coords = {
        "lev": ("lev", list(LEVELS), {"units": "hPa", "positive": "down"}),
        "lat": ("lat", np.linspace(-78.75, 78.75, NLAT), {"units": "degrees_north"}),
        "lon": ("lon", np.arange(NLON) * 11.25, {"units": "degrees_east"}),
    }
    an = _dataset(ana, ("time",), {"time": times, **coords})
    for month, part in an.groupby("time.month"):
        part.to_netcdf(tmp_path / f"an_2023{month:02d}.nc")
    # the archive: the host (no bias) from every second analysis, leads 0, 6, 12 h
    inits = np.arange(0, n - 2, 2)
    fc = np.empty((len(inits), 3, 13, NLAT, NLON))
    for j, i in enumerate(inits):
        y = ana[i].copy()
        fc[j, 0] = y
        for k in range(1, 3):
            for _ in range(STEPS_PER_6H):
                y = y + 0.1 * grid_tendency(y)
            fc[j, k] = y
    steps = np.array([0, 6, 12]) * np.timedelta64(1, "h").astype("timedelta64[ns]")
    arch = _dataset(fc, ("time", "step"), {"time": times[inits], "step": steps, **coords})
    arch.to_netcdf(tmp_path / "fc_archive.nc")
    return times


def _ok(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, (argv[0], captured.err[-2000:])
    return captured.out


# 90 s on 2 cores: slow; test_gridded_online, test_verification and test_process_host
# cover its stages one by one in the fast suite
@pytest.mark.slow
def test_the_whole_chain_on_a_centre_shaped_archive(tmp_path, capsys, start_server):
    times = _archive(tmp_path)
    analyses = str(tmp_path / "an_*.nc")
    archive = str(tmp_path / "fc_archive.nc")
    ifs = "time=init_time,step=lead_time"
    test_start = str(times[300])
    split = f"train=2023-01-01:2023-03-01,val=2023-03-02T12:2023-03-15,test={test_start}:2023-04-30"
    inc = tmp_path / "increments.zarr"
    _ok(
        [
            "increments",
            "--analyses",
            analyses,
            "--forecasts",
            archive,
            "--dims",
            ifs,
            "--window",
            "6h",
            "--split",
            split,
            "--out",
            str(inc),
            "--scheduler",
            "sync",
            "--no-progress",
        ],
        capsys,
    )
    repo = tmp_path / "models"
    pre = tmp_path / "pretrain.json"
    pre.write_text(
        json.dumps(
            {
                "network": "column-mlp",
                "params": {"hidden": 32, "depth": 2},
                "max_epochs": 30,
                "batch_size": 64,
            }
        )
    )
    _ok(
        [
            "pretrain",
            "--data",
            str(inc),
            "--repository",
            str(repo),
            "--name",
            "centre",
            "--config",
            str(pre),
            "--no-progress",
        ],
        capsys,
    )
    v1 = artifacts.read_config(repo / "centre" / "1")
    assert v1["time"]["unit"] == "hour" and v1["layout"]["fields"] == [*FIELDS, "ps"]
    emu = tmp_path / "emulator"
    emu_cfg = tmp_path / "emulator.json"
    emu_cfg.write_text(
        json.dumps(
            {
                "network": "bilinear-cnn",
                "params": {"hidden": 24, "kernel": 3},
                "n_states": 3000,
                "epochs": 15,
                "rollout_steps": 3,
                "perturbations": [0.0, 0.3],
            }
        )
    )
    _ok(
        [
            "emulator",
            "--host",
            HOST,
            "--data",
            analyses,
            "--out",
            str(emu),
            "--config",
            str(emu_cfg),
            "--no-progress",
        ],
        capsys,
    )
    for mode in ("emulator", "unrolled", "hybrid"):
        _ok(
            [
                "finetune",
                "--mode",
                mode,
                "--host",
                HOST,
                "--data",
                analyses,
                "--repository",
                str(repo),
                "--name",
                "centre",
                "--from",
                "1",
                "--emulator",
                str(emu),
                "--iterations",
                "20",
                "--unroll",
                "2",
                "--batch-size",
                "8",
                "--no-progress",
            ],
            capsys,
        )
    assert artifacts.list_versions(repo, "centre") == [1, 2, 3, 4]
    for v in (2, 3, 4):
        cfg = artifacts.read_config(repo / "centre" / str(v))
        assert cfg["training"]["host_spec"] == HOST and cfg["time"]["host_dt"] == 3.0
    # no live host at all: the emulator learns the archive's 6 h steps, emulator mode uses it
    arch_host = f"archive:{archive}"
    arch_emu = tmp_path / "archive_emulator"
    _ok(
        [
            "emulator",
            "--host",
            arch_host,
            "--archive-dims",
            ifs,
            "--data",
            analyses,
            "--out",
            str(arch_emu),
            "--config",
            str(emu_cfg),
            "--no-progress",
        ],
        capsys,
    )
    emu_config = artifacts.read_config(arch_emu)
    assert emu_config["emulator"]["dt"] == 6.0 and emu_config["emulator"]["host"] == arch_host
    for mode, code in (("unrolled", 2), ("emulator", 0)):
        rc = main(
            [
                "finetune",
                "--mode",
                mode,
                "--host",
                arch_host,
                "--data",
                analyses,
                "--repository",
                str(repo),
                "--name",
                "centre",
                "--from",
                "1",
                "--emulator",
                str(arch_emu),
                "--iterations",
                "10",
                "--unroll",
                "2",
                "--batch-size",
                "8",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert rc == code, err
        if code:
            assert "is a forecast archive" in err and "process:COMMAND" in err
    assert artifacts.list_versions(repo, "centre") == [1, 2, 3, 4, 5]
    server_repo_versions = artifacts.list_versions(repo, "centre")
    assert server_repo_versions[-1] == 5
    # the hindcasts below use version 4 (hybrid, the process host), pinned
    server = start_server(repo)
    hind = tmp_path / "hindcasts.zarr"
    _ok(
        [
            "forecast",
            "--host",
            HOST,
            "--init",
            analyses,
            "--init-time",
            test_start,
            "--hindcast",
            "--init-every",
            "2",
            "--steps",
            "4",
            "--output-every",
            "2",
            "--service",
            server.url,
            "--model",
            "centre",
            "--version",
            "4",
            "--out",
            str(hind),
            "--no-progress",
        ],
        capsys,
    )
    out = _ok(
        [
            "verify",
            "--analyses",
            analyses,
            "--forecasts",
            str(hind),
            "--reference",
            archive,
            "--reference-dims",
            ifs,
            "--out",
            str(tmp_path / "verify"),
        ],
        capsys,
    )
    print(out)
    metrics = json.loads((tmp_path / "verify" / "metrics.json").read_text())
    assert metrics["weighting"] == "cos(latitude)"
    assert metrics["schema"] == "mecs-evaluation/1" and metrics["kind"] == "analyses"
    for f in (*FIELDS, "ps"):
        entry = metrics["forecasts"]["forecast"]["fields"][f]
        ratio = np.atleast_1d(np.array(metrics["rmse_vs_reference"][f][-1], float))
        for j, level in enumerate(entry["levels"] or ["surface"]):
            rmse = np.atleast_1d(entry["rmse"][-1])[j]
            ref = np.atleast_1d(metrics["forecasts"]["reference"]["fields"][f]["rmse"][-1])[j]
            print(
                f"table: {f} {level} 12h corrected {rmse:.4g} archive {ref:.4g} "
                f"ratio {ratio[j]:.3f}"
            )
        assert np.all(ratio < 1.0), (f, ratio)  # every level, at the longest lead (12 h)
    _gate_on_the_archive(tmp_path, repo, inc, analyses, test_start, pre, capsys)


def _gate_on_the_archive(tmp_path, repo, inc, analyses, test_start, pre, capsys):
    """The promotion gate on the archive, with the process host: a candidate trained on
    sign-flipped targets is refused against the pretrained production version; with it
    made production (a rollback to it), the pretrained version wins and is promoted.

    (Shuffled targets would not do here: this archive's model error is a constant
    tendency, which a network trained on shuffled targets learns as the mean increment:
    it scored 1.0005 of the pretrained version's RMSE.)"""
    from correction import stages

    bad = _negated_targets(inc, tmp_path / "negated.zarr")
    _ok(
        ["pretrain", "--data", str(bad), "--repository", str(repo), "--name", "centre"]
        + ["--config", str(pre), "--no-progress"],
        capsys,
    )
    assert stages.read(repo, "centre").stages[6] == "candidate"
    gate = ["promote", "--repository", str(repo), "--name", "centre", "--data", analyses]
    gate += ["--host", HOST, "--since", test_start, "--intervals", "2", "--init-every", "2"]
    gate += ["--free-run", "8"]
    assert main([*gate, "--version", "6", "--out", str(tmp_path / "refused.json")]) == 3
    refused = json.loads((tmp_path / "refused.json").read_text())["scores"]
    print(capsys.readouterr().out)
    assert refused["ratio"] > 1.02 and set(refused["fields"]) == {*FIELDS, "ps"}
    assert stages.read(repo, "centre").production([1, 2, 3, 4, 5, 6]) == 1
    rollback = ["promote", "--repository", str(repo), "--name", "centre", "--rollback"]
    assert main([*rollback, "--version", "6", "--reason", "test: a bad production"]) == 0
    assert main([*gate, "--version", "1", "--out", str(tmp_path / "promoted.json")]) == 0
    promoted = json.loads((tmp_path / "promoted.json").read_text())["scores"]
    print(capsys.readouterr().out)
    assert promoted["ratio"] < 0.99
    book = stages.read(repo, "centre")
    assert book.production([1, 2, 3, 4, 5, 6]) == 1 and book.stages[6] == "retired"
    decisions = [(r["version"], r["decision"]) for r in book.records]
    assert decisions[-3:] == [(6, "refused"), (6, "rollback"), (1, "promoted")]
    print(
        f"table: byom gate: sign-flipped candidate ratio {refused['ratio']:.3f} (refused); "
        f"pretrained against it {promoted['ratio']:.3f} (promoted)"
    )


def _negated_targets(store, out):
    """A copy of an increment store with increments and targets of the opposite sign (and
    their statistics to match): a network trained on it adds the model error twice."""
    from correction.storage import open_zarr, write_zarr
    from data_pipeline.increments.base import MARKER

    ds = open_zarr(store).load()
    for v in [v for v in ds.data_vars if v.startswith(("target_", "increment_"))]:
        ds[v].values[...] = -ds[v].values
    ds.attrs["content_hash"] = "negated-" + str(ds.attrs.get("content_hash"))
    write_zarr(ds, out)
    stats = json.loads((store / "stats.json").read_text())
    for entry in stats["fields"].values():
        for role in ("increment", "target"):
            mean = entry[role]["mean"]  # per level, or one number for a surface field
            entry[role]["mean"] = [-m for m in mean] if isinstance(mean, list) else -mean
    (out / "stats.json").write_text(json.dumps(stats))
    (out / MARKER).write_text(ds.attrs["content_hash"])
    return out
