"""The C and Fortran clients and the Fortran Lorenz-96 host, against a real ``mecs serve``.

Built once per session with ``clients/build.sh`` (CMake, ctest, install, then the
example against the installed package). Without a C or Fortran compiler, CMake or
libcurl's headers every test here skips and says why.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import urllib.request

import numpy as np
import pytest
import xarray as xr
from support import (
    ServeProcess,
    make_l96_model,
    metric_value,
    missing_tools,
    mpi_env,
    self_signed,
)

from correction import artifacts
from correction.storage import open_zarr

pytestmark = pytest.mark.skipif(
    bool(missing_tools()),
    reason=f"C/Fortran clients not built: missing {', '.join(missing_tools())} "
    "(apt-get install cmake gcc gfortran libcurl4-openssl-dev; .ci/run does)",
)
STEPS = 500


@pytest.fixture(scope="module")
def x0_file(tmp_path_factory, tiny_synth):
    """20 analyses of the tiny benchmark (in distribution), member after member, float64."""
    x0 = open_zarr(tiny_synth / "analyses.zarr")["X"].values[:20].astype("<f8")
    path = tmp_path_factory.mktemp("init") / "x0.bin"
    np.ascontiguousarray(x0).tofile(path)
    return path, x0


def run_forecast(native, url, out, members=20, steps=STEPS, mpi_ranks=0, **args):
    cmd = [str(native.forecast)]
    env = None
    if mpi_ranks:
        cmd = ["mpirun", "--oversubscribe", "-np", str(mpi_ranks), str(native.forecast_mpi)]
        env = mpi_env()
    argv = {"url": url, "members": members, "steps": steps, "out": out} | args
    cmd += [f"{k}={v}" for k, v in argv.items()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def in_process(repository, x0, steps=STEPS, version=None):
    """The Python coupled forecast of the same model in this process (the reference)."""
    from correction.forecast import run_forecast as python_forecast
    from correction.guardrails import GuardedCorrection
    from correction.hosts import Lorenz96
    from correction.inference import Corrector

    correction = GuardedCorrection(Corrector.load(repository, "l96", version))
    return python_forecast(Lorenz96(K=36, F=10.0, dt=0.01), x0, steps, correction).states


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_unit_checks_pass(native):
    """The C library's own checks (JSON reader, option validation), as ctest runs them."""
    build = native.example.parent / "clients"
    out = subprocess.run(["ctest", "--test-dir", str(build)], capture_output=True, text=True)
    assert out.returncode == 0 and "100% tests passed" in out.stdout, out.stdout


def test_installed_package_is_findable(native):
    lib = native.prefix / "lib"
    assert (lib / "cmake" / "mecs_client" / "mecs_clientConfig.cmake").exists()
    assert (native.prefix / "include" / "mecs_client" / "mecs_client.mod").exists()
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "mecs_client_fortran"],
        capture_output=True,
        text=True,
        env={"PKG_CONFIG_PATH": str(lib / "pkgconfig"), "PATH": "/usr/bin:/bin"},
    )
    assert flags.returncode == 0, flags.stderr
    assert "-lmecs_client_fortran" in flags.stdout and "include/mecs_client" in flags.stdout


@pytest.mark.parametrize("members", [1, 20])
def test_fortran_forecast_equals_the_python_forecast(
    native, start_server, l96_repository, x0_file, tmp_path, members
):
    server = start_server()
    path, x0 = x0_file
    init = tmp_path / "x0.bin"
    np.ascontiguousarray(x0[:members]).tofile(init)
    out = tmp_path / "traj.nc"
    run = run_forecast(native, server.url, out, members=members, init=init)
    assert run.returncode == 0, run.stderr
    with xr.open_dataset(out) as ds:
        fortran = ds["X"].values
        assert ds.attrs["degraded_steps"] == 0 and ds.attrs["host"] == "fortran-l96"
        assert list(ds["version"].values[1:]) == [1] * STEPS and ds["step"].values[-1] == STEPS
    python = in_process(l96_repository, x0[:members])
    assert fortran.shape == python.shape == (STEPS + 1, members, 36)
    np.testing.assert_allclose(fortran, python, rtol=0, atol=1e-5)
    assert np.abs(fortran[-1] - fortran[0]).max() > 1  # it moved: a real forecast


def test_mpi_ranks_give_the_numbers_of_one_process(
    native, start_server, l96_repository, x0_file, tmp_path
):
    if native.forecast_mpi is None:
        pytest.skip(
            "MPI not available: l96_forecast_mpi was not built (apt-get install libopenmpi-dev)"
        )
    server = start_server(batch_max_size=64, batch_max_delay_ms=2)
    path, x0 = x0_file
    one = run_forecast(native, server.url, tmp_path / "one.nc", init=path)
    before = _batches(server.url)
    four = run_forecast(native, server.url, tmp_path / "four.nc", init=path, mpi_ranks=4)
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    with xr.open_dataset(tmp_path / "one.nc") as a, xr.open_dataset(tmp_path / "four.nc") as b:
        assert b.attrs["ranks"] == 4 and a.attrs["ranks"] == 1
        np.testing.assert_allclose(b["X"].values, a["X"].values, rtol=0, atol=1e-5)
        assert (b["version"].values[1:] == 1).all()
    # the ranks declared a timestep group of 4: each step's four calls left as one batch
    after = _batches(server.url)
    batches, calls = after[0] - before[0], after[1] - before[1]
    assert calls >= 4 * STEPS and calls / batches > 3.5, (batches, calls)


def _batches(url: str) -> tuple[float, float]:
    """(batches, calls in them) the server has run for model l96 v1 so far."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    labels = {"model": "l96", "version": "1"}
    count = metric_value(text, "mecs_batch_requests_count", **labels) or 0.0
    return count, metric_value(text, "mecs_batch_requests_sum", **labels) or 0.0


def _start(native, url, out, policy, **args):
    argv = {
        "url": url,
        "members": 4,
        "steps": 3000,
        "out": out,
        "policy": policy,
        "retries": 0,
        "timeout": 1,
        "cooldown": 0.2,
        "step_delay": 0.004,
        "progress": 1,
    } | args
    return subprocess.Popen(
        [str(native.forecast), *(f"{k}={v}" for k, v in argv.items())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc, n):
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= n:
            return
    raise AssertionError(f"the forecast ended before step {n}: {proc.stderr.read()}")


def test_server_stopped_mid_run_degrades_then_recovers(native, l96_repository, tmp_path):
    """zero and last finish the run, count the degraded steps and are corrected again once
    the server is back (the breaker closes); raise stops with a message naming the step."""
    from correction.reference_host import l96_step

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ServeProcess(l96_repository, tmp_path / "serve1.log", port=port)
    runs = {p: _start(native, url, tmp_path / f"{p}.nc", p) for p in ("zero", "last", "raise")}
    try:
        for proc in runs.values():
            _wait_for_step(proc, 100)
        server.close()  # the service goes away mid-run
        raised = runs["raise"].wait(60)
        server = ServeProcess(l96_repository, tmp_path / "serve2.log", port=port)
        for p in ("zero", "last"):
            assert runs[p].wait(120) == 0, runs[p].stderr.read()
    finally:
        server.close()
        for proc in runs.values():
            proc.kill()
    err = runs["raise"].stderr.read()
    assert raised != 0 and "failed: MECS_E_UNAVAILABLE" in err and "unreachable" in err, err
    assert not (tmp_path / "raise.nc").exists()  # nothing half-written
    for policy in ("zero", "last"):
        with xr.open_dataset(tmp_path / f"{policy}.nc") as ds:
            v, x = ds["version"].values, ds["X"].values
            degraded = np.flatnonzero(v == -1)
            assert ds.attrs["degraded_steps"] == len(degraded) > 10, policy
            assert (v[1 : degraded[0]] == 1).all() and degraded[0] > 100
            assert (v[-200:] == 1).all(), f"{policy}: not corrected again after the restart"
            # a degraded step is the host's step plus what the policy gives
            added = (x[degraded] - l96_step(x[degraded - 1], 10.0, 0.01)) / 0.01
            if policy == "zero":
                np.testing.assert_allclose(added, 0, atol=1e-9)
            else:  # the last correction again, the same at every degraded step
                assert np.abs(added[0]).max() > 1e-3
                np.testing.assert_allclose(added, np.broadcast_to(added[0], added.shape), atol=1e-6)


def test_a_run_stays_on_its_version_across_a_hot_reload(
    native, start_server, l96_repository, tmp_path
):
    server = start_server(poll_interval_s=0.1)
    pinned = _start(native, server.url, tmp_path / "pinned.nc", "raise", steps=600)
    follow = _start(native, server.url, tmp_path / "follow.nc", "raise", steps=600, follow_latest=1)
    _wait_for_step(pinned, 50)
    _wait_for_step(follow, 50)
    model, config = make_l96_model(seed=1)
    artifacts.publish(l96_repository, "l96", model, config)
    assert pinned.wait(120) == 0 and follow.wait(120) == 0, pinned.stderr.read()
    with xr.open_dataset(tmp_path / "pinned.nc") as a, xr.open_dataset(tmp_path / "follow.nc") as b:
        assert set(a["version"].values[1:]) == {1}
        assert b["version"].values[1] == 1 and b["version"].values[-1] == 2


def _probe(native, url, options="", env=None):
    return subprocess.run(
        [str(native.probe), url, "l96", options, "--calls", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("expect_shape=35", "shape mismatch: model 'l96' takes states of shape [36] per member"),
        ("expect_dims=lat,lon", "layout mismatch: model 'l96' has state dims [k]"),
        ("expect_fields=T", "layout mismatch: model 'l96' has fields [X]"),
        ("expect_units=X=K", "units mismatch: model 'l96' has field 'X' in '1'"),
        ("dt_unit=h", "gives corrections per model time unit, which does not convert"),
        ("version=9", "MECS_E_NOT_FOUND: model 'l96' has no version 9"),
        ("group_size=4", "option group_size needs a group"),
        ("group=two words", "option group: 'two words' must be 1 to 128 letters"),
    ],
)
def test_mismatches_fail_at_open_and_name_what(native, start_server, options, message):
    server = start_server()
    out = _probe(native, server.url, options)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_the_fortran_host_refuses_a_model_of_another_shape(native, start_server, tmp_path):
    server = start_server()
    run = run_forecast(native, server.url, tmp_path / "t.nc", members=2, steps=3, K=40)
    assert run.returncode == 2 and "cannot open the model: MECS_E_MISMATCH: shape" in run.stderr
    assert "[36] per member, the caller's are [40]" in run.stderr
    assert not (tmp_path / "t.nc").exists()


def test_auth_and_missing_models_are_reported_as_such(native, start_server, tmp_path):
    import os

    server = start_server(inference_keys=["s3cret-key"])
    env = {k: v for k, v in os.environ.items() if k != "MECS_API_KEY"}
    out = _probe(native, server.url, env=env)
    assert out.returncode == 2 and "MECS_E_UNAUTHORIZED" in out.stderr and "401" in out.stderr
    assert "MECS_API_KEY" in out.stderr  # says where the key comes from
    out = _probe(native, server.url, env=env | {"MECS_API_KEY": "wrong"})
    assert out.returncode == 2 and "MECS_E_UNAUTHORIZED" in out.stderr
    assert _probe(native, server.url, env=env | {"MECS_API_KEY": "s3cret-key"}).returncode == 0
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    assert _probe(native, server.url, f"api_key_file={key_file}", env=env).returncode == 0
    out = _probe(native, server.url, f"api_key_file={tmp_path / 'none'}", env=env)
    assert out.returncode == 2 and "api_key_file" in out.stderr and "cannot read" in out.stderr
    out = subprocess.run(
        [str(native.probe), server.url, "nope", ""],
        capture_output=True,
        text=True,
        env=env | {"MECS_API_KEY": "s3cret-key"},
    )
    assert out.returncode == 2 and "MECS_E_NOT_FOUND: model 'nope' is not served" in out.stderr


class _Gateway(http.server.BaseHTTPRequestHandler):
    """A stand-in for what sits in front of a service: a gateway that forbids, or a model
    whose metadata accepts FP64 only."""

    def do_GET(self):  # noqa: N802 - the standard library's name
        if self.path.startswith("/forbidden"):
            body, status = b'{"error": "this key may not call this model"}', 403
        else:
            meta = {
                "name": "l96",
                "version": "1",
                "inputs": [{"name": "state", "datatype": "FP64", "shape": [-1, 36]}],
                "parameters": {"accepted_datatypes": ["FP64"], "dims": ["batch", "k"]},
            }
            body, status = json.dumps(meta).encode(), 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 - an answer that is not HTTP at all
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.wfile.write(b"this is not HTTP\r\n\r\n")
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_forbidden_and_dtype_mismatch_are_reported_as_such(native):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        out = _probe(native, f"{base}/forbidden")
        assert out.returncode == 2 and "MECS_E_FORBIDDEN" in out.stderr and "403" in out.stderr
        out = _probe(native, base, "expect_dtype=FP32")
        assert out.returncode == 2
        assert "dtype mismatch: model 'l96' does not accept FP32 states" in out.stderr
        # an answer that is not HTTP is an outage (degraded under zero), not a bad URL
        ok = subprocess.run(
            [
                str(native.probe),
                base,
                "l96",
                "policy=zero;retries=0",
                "--calls",
                "3",
                "--dtype",
                "FP64",
            ],
            capture_output=True,
            text=True,
        )
        assert ok.returncode == 0 and json.loads(ok.stdout)["degraded_steps"] == 5, ok.stderr
        out = subprocess.run(
            [str(native.probe), base, "l96", "retries=0", "--calls", "1", "--dtype", "FP64"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 1 and "MECS_E_PROTOCOL" in out.stderr and "not HTTP" in out.stderr
    finally:
        httpd.shutdown()


def test_tls_failures_are_reported_and_a_ca_file_fixes_them(native, start_server, tmp_path):
    cert, key = self_signed(tmp_path)
    plain = start_server()
    tls = start_server(ssl_certfile=cert, ssl_keyfile=key)
    for url in (plain.url.replace("http://", "https://"), tls.url):
        out = _probe(native, url, "policy=zero")
        assert out.returncode == 2 and "MECS_E_TLS: " in out.stderr, out.stderr
        assert "TLS handshake failed" in out.stderr
    out = _probe(native, tls.url, f"ca_file={cert}")
    assert out.returncode == 0 and json.loads(out.stdout)["version"] == 1, out.stderr


@pytest.mark.parametrize("dtype", ["FP32", "FP64"])
def test_c_client_gives_the_python_clients_corrections(native, start_server, dtype):
    from service.client import CorrectionClient

    server = start_server()
    out = subprocess.run(
        [
            str(native.probe),
            server.url,
            "l96",
            "",
            "--calls",
            "4",
            "--batch",
            "3",
            "--dtype",
            dtype,
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    state = 2.5 + 3.0 * np.sin(0.7 * np.arange(3 * 36)).reshape(3, 36)
    with CorrectionClient(server.url, "l96") as c:
        expected = c.correct(state.astype(np.float32 if dtype == "FP32" else np.float64)).sum()
    assert figures["version"] == 1 and figures["state_size"] == 36
    assert figures["correction_sum"] == pytest.approx(float(expected), rel=1e-6, abs=1e-6)


def test_finetune_hybrid_against_the_fortran_process_host(native, tiny_synth, tmp_path, capsys):
    """``mecs emulator`` and ``mecs finetune --mode hybrid`` with the Fortran model as
    ``process:``: a new version whose validation loss is below its parent's."""
    from correction.hosts.specs import parse_host_spec
    from mecs.cli import main

    host = f"process:{native.step_host} K=36 F=10 dt=0.01"
    assert parse_host_spec(host).kind == "process"
    analyses = str(tiny_synth / "analyses.zarr")
    repo = tmp_path / "models"
    model, config = make_l96_model(network="column-mlp")
    x = open_zarr(tiny_synth / "analyses.zarr")["X"].values
    model.set_normalisation([x.mean()], [x.std()], [0.0], [2.0])
    artifacts.publish(repo, "l96", model, config)
    emu_cfg = tmp_path / "emulator.json"
    emu_cfg.write_text(json.dumps({"n_states": 3000, "epochs": 10, "rollout_steps": 3}))
    args = ["--host", host, "--data", analyses, "--no-progress"]
    code = main(["emulator", *args, "--out", str(tmp_path / "emu"), "--config", str(emu_cfg)])
    assert code == 0, capsys.readouterr().err
    code = main(
        [
            "finetune",
            "--mode",
            "hybrid",
            *args,
            "--repository",
            str(repo),
            "--name",
            "l96",
            "--emulator",
            str(tmp_path / "emu"),
            "--iterations",
            "30",
            "--unroll",
            "3",
            "--batch-size",
            "8",
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = artifacts.read_config(repo / "l96" / "2")
    assert config["training"]["mode"] == "hybrid" and config["training"]["host_spec"] == host
    assert config["training"]["host"] == "fortran-l96"
    metrics = config["metrics"]
    assert metrics["val_loss_a_posteriori"] < metrics["val_loss_before"], metrics
    assert config["parent"]["version"] == 1
