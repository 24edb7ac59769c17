"""Faults found by attacking the service, the client and the repository, each pinned down.

Every case here failed before its fix: NaN corrections answered 200, JSON stalls
and memory without bound, deep nesting and disconnects counted as 500s, trusted
degraded-step reports, a sticky pin to a corrupt version, a client blind to a
proxy's page or a TLS failure, and a repository that followed symlinks, served
edited configs, never retried a hand copy, left gaps and read ``01`` as 1.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from support import ServeProcess, make_l96_model, metric_value, self_signed

from correction import artifacts
from correction.artifacts import ArtifactError, publish
from service.client import (
    CorrectionClient,
    NotTheProtocol,
    RequestRejected,
    TLSFailure,
)
from service.protocol import HEADER_LENGTH, MAX_DEGRADED_STEPS_PER_CALL

RNG = np.random.default_rng(13)
INFER = "/v2/models/l96/infer"


def states(n=2, dtype=np.float64):
    return RNG.normal(2.5, 3.6, (n, 36)).astype(dtype)


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


# -- 1. values outside the model dtype's range; NaN out of the model ---------------------
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("value", [1e39, -1e300])
def test_fp64_beyond_float32_range_is_a_400_naming_the_value(start_server, binary, value):
    server = start_server()
    x = states(3)
    x[1, 7] = value
    with (
        CorrectionClient(server.url, "l96", binary=binary) as c,
        pytest.raises(RequestRejected) as err,
    ):
        c.infer(x)
    assert err.value.status == 400
    msg = str(err.value)
    assert "outside the range of the model's float32" in msg and repr(value) in msg
    assert "sample 1, index 7" in msg
    text = metrics(server.url)
    assert metric_value(text, "mecs_rejected_inputs_total", model="l96", reason="range") == 1


def test_nan_from_the_model_is_a_500_never_a_200(start_server, tmp_path, caplog):
    model, config = make_l96_model()
    with torch.no_grad():  # a broken version: its output is NaN for every input
        next(model.parameters()).fill_(float("nan"))
    repo = tmp_path / "broken"
    publish(repo, "l96", model, config)
    server = start_server(repo, runtime="eager")
    for binary in (True, False):
        r = httpx.post(
            f"{server.url}{INFER}",
            content=_body(states(2), binary)[0],
            headers=_body(states(2), binary)[1],
        )
        assert r.status_code == 500, r.text
        assert "produced NaN or Inf" in r.json()["error"]
    text = metrics(server.url)
    assert metric_value(text, "mecs_nonfinite_outputs_total", model="l96", version="1") == 2
    assert (
        metric_value(text, "mecs_inference_requests_total", model="l96", version="1", status="500")
        == 2
    )
    assert any("NaN or Inf" in r.getMessage() for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records)  # logged, without a traceback


def _body(x, binary=True, **kw):
    from service.protocol import encode_infer_request

    return encode_infer_request({"state": x}, binary=binary, **kw)


# -- 3. deep nesting ---------------------------------------------------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("where", ["data", "top", "parameters", "load"])
def test_deeply_nested_json_is_a_400(start_server, caplog, depth, where):
    server = start_server(admin_keys=["adm"], inference_keys=["inf"])
    head = {"Authorization": "Bearer adm", "Content-Type": "application/json"}
    path = INFER
    if where == "data":
        state = {"name": "state", "datatype": "FP32", "shape": [1, 36], "data": "DATA"}
        body = json.dumps({"inputs": [state]}).replace('"DATA"', _nested(depth))
    elif where == "top":
        body = _nested(depth)
    elif where == "parameters":
        body = f'{{"parameters":{{"x":{_nested(depth)}}},"inputs":[]}}'
    else:
        body, path = f'{{"parameters":{_nested(depth)}}}', "/v2/repository/models/l96/load"
    r = httpx.post(f"{server.url}{path}", content=body, headers=head)
    assert r.status_code == 400, r.text
    assert "nested too deeply" in r.json()["error"] or "not valid JSON" in r.json()["error"]
    assert not any(rec.exc_info for rec in caplog.records)


# -- 4. a client that goes away mid-body -------------------------------------------------
def test_client_disconnect_mid_body_is_not_a_500(start_server, caplog):
    server = start_server()
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(5):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v2/models/l96/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100000\r\n\r\n" + b'{"inputs": [' + b" " * 1000
            )
            time.sleep(0.05)
    deadline = time.time() + 5
    while time.time() < deadline:
        text = metrics(server.url)
        gone = metric_value(
            text,
            "mecs_http_requests_total",
            endpoint="/v2/models/{name}/infer",
            method="POST",
            status="499",
        )
        if gone == 5:
            break
        time.sleep(0.05)
    assert gone == 5
    assert (
        metric_value(
            text,
            "mecs_http_requests_total",
            endpoint="/v2/models/{name}/infer",
            method="POST",
            status="500",
        )
        is None
    )
    assert not any(rec.exc_info for rec in caplog.records)
    with CorrectionClient(server.url, "l96") as c:  # and the service is fine
        assert c.infer(states(1)).model_version == 1


# -- 5. degraded steps are bounded per call ----------------------------------------------
def test_degraded_steps_report_is_bounded(start_server):
    server = start_server()
    for bad in (2**40 - 1, MAX_DEGRADED_STEPS_PER_CALL + 1, -1, 1.5, True):
        body, head = _body(states(1), parameters={"degraded_steps": bad})
        r = httpx.post(f"{server.url}{INFER}", content=body, headers=head)
        assert r.status_code == 400 and "degraded_steps" in r.json()["error"], bad
    assert metric_value(metrics(server.url), "mecs_client_degraded_steps_total", model="l96") in (
        None,
        0,
    )
    # an honest client with a long outage reports it over its next calls, losslessly
    with CorrectionClient(server.url, "l96") as c:
        c._unreported = 2500
        calls = []
        for _ in range(3):
            c.infer(states(1))
            calls.append(
                metric_value(metrics(server.url), "mecs_client_degraded_steps_total", model="l96")
            )
        assert calls == [1000, 2000, 2500] and c._unreported == 0


# -- 6. an admin pin to a corrupt version does not stick ---------------------------------
def test_pin_to_a_corrupt_version_is_not_kept(start_server, l96_repository):
    bad = publish(l96_repository, "l96", *make_l96_model(seed=1))
    (bad.path / "weights.safetensors").write_bytes(b"garbage")
    server = start_server(admin_keys=["adm"], inference_keys=["inf"], poll_interval_s=0.1)
    head = {"Authorization": "Bearer adm"}
    r = httpx.post(
        f"{server.url}/v2/repository/models/l96/load",
        json={"parameters": {"version": "2"}},
        headers=head,
    )
    assert r.status_code == 503 and "failed to load" in r.json()["error"]
    publish(l96_repository, "l96", *make_l96_model(seed=2))  # version 3, good
    deadline = time.time() + 10
    version = None
    while time.time() < deadline:
        version = httpx.get(f"{server.url}/v2/models/l96", headers=head).json()["version"]
        if version == "3":
            break
        time.sleep(0.05)
    assert version == "3"  # the poller follows the newest good version


# -- 7. the client against things that are not the service -------------------------------
class _Impostor(BaseHTTPRequestHandler):
    answer = b"<html>proxy says hi</html>"
    ctype = "text/html"

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", self.ctype)
        self.send_header("Content-Length", str(len(self.answer)))
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def impostor():
    servers = []

    def start(answer: bytes, ctype: str):
        handler = type("H", (_Impostor,), {"answer": answer, "ctype": ctype})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()


@pytest.mark.parametrize(
    "answer, ctype",
    [
        (b"<html>proxy says hi</html>", "text/html"),
        (b'{"outputs": []}', "application/json"),
        (
            json.dumps(
                {
                    "model_version": "1",
                    "outputs": [
                        {"name": "correction", "datatype": "FP32", "shape": [9], "data": [1]}
                    ],
                }
            ).encode(),
            "application/json",
        ),
    ],
)
@pytest.mark.parametrize("transport", ["socket", "http.client"])
def test_a_200_that_is_not_the_protocol_degrades_and_trips_the_breaker(
    impostor, answer, ctype, transport
):
    url = impostor(answer, ctype)
    raising = CorrectionClient(url, "l96", transport=transport, degrade="raise")
    with raising as c, pytest.raises(NotTheProtocol, match="not an infer response"):
        c.infer(states(1))
    with CorrectionClient(
        url, "l96", transport=transport, degrade="zero", failure_threshold=2, cooldown_s=60
    ) as c:
        x = states(1)
        for _ in range(4):
            np.testing.assert_array_equal(c.correct(x), 0)
        assert c.degraded_steps == 4 and c.failures == 2  # the breaker opened after two


@pytest.mark.parametrize("transport", ["socket", "http.client"])
def test_tls_failures_raise_under_every_policy_and_a_ca_file_fixes_them(
    start_server, tmp_path, transport
):
    cert, key = self_signed(tmp_path)
    plain = start_server()
    tls = start_server(ssl_certfile=cert, ssl_keyfile=key)
    assert tls.url.startswith("https://")
    https_to_plain = plain.url.replace("http://", "https://")
    for url in (https_to_plain, tls.url):  # a plain server; an untrusted certificate
        for policy in ("raise", "zero", "last"):
            with CorrectionClient(url, "l96", degrade=policy, transport=transport) as c:
                with pytest.raises(TLSFailure, match="TLS handshake failed"):
                    c.correct(states(1))
                assert c.degraded_steps == 0
    with CorrectionClient(tls.url, "l96", ca_file=str(cert), transport=transport) as c:
        assert c.infer(states(1)).model_version == 1
    ctx = ssl.create_default_context(cafile=str(cert))
    with CorrectionClient(tls.url, "l96", ssl_context=ctx, transport=transport) as c:
        assert c.infer(states(1)).model_version == 1
    with pytest.raises(ValueError, match="ca_file"):
        CorrectionClient(tls.url, "l96", ca_file=str(tmp_path / "missing.pem"))


# -- the repository's integrity ----------------------------------------------------------
def test_edited_config_is_refused(l96_repository):
    path = l96_repository / "l96" / "1"
    artifacts.load(path)  # as published: fine
    for edit in (
        lambda c: c["normalisation"].__setitem__("out_mean", [1000.0]),
        lambda c: c["layout"]["sizes"].__setitem__("k", 40),
    ):
        config = json.loads((path / "config.json").read_text())
        original = json.dumps(config)
        edit(config)
        (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ArtifactError, match="config checksum mismatch"):
            artifacts.load(path)
        (path / "config.json").write_text(original)
    artifacts.load(path)


def test_edited_config_is_not_hot_swapped_in(start_server, l96_repository):
    server = start_server(poll_interval_s=0.1)
    mv = publish(l96_repository, "l96", *make_l96_model(seed=1), version=None)
    config = json.loads((mv.path / "config.json").read_text())
    config["layout"]["sizes"]["k"] = 40
    (mv.path / "config.json").write_text(json.dumps(config))
    time.sleep(0.6)
    with CorrectionClient(server.url, "l96") as c:
        assert c.metadata()["version"] == "1"
        assert c.infer(states(1)).model_version == 1  # every existing client still served
    index = {e["version"]: e for e in httpx.get(f"{server.url}/v2/repository/index").json()}
    assert index["2"]["state"] == "UNAVAILABLE" and "config checksum" in index["2"]["reason"]


def test_symlinks_are_not_followed(tmp_path, l96_repository):
    outside = tmp_path / "outside"
    publish(outside, "l96", *make_l96_model(seed=3))
    (l96_repository / "l96" / "7").symlink_to(outside / "l96" / "1")
    (l96_repository / "linked").symlink_to(outside / "l96")
    assert artifacts.list_versions(l96_repository, "l96") == [1]
    assert artifacts.list_models(l96_repository) == ["l96"]
    real = l96_repository / "l96" / "1"
    (real / "weights.safetensors").rename(tmp_path / "w")
    (real / "weights.safetensors").symlink_to(tmp_path / "w")
    with pytest.raises(ArtifactError, match="symbolic link"):
        artifacts.load(real)


def test_version_names_are_canonical_ascii_integers(l96_repository):
    src = l96_repository / "l96" / "1"
    for name in ("01", "\u0663", "0", "2x"):
        dst = l96_repository / "l96" / name
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    assert artifacts.list_versions(l96_repository, "l96") == [1]
    assert publish(l96_repository, "l96", *make_l96_model(seed=4)).version == 2


def test_a_hand_copied_version_is_served_once_complete(start_server, l96_repository, tmp_path):
    server = start_server(poll_interval_s=0.1)
    staged = publish(tmp_path / "elsewhere", "l96", *make_l96_model(seed=5)).path
    target = l96_repository / "l96" / "2"
    target.mkdir()
    (target / "config.json").write_bytes((staged / "config.json").read_bytes())  # config first
    time.sleep(0.5)  # the poller sees it, fails to load it (no weights yet)
    index = {e["version"]: e for e in httpx.get(f"{server.url}/v2/repository/index").json()}
    assert index["2"]["state"] == "UNAVAILABLE"
    (target / "weights.safetensors").write_bytes((staged / "weights.safetensors").read_bytes())
    deadline = time.time() + 10
    while time.time() < deadline:
        if httpx.get(f"{server.url}/v2/models/l96").json()["version"] == "2":
            break
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/v2/models/l96").json()["version"] == "2"


def test_racing_publishers_leave_no_gaps(tmp_path):
    model, config = make_l96_model()
    barrier = threading.Barrier(6)
    got = []

    def one():
        barrier.wait()
        got.append(publish(tmp_path, "m", model, config).version)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert artifacts.list_versions(tmp_path, "m") == [1, 2, 3, 4, 5, 6]


def test_published_versions_are_readable_by_another_uid_and_staging_is_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        mv = publish(tmp_path, "m", *make_l96_model())
    finally:
        os.umask(old)
    assert mv.path.stat().st_mode & 0o055 == 0o055
    for f in mv.path.iterdir():
        assert f.stat().st_mode & 0o044 == 0o044, f
    # a publisher killed mid-write left its staging directory; the next one removes it
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / "m" / f".version.partial-{host}-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"x" * 1000)
    publish(tmp_path, "m", *make_l96_model(seed=1))
    assert not stale.exists()
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")] == []


# -- 2. admission: JSON limit, bytes in flight, body timeout -----------------------------
def test_json_limit_and_inflight_bytes_are_enforced(start_server):
    server = start_server(
        max_body_bytes=1 << 20, max_json_body_bytes=64 << 10, max_inflight_body_bytes=1 << 20
    )
    big = states(400, np.float32)  # ~170 KB as JSON
    body, head = _body(big, binary=False)
    assert len(body) > 64 << 10
    r = httpx.post(f"{server.url}{INFER}", content=body, headers=head)
    assert r.status_code == 413 and "binary tensor extension" in r.json()["error"]

    def chunks():
        yield body[:1000]
        yield body[1000:]

    r = httpx.post(f"{server.url}{INFER}", content=chunks(), headers=head)  # no length
    assert r.status_code == 413
    body, head = _body(big, binary=True)
    assert httpx.post(f"{server.url}{INFER}", content=body, headers=head).status_code == 200
    # one slow sender holds 1,000,000 of the 1,048,576 bytes admitted: the next large request waits
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as slow:
        slow.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {1_000_000}\r\n"
            f"{HEADER_LENGTH}: 10\r\n\r\n".encode()
        )
        time.sleep(0.2)
        r = httpx.post(f"{server.url}{INFER}", content=body, headers=head)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "already admitted" in r.json()["error"]
    text = metrics(server.url)
    assert metric_value(text, "mecs_admission_refusals_total", reason="bytes") == 1
    deadline = time.time() + 5  # the slow sender left: its bytes are released
    while time.time() < deadline:
        r = httpx.post(f"{server.url}{INFER}", content=body, headers=head)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200


def test_stalled_bodies_are_answered_408_and_closed(start_server):
    server = start_server(body_timeout_s=0.5)
    host, port = server.url.removeprefix("http://").split(":")
    socks = []
    for _ in range(50):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode() + b"{"
        )
        socks.append(s)
    t0 = time.time()
    for s in socks:
        s.settimeout(10)
        data = b""
        while True:
            part = s.recv(65536)
            if not part:
                break  # closed by the server
            data += part
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        s.close()
    assert time.time() - t0 < 5


def _health_p99_while(url: str, work) -> tuple[float, list]:
    """p99 of ``/v2/health/live`` latency (s) while ``work()`` runs in threads."""
    results: list = []
    done = threading.Event()

    def run():
        try:
            results.append(work())
        except Exception as err:  # reported by the assertion below
            results.append(err)
        finally:
            done.set()

    lat = []
    worker = threading.Thread(target=run)
    with httpx.Client(base_url=url, timeout=30) as h:
        h.get("/v2/health/live")
        worker.start()
        while not done.is_set():
            t = time.perf_counter()
            assert h.get("/v2/health/live").status_code == 200
            lat.append(time.perf_counter() - t)
            time.sleep(0.005)
    worker.join()
    return float(np.percentile(lat, 99)), results


#: the documented bound (docs/service.md): resident memory at rest plus this much
PEAK_ABOVE_REST = 1 << 30


def test_large_requests_neither_stall_nor_blow_up_the_server(l96_repository, tmp_path):
    """55 MiB JSON, then four concurrent 47 MiB binary requests, against `mecs serve`."""
    with ServeProcess(l96_repository, tmp_path / "serve.log", log_level="warning") as server:
        with CorrectionClient(server.url, "l96") as c:
            c.infer(states(1))
        rest = server.status("VmRSS")
        text = (
            b'{"inputs":[{"name":"state","datatype":"FP32","shape":[1,36],"data":['
            + b"1.25," * ((55 << 20) // 5)
        )
        text = text[: text.rfind(b",")] + b"]}]}"

        def json_request():
            r = httpx.post(
                f"{server.url}{INFER}",
                content=text,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            return r.status_code

        p99, out = _health_p99_while(server.url, json_request)
        assert out == [413] and p99 < 0.1, (out, p99)
        big = RNG.normal(2.5, 3.6, ((47 << 20) // (36 * 4), 36)).astype(np.float32)

        def four_binary():
            answers = []

            def one():
                with CorrectionClient(server.url, "l96", timeout=120) as cl:
                    answers.append(cl.infer(big).correction.shape)

            ts = [threading.Thread(target=one) for _ in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return answers

        p99, out = _health_p99_while(server.url, four_binary)
        assert out == [[big.shape] * 4], out
        peak = server.status("VmHWM")
        print(f"health p99 {p99 * 1e3:.1f} ms; rest {rest >> 20} MiB, peak {peak >> 20} MiB")
        assert p99 < 0.1, p99
        assert peak - rest < PEAK_ABOVE_REST, (rest >> 20, peak >> 20)
        assert "Traceback" not in server.log()


# -- 8. a pretraining run killed after publishing publishes once -------------------------
def test_pretrain_killed_after_publishing_does_not_publish_twice(
    tiny_increments, tmp_path, monkeypatch
):
    import correction.training.pretrain as pre
    from correction.training.settings import PretrainConfig

    cfg = PretrainConfig.from_dict(
        {"params": {"hidden": 8, "depth": 2}, "max_epochs": 2, "batch_size": 64, "seed": 0}
    )
    import types

    def killed(*args, **kwargs):  # the process dies between publish and clean-up
        raise KeyboardInterrupt

    monkeypatch.setattr(pre, "shutil", types.SimpleNamespace(rmtree=killed))
    with pytest.raises(KeyboardInterrupt):
        pre.pretrain(tiny_increments, tmp_path / "models", "m", cfg, progress=False)
    assert artifacts.list_versions(tmp_path / "models", "m") == [1]
    assert list((tmp_path / "models" / "m").glob(".train-*/checkpoint"))  # left behind
    monkeypatch.undo()
    again = pre.pretrain(tiny_increments, tmp_path / "models", "m", cfg, progress=False)
    assert again.version.version == 1
    assert artifacts.list_versions(tmp_path / "models", "m") == [1]
    assert not list((tmp_path / "models" / "m").glob(".train-*"))
    # a genuinely new run (other settings) still publishes its own version
    other = PretrainConfig.from_dict({**cfg.to_dict(), "seed": 1})
    assert (
        pre.pretrain(
            tiny_increments, tmp_path / "models", "m", other, progress=False
        ).version.version
        == 2
    )


# -- 9. increments from a store with no times --------------------------------------------
@pytest.mark.parametrize("empty", ["analyses", "forecasts"])
def test_increments_from_an_empty_store_is_a_clear_error(tmp_path, capsys, empty):
    from support import make_archive, write_store

    from mecs.cli import main

    ana, fc = make_archive()
    if empty == "analyses":
        ana = ana.isel(time=slice(0, 0))
    else:
        fc = fc.isel(init_time=slice(0, 0))
    a = write_store(ana, tmp_path / "ana", "zarr")
    f = write_store(fc, tmp_path / "fc", "zarr")
    code = main(
        [
            "increments",
            "--analyses",
            str(a),
            "--forecasts",
            str(f),
            "--window",
            "6h",
            "--out",
            str(tmp_path / "out.zarr"),
            "--scheduler",
            "sync",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "have no times" in err and "\n" not in err, err
    assert not (tmp_path / "out.zarr").exists()
