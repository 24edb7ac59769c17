"""The chain on the 2-D benchmark (quick): increments on (lev, y, x), pretraining, the
emulator, fine-tuning in every mode, the service with [batch, 2, ny, nx] states, forecasts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from correction import artifacts
from correction.storage import open_zarr
from data_pipeline.qg import load_qg_config
from data_pipeline.qg_stores import generate_qg
from mecs.cli import main

MODES = ("one-step", "unrolled", "emulator", "hybrid", "differentiable")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("qgchain")
    cfg = load_qg_config("qg-eddy", quick=True)
    generate_qg(cfg, root / "bench", progress=False, log=lambda _: None)
    return cfg, root


def _ok(argv, capsys):
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_the_whole_chain_on_qg(chain, capsys, start_server):
    cfg, root = chain
    bench, repo = root / "bench", root / "models"
    _ok(
        [
            "increments",
            "--analyses",
            str(bench / "analyses.zarr"),
            "--forecasts",
            str(bench / "forecasts_archive.zarr"),
            "--window",
            "6",
            "--out",
            str(root / "inc.zarr"),
            "--split",
            cfg.increment_split(),
            "--no-progress",
        ],
        capsys,
    )
    inc = open_zarr(root / "inc.zarr")
    assert inc["target_q"].dims == ("sample", "lev", "y", "x")
    assert inc.attrs["window_units"] == "hours"
    _ok(
        [
            "pretrain",
            "--data",
            str(root / "inc.zarr"),
            "--repository",
            str(repo),
            "--name",
            "qg",
            "--network",
            "stencil-cnn",
            "--max-epochs",
            "8",
            "--no-progress",
        ],
        capsys,
    )
    v1 = artifacts.read_config(repo / "qg" / "1")
    assert v1["layout"]["level_dims"] == {"q": ["lev"]} and v1["layout"]["state_shape"] == [
        2,
        32,
        32,
    ]
    assert v1["time"]["unit"] == "hour"
    emu_cfg = root / "emu.json"
    emu_cfg.write_text(
        json.dumps(
            {
                "network": "stencil-cnn",
                "params": {"hidden": 16, "kernel": 3},
                "n_states": 200,
                "epochs": 4,
                "rollout_steps": 2,
            }
        )
    )
    host = ["--host", "torch:qg", "--data", str(bench), "--no-progress"]
    _ok(["emulator", *host, "--out", str(root / "emu"), "--config", str(emu_cfg)], capsys)
    for mode in MODES:
        _ok(
            [
                "finetune",
                "--mode",
                mode,
                *host,
                "--repository",
                str(repo),
                "--name",
                "qg",
                "--from",
                "1",
                "--emulator",
                str(root / "emu"),
                "--iterations",
                "6",
                "--unroll",
                "2",
                "--batch-size",
                "4",
            ],
            capsys,
        )
    assert artifacts.list_versions(repo, "qg") == [1, 2, 3, 4, 5, 6]
    for v, mode in zip(range(2, 7), MODES, strict=True):
        config = artifacts.read_config(repo / "qg" / str(v))
        assert config["training"]["mode"] == mode and config["time"]["host_dt"] == 1.0
        metrics = config["metrics"]
        assert metrics["val_loss_a_posteriori"] <= metrics["val_loss_before"]
    # the service answers [batch, 2, 32, 32] states; a coupled forecast over it equals
    # the same forecast in this process
    server = start_server(repo)
    fc = [
        "forecast",
        "--host",
        "torch:qg",
        "--host-param",
        "nx=32",
        "--host-param",
        "U1=0.1",
        "--init",
        str(bench / "analyses.zarr"),
        "--init-time",
        str(cfg.test_start),
        "--steps",
        "24",
        "--members",
        "3",
        "--perturbation",
        "1e-7",
        "--model",
        "qg",
        "--no-progress",
    ]
    _ok([*fc, "--repository", str(repo), "--out", str(root / "local.zarr")], capsys)
    _ok([*fc, "--service", server.url, "--out", str(root / "http.zarr")], capsys)
    a, b = open_zarr(root / "local.zarr"), open_zarr(root / "http.zarr")
    assert a["q"].dims == ("member", "time", "lev", "y", "x") and a["q"].shape[-3:] == (2, 32, 32)
    np.testing.assert_allclose(b["q"].values, a["q"].values, rtol=1e-5, atol=1e-12)
    assert np.isfinite(a["q"].values).all()
