"""The online half on a multi-field gridded state: emulator and every fine-tuning mode.

A toy host with two fields on a 4 x 6 periodic grid, temperature on two levels (K)
and surface pressure (Pa), so the channels differ by two orders of magnitude; the
truth adds a constant tendency the host lacks. Before channels were told apart the
emulator and the ``one-step`` mode crashed on such states, and the losses were
dominated by the pressure channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from correction import artifacts
from correction.hosts import BlackBoxHost
from correction.layout import ModelLayout
from correction.networks import CorrectionModel
from correction.training.emulator import EmulatorConfig, channel_stats, train_emulator
from correction.training.finetune import FinetuneConfig, finetune

LAYOUT = ModelLayout(
    ("T", "ps"),
    {"T": ("lev", "lat", "lon"), "ps": ("lat", "lon")},
    {"T": ("lev",), "ps": ()},
    ("lat", "lon"),
    {"lev": 2, "lat": 4, "lon": 6},
    {"T": "K", "ps": "Pa"},
)
MEAN = torch.tensor([280.0, 250.0, 1.0e5]).reshape(3, 1, 1)
BIAS = torch.tensor([0.4, -0.3, 40.0]).reshape(3, 1, 1)  # per unit time, what the host lacks


@dataclass
class GridHost:
    """Relaxation to a mean, zonal advection and diffusion, per channel; in torch."""

    bias: bool = False
    dt: float = 0.1
    name: str = "grid-toy"
    differentiable: bool = True
    state_shape: tuple[int, ...] = (3, 4, 6)

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        m = MEAN.to(x.dtype)
        adv = -0.8 * (torch.roll(x, -1, -1) - torch.roll(x, 1, -1)) / 2
        lap = torch.roll(x, 1, -1) + torch.roll(x, -1, -1) + torch.roll(x, 1, -2)
        lap = lap + torch.roll(x, -1, -2) - 4 * x
        # a small nonlinearity couples the levels, so the dynamics are not trivial
        mix = 0.05 * torch.tanh((x[..., :1, :, :] - x[..., 1:2, :, :] - 30.0) / 10.0)
        out = -(x - m) / 5.0 + adv + 0.2 * lap
        out = out + torch.cat([mix, -mix, 0 * mix], dim=-3)
        return out + BIAS.to(x.dtype) if self.bias else out

    def step(self, x):
        x = torch.as_tensor(x, dtype=torch.float64)
        return x + self.dt * self.tendency(x)  # forward Euler is enough for a toy


def _analyses(n=240, seed=0):
    rng = np.random.default_rng(seed)
    truth = GridHost(bias=True)
    spread = torch.tensor([5.0, 5.0, 500.0], dtype=torch.float64).reshape(3, 1, 1)
    x = MEAN.double() + spread * torch.from_numpy(rng.standard_normal((3, 4, 6)))
    out = []
    with torch.no_grad():
        for _ in range(n):
            for _ in range(2):  # two host steps per analysis interval
                x = truth.step(x) + 0.02 * spread * torch.from_numpy(rng.standard_normal((3, 4, 6)))
            out.append(x.numpy().copy())
    a = np.array(out)
    return a + 0.01 * spread.numpy() * rng.standard_normal(a.shape)  # analysis error


@pytest.fixture(scope="module")
def analyses():
    return _analyses()


@pytest.fixture(scope="module")
def emulator_path(tmp_path_factory, analyses):
    cfg = EmulatorConfig(
        network="bilinear-cnn",
        params={"hidden": 24, "kernel": 3},
        n_states=4000,
        epochs=20,
        rollout_steps=3,
        lr=3e-3,
        perturbations=(0.0, 0.3),
    )
    out = tmp_path_factory.mktemp("emu") / "emulator"
    path, metrics = train_emulator(
        GridHost(), "grid-toy", analyses, LAYOUT, out, cfg, progress=False
    )
    return path, metrics


def _repository(tmp_path, analyses):
    torch.manual_seed(0)
    model = CorrectionModel("column-mlp", {"hidden": 16, "depth": 2}, 3, 3, 2)
    mean, std = channel_stats(analyses, LAYOUT)
    model.set_normalisation(mean, std, np.zeros(3), np.array([0.5, 0.5, 50.0]))
    config = artifacts.build_config(
        model, LAYOUT, {"hidden": 16, "depth": 2}, training={"stage": "pretrain"}
    )
    artifacts.publish(tmp_path / "models", "grid", model, config)
    return tmp_path / "models"


def test_emulator_trains_per_channel_on_a_gridded_state(emulator_path, analyses):
    path, metrics = emulator_path
    _, config = artifacts.load(path)
    norm = config["normalisation"]
    assert len(norm["in_mean"]) == 3  # one statistic per field and level
    assert norm["in_std"][2] > 50 * norm["in_std"][0]  # Pa and K kept apart
    assert np.isfinite(metrics["one_step_rmse"])
    assert metrics["one_step_rmse"] < 0.1 * metrics["host_one_step_change_rms"]
    # the Jacobian, which emulator, hybrid and sip use, measured per channel
    assert metrics["one_step_tangent_rel_err"] < 0.5


@pytest.mark.parametrize(
    "mode", ["one-step", "unrolled", "emulator", "hybrid", "sip", "differentiable"]
)
def test_every_mode_runs_and_learns_on_a_gridded_state(tmp_path, analyses, emulator_path, mode):
    repo = _repository(tmp_path, analyses)
    cfg = FinetuneConfig.from_dict(
        {"mode": mode, "iterations": 30, "unroll": 2, "batch_size": 8, "lr": 3e-3, "val_every": 10}
    )
    host = GridHost()
    result = finetune(
        repo,
        "grid",
        analyses,
        host if mode == "differentiable" else BlackBoxHost.wrap(host),
        cfg,
        2,
        180,
        emulator_path=emulator_path[0],
        torch_host=host if mode == "differentiable" else None,
        progress=False,
    )
    first, best = result.history[0]["val_loss"], result.best_val
    assert np.isfinite(best) and best < first, (mode, first, best)
    assert artifacts.list_versions(repo, "grid") == [1, 2]


def grid_step(states):
    """The toy host as a ``python:`` host: numpy batches in and out."""
    with torch.no_grad():
        return GridHost().step(torch.from_numpy(np.asarray(states))).numpy()


def test_emulator_and_finetune_commands_on_a_gridded_netcdf_store(tmp_path, analyses, capsys):
    """Through the command line: an analyses file in a centre's shape, a python: host."""
    import xarray as xr

    from mecs.cli import main

    t = np.datetime64("2022-01-01T00", "ns") + np.arange(len(analyses)) * np.timedelta64(6, "h")
    coords = {
        "time": t,
        "lev": ("lev", [850.0, 500.0], {"units": "hPa", "positive": "down"}),
        "lat": ("lat", np.linspace(-45, 45, 4), {"units": "degrees_north"}),
        "lon": ("lon", np.linspace(0, 300, 6), {"units": "degrees_east"}),
    }
    ds = xr.Dataset(
        {
            "T": (("time", "lev", "lat", "lon"), analyses[:, :2], {"units": "K"}),
            "ps": (("time", "lat", "lon"), analyses[:, 2], {"units": "Pa"}),
        },
        coords=coords,
        attrs={"test_start": str(t[200])},
    )
    store = tmp_path / "analyses.nc"
    ds.to_netcdf(store)
    host = ["--host", "python:test_gridded_online:grid_step", "--host-dt", "3"]
    code = main(
        [
            "emulator",
            *host,
            "--data",
            str(store),
            "--out",
            str(tmp_path / "emu"),
            "--epochs",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    _, config = artifacts.load(tmp_path / "emu")
    assert config["layout"]["fields"] == ["T", "ps"] and config["layout"]["state_shape"] == [
        3,
        4,
        6,
    ]
    repo = _repository(tmp_path, analyses)
    code = main(
        [
            "finetune",
            "--mode",
            "hybrid",
            *host,
            "--data",
            str(store),
            "--repository",
            str(repo),
            "--name",
            "grid",
            "--emulator",
            str(tmp_path / "emu"),
            "--iterations",
            "6",
            "--unroll",
            "2",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = artifacts.read_config(repo / "grid" / "2")
    assert config["training"]["host_spec"] == "python:test_gridded_online:grid_step"
    assert config["time"]["host_dt"] == 3.0


def test_the_service_states_the_channel_order(start_server, tmp_path, analyses):
    from service.client import CorrectionClient

    repo = _repository(tmp_path, analyses)
    server = start_server(repo)
    with CorrectionClient(server.url, "grid") as c:
        meta = c.metadata()
        p = meta["parameters"]
        assert p["channels"] == ["T[lev=0]", "T[lev=1]", "ps"]
        assert p["layout"]["fields"] == ["T", "ps"] and p["dims"] == [
            "batch",
            "channel",
            "lat",
            "lon",
        ]
        x = analyses[:2]
        res = c.infer(x)
    assert res.correction.shape == (2, 3, 4, 6)


def test_forecast_of_a_several_field_model_in_process_and_through_the_service(
    start_server, tmp_path, analyses
):
    import xarray as xr

    from correction.storage import open_zarr
    from mecs.cli import main

    repo = _repository(tmp_path, analyses)
    t = np.arange(len(analyses)) * 0.2
    ds = xr.Dataset(
        {
            "T": (("time", "lev", "lat", "lon"), analyses[:, :2], {"units": "K"}),
            "ps": (("time", "lat", "lon"), analyses[:, 2], {"units": "Pa"}),
        },
        coords={"time": t, "lat": np.linspace(-45, 45, 4), "lon": np.arange(6.0)},
        attrs={"test_start": float(t[200])},
    )
    init = tmp_path / "init.nc"
    ds.to_netcdf(init)
    base = [
        "forecast",
        "--host",
        "python:test_gridded_online:grid_step",
        "--host-dt",
        "0.1",
        "--init",
        str(init),
        "--steps",
        "6",
        "--members",
        "3",
        "--model",
        "grid",
        "--no-progress",
    ]
    assert main([*base, "--repository", str(repo), "--out", str(tmp_path / "local.zarr")]) == 0
    server = start_server(repo)
    assert main([*base, "--service", server.url, "--out", str(tmp_path / "remote.zarr")]) == 0
    a, b = open_zarr(tmp_path / "local.zarr"), open_zarr(tmp_path / "remote.zarr")
    assert a["T"].dims == ("member", "time", "lev", "lat", "lon") and a["ps"].dims[-2:] == (
        "lat",
        "lon",
    )
    assert a.sizes["time"] == 7 and a.sizes["member"] == 3
    np.testing.assert_allclose(a["T"].values, b["T"].values, rtol=1e-5)
    np.testing.assert_allclose(a["ps"].values, b["ps"].values, rtol=1e-5)
    # member 0 starts from the analysis at test_start
    np.testing.assert_allclose(a["T"].values[0, 0], analyses[200, :2], rtol=1e-6)


def test_the_client_corrects_xarray_fields_in_the_stated_layout(start_server, tmp_path, analyses):
    import subprocess
    import sys

    import xarray as xr

    from correction.inference import Corrector
    from service.client import CorrectionClient
    from service.client.fields import FieldClient

    repo = _repository(tmp_path, analyses)
    server = start_server(repo)
    x = analyses[:3]
    ds = xr.Dataset(
        {
            "ps": (("member", "lat", "lon"), x[:, 2], {"units": "Pa"}),  # order does not matter
            "T": (("member", "lev", "lat", "lon"), x[:, :2], {"units": "K"}),
        },
        coords={"lat": np.linspace(-45, 45, 4)},
    )
    with CorrectionClient(server.url, "grid") as c:
        out = FieldClient(c).correct(ds)
    want = Corrector.load(repo, "grid")(x)
    np.testing.assert_allclose(out["T"].values, want[:, :2], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["ps"].values, want[:, 2], rtol=1e-4, atol=1e-4)
    assert out["ps"].attrs["units"].startswith("Pa per")
    code = "import sys, service.client.fields; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
