"""``mecs forecast``: coupled runs in-process and over the service agree; store schema."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import xarray as xr
from support import metric_value

from correction.forecast import run_forecast
from correction.guardrails import GuardedCorrection
from correction.hosts import Lorenz96, integrate
from correction.inference import Corrector
from correction.storage import open_zarr, write_zarr
from mecs.cli import main
from service.client import CorrectionClient
from service.remote import RemoteCorrection


@pytest.fixture(scope="module")
def analyses(tmp_path_factory):
    """A small analyses store like ``mecs synth`` writes: X(time, k), test_start attr."""
    x = 8 + np.random.default_rng(0).normal(size=36)
    xs = [integrate(Lorenz96(), x, 200)]
    for _ in range(30):
        xs.append(integrate(Lorenz96(), xs[-1], 5))
    ds = xr.Dataset(
        {"X": (("time", "k"), np.array(xs, np.float32), {"units": "1", "long_name": "X"})},
        coords={
            "time": ("time", np.round(np.arange(31) * 0.05, 10), {"units": "1"}),
            "k": np.arange(1, 37),
        },
        attrs={"test_start": 1.0},
    )
    path = tmp_path_factory.mktemp("fc") / "analyses.zarr"
    write_zarr(ds, path)
    return path


def _cli(analyses, out, *source, steps=30, members=4, extra=(), host="l96"):
    args = [
        "forecast",
        "--host",
        host,
        "--init",
        str(analyses),
        "--steps",
        str(steps),
        "--members",
        str(members),
        "--model",
        "l96",
        "--out",
        str(out),
        "--no-progress",
        *source,
        *extra,
    ]
    return main(args)


def test_service_run_equals_in_process_run(
    start_server, l96_repository, analyses, tmp_path, capsys
):
    server = start_server()
    assert _cli(analyses, tmp_path / "local.zarr", "--repository", str(l96_repository)) == 0
    assert (
        _cli(
            analyses, tmp_path / "svc.zarr", "--service", server.url, extra=["--output-every", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "correction latency p50" in out and "degraded steps 0" in out
    local, svc = open_zarr(tmp_path / "local.zarr"), open_zarr(tmp_path / "svc.zarr")
    assert local["X"].dims == ("member", "time", "k") and local["X"].shape == (4, 31, 36)
    np.testing.assert_allclose(svc["X"].values, local["X"].values, rtol=1e-5, atol=1e-5)
    # the correction changed the forecast, and the members differ (perturbed)
    host_only = integrate(Lorenz96(), local["X"].values[:, 0].astype(np.float64), 30)
    assert np.abs(host_only - local["X"].values[:, -1]).max() > 1e-4
    assert np.abs(local["X"].values[1, 0] - local["X"].values[0, 0]).max() > 0
    # one batched request per step for the whole ensemble
    with CorrectionClient(server.url, "l96") as c:
        text = c.metrics_text()
    assert (
        metric_value(text, "mecs_inference_requests_total", model="l96", version="1", status="200")
        == 30
    )
    assert metric_value(text, "mecs_inference_samples_total", model="l96", version="1") == 120
    a = svc.attrs
    assert a["degraded_steps"] == 0 and a["correction_latency_p50_us"] > 0
    assert a["model_versions"] == [1] and a["members"] == 4 and a["init_time"] == 1.0
    assert a["Conventions"].startswith("CF-") and svc["X"].attrs["units"] == "1"
    assert (svc["model_version"].values == 1).all()
    np.testing.assert_allclose(svc["lead_time"].values, np.arange(31) * 0.01, atol=1e-12)


def test_local_correction_matches_corrected_host(l96_repository):
    corr = Corrector.load(l96_repository, "l96")
    host = Lorenz96()
    x0 = 8 + np.random.default_rng(3).normal(size=(3, 36))
    res = run_forecast(host, x0, 10, GuardedCorrection(corr), output_every=5)
    assert list(res.steps) == [0, 5, 10] and res.states.shape == (3, 3, 36)
    stepped = corr.compose(host)
    x = torch.from_numpy(x0)
    for _ in range(10):
        x = stepped.step(x)
    np.testing.assert_allclose(res.states[-1], x.numpy(), rtol=1e-6, atol=1e-6)
    assert set(res.stats) >= {"correction_latency_p50_us", "step_p99_us", "degraded_steps"}


def test_forecast_degrades_to_host_only_when_service_is_down(start_server, l96_repository):
    server = start_server()
    client = CorrectionClient(server.url, "l96", degrade="zero", retries=0)
    server.stop()
    x0 = 8 + np.random.default_rng(4).normal(size=(2, 36))
    res = run_forecast(Lorenz96(), x0, 5, RemoteCorrection(client))
    np.testing.assert_allclose(res.states[-1], integrate(Lorenz96(), x0, 5), rtol=1e-12)
    assert res.degraded_steps == 5 and res.stats["degraded_steps"] == 5


def test_forecast_cli_errors(analyses, l96_repository, tmp_path, capsys):
    repo = ["--repository", str(l96_repository)]
    assert _cli(tmp_path / "missing.zarr", tmp_path / "o.zarr", *repo) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _cli(analyses, tmp_path / "o.zarr", *repo, extra=["--init-time", "99"]) == 2
    assert "no analysis at --init-time 99" in capsys.readouterr().err
    assert _cli(analyses, tmp_path / "o.zarr", "--repository", str(tmp_path)) == 2
    assert "has no versions" in capsys.readouterr().err
    assert _cli(analyses, tmp_path / "o.zarr", "--service", "http://127.0.0.1:9") == 2
    assert "unreachable" in capsys.readouterr().err
    assert _cli(analyses, tmp_path / "o.zarr", *repo, steps=0) == 2
    assert _cli(analyses, tmp_path / "o.zarr", *repo, steps=2, extra=["--init-time", "0.5"]) == 0
    assert open_zarr(tmp_path / "o.zarr").attrs["init_time"] == 0.5
    assert _cli(analyses, tmp_path / "o.zarr", *repo, steps=2) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o.zarr.partial-*"))


REFERENCE = f"process:{sys.executable} -m correction.reference_host --F 10 --dt 0.01"


def test_forecast_with_a_process_host_equals_the_torch_host(analyses, l96_repository, tmp_path):
    repo = ["--repository", str(l96_repository)]
    assert _cli(analyses, tmp_path / "torch.zarr", *repo, steps=20) == 0
    assert _cli(analyses, tmp_path / "proc.zarr", *repo, steps=20, host=REFERENCE) == 0
    a, b = open_zarr(tmp_path / "torch.zarr"), open_zarr(tmp_path / "proc.zarr")
    np.testing.assert_allclose(b["X"].values, a["X"].values, rtol=1e-5, atol=1e-5)
    assert b.attrs["host_spec"] == REFERENCE and b.attrs["host"] == "l96-reference"


@pytest.mark.parametrize(
    "fault", ["--crash-at 5", "--hang-at 5", "--nan-at 5", "--wrong-shape-at 5"]
)
def test_forecast_process_host_faults_write_nothing(
    analyses, l96_repository, tmp_path, capsys, fault
):
    out = tmp_path / "o.zarr"
    code = _cli(
        analyses,
        out,
        "--repository",
        str(l96_repository),
        steps=20,
        host=f"{REFERENCE} {fault}",
        extra=["--host-timeout", "2"],
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "at step 5" in err and "\n" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".o.zarr.partial-*"))


def test_forecast_bad_host_specs_are_usage_errors(analyses, l96_repository, tmp_path, capsys):
    for spec, msg in [
        ("nope", "no registered torch host"),
        ("process:/no/such/model", "cannot start"),
    ]:
        assert (
            _cli(analyses, tmp_path / "o.zarr", "--repository", str(l96_repository), host=spec) == 2
        )
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
