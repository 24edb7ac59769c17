"""The service on a real uvicorn server on 127.0.0.1: transports, auth, batching, hot reload."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from support import make_l96_model

from correction.artifacts import publish
from correction.inference import Corrector
from service.client import CorrectionClient, RequestRejected
from service.protocol import HEADER_LENGTH

RNG = np.random.default_rng(1)


def test_binary_and_json_over_http_equal_in_process(start_server, l96_repository):
    server = start_server()
    corr = Corrector.load(l96_repository, "l96")
    x = RNG.normal(2.5, 3.6, (5, 36))
    for binary in (True, False):
        with CorrectionClient(server.url, "l96", binary=binary) as client:
            for dtype in (np.float32, np.float64):
                res = client.infer(x.astype(dtype), dt=0.01, request_id="abc")
                assert res.correction.dtype == dtype and res.model_version == 1
                assert res.id == "abc" and res.out_of_distribution == [False] * 5
                assert set(res.server_timing_ms) == {"read", "decode", "queue", "forward", "total"}
                np.testing.assert_allclose(
                    res.correction, corr(x.astype(dtype)), rtol=1e-4, atol=1e-5
                )
            single = client.correct(x[0])
            assert single.shape == (36,)
            np.testing.assert_allclose(single, corr(x[0]), rtol=1e-4, atol=1e-5)
            assert client.metadata()["inputs"][0]["shape"] == [-1, 36]
            assert client.ready() and client.live()
    # a large state: many request chunks, the forward in the worker thread (above
    # inline_forward_max_values), a response sent as its parts
    big = RNG.normal(2.5, 3.6, (8000, 36)).astype(np.float32)
    with CorrectionClient(server.url, "l96", timeout=30) as client:
        for _ in range(2):  # and the connection stays usable after it
            res = client.infer(big)
            np.testing.assert_allclose(res.correction, corr(big), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(client.correct(x[:2]), corr(x[:2]), rtol=1e-4, atol=1e-5)


def test_stock_protocol_client_bytes(start_server, l96_repository):
    """The exact bytes a Triton/KServe HTTP client sends (binary inputs, binary outputs)."""
    server = start_server()
    x = RNG.normal(2.5, 3.6, (2, 36)).astype(np.float32)
    header = {
        "inputs": [
            {
                "name": "state",
                "shape": [2, 36],
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "outputs": [{"name": "correction", "parameters": {"binary_data": True}}],
    }
    text = json.dumps(header).encode()
    with httpx.Client(base_url=server.url) as http:
        r = http.post(
            "/v2/models/l96/infer",
            content=text + x.tobytes(),
            headers={HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 200
        hlen = int(r.headers[HEADER_LENGTH])
        meta = json.loads(r.content[:hlen])
        out = meta["outputs"][0]
        assert out["parameters"]["binary_data_size"] == x.nbytes and meta["model_version"] == "1"
        y = np.frombuffer(r.content[hlen:], "<f4").reshape(out["shape"])
        np.testing.assert_allclose(
            y, Corrector.load(l96_repository, "l96")(x), rtol=1e-4, atol=1e-5
        )
        # the JSON flavour, no binary at all
        r = http.post(
            "/v2/models/l96/infer",
            json={
                "inputs": [
                    {
                        "name": "state",
                        "shape": [2, 36],
                        "datatype": "FP32",
                        "data": x.ravel().tolist(),
                    }
                ]
            },
        )
        assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 72
        assert http.get("/v2/health/ready").status_code == 200
        assert "mecs_inference_requests_total" in http.get("/metrics").text


def test_auth_and_limits_over_http(start_server):
    server = start_server(inference_keys=["k-inf"], admin_keys=["k-adm"], max_body_bytes=4096)
    x = RNG.normal(2.5, 3.6, (1, 36))
    with (
        CorrectionClient(server.url, "l96") as anonymous,
        pytest.raises(RequestRejected, match="401"),
    ):
        anonymous.infer(x)
    with CorrectionClient(server.url, "l96", api_key="k-inf") as client:
        assert client.infer(x).model_version == 1
        with pytest.raises(RequestRejected, match="403"):
            client.repository_index()
        with pytest.raises(RequestRejected, match="413"):
            client.infer(RNG.normal(size=(100, 36)))
        with pytest.raises(RequestRejected, match=r"400 .*expects \[batch, 36\]"):
            client.infer(RNG.normal(size=(1, 30)))
        assert client.infer(x).model_version == 1  # the connection survived the errors
    with CorrectionClient(server.url, "l96", api_key="k-adm") as admin:
        assert admin.repository_index()[0]["state"] == "READY"


def test_concurrent_callers_share_forward_passes(start_server, l96_repository):
    server = start_server(batch_max_size=64, batch_max_delay_ms=5)
    corr = Corrector.load(l96_repository, "l96")
    n, rounds = 16, 20
    xs = RNG.normal(2.5, 3.6, (n, 1, 36)).astype(np.float32)
    barrier = threading.Barrier(n)
    sizes, errors = [], []

    def caller(i):
        with CorrectionClient(server.url, "l96") as c:
            for _ in range(rounds):
                barrier.wait()
                try:
                    res = c.infer(xs[i])
                    np.testing.assert_allclose(res.correction, corr(xs[i]), rtol=1e-4, atol=1e-5)
                    sizes.append(res.batch_size)
                except Exception as err:  # collected: assert below, not in a thread
                    errors.append(err)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(sizes) == n * rounds and max(sizes) > 1, "no request was batched"


def test_hot_reload_under_40_concurrent_clients(start_server, l96_repository):
    """Publish v2 while 40 clients call: no failure, every answer from v1 or v2, and right."""
    server = start_server(poll_interval_s=0.05)
    n = 40
    xs = RNG.normal(2.5, 3.6, (n, 2, 36))
    model2, config2 = make_l96_model(seed=11)
    v1 = Corrector.load(l96_repository, "l96")
    expected = {1: [v1(x) for x in xs]}
    stop = threading.Event()
    seen: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
    errors: list[Exception] = []

    def caller(i):
        with CorrectionClient(server.url, "l96", retries=0) as c:
            while not stop.is_set():
                try:
                    res = c.infer(xs[i])
                except Exception as err:  # counted; the test fails on any
                    errors.append(err)
                    continue
                seen[i].append((res.model_version, res.correction))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    publish(l96_repository, "l96", model2, config2)
    expected[2] = [Corrector.load(l96_repository, "l96", 2)(x) for x in xs]
    deadline = time.monotonic() + 20
    while not all(s and s[-1][0] == 2 for s in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    total = sum(len(s) for s in seen)
    versions = {v for s in seen for v, _ in s}
    assert versions == {1, 2}, versions
    for i, calls in enumerate(seen):
        assert calls[-1][0] == 2  # every client ends on the new version
        order = [v for v, _ in calls]
        assert order == sorted(order)  # never back to v1 after v2
        for v, y in calls[:: max(1, len(calls) // 10)] + calls[-1:]:
            np.testing.assert_allclose(y, expected[v][i], rtol=1e-4, atol=1e-5)
    assert total > 4 * n
    print(f"hot reload: {total} calls, versions {sorted(versions)}")


def test_server_stop_finishes_in_flight_requests(start_server):
    server = start_server(batch_max_size=8)
    x = RNG.normal(2.5, 3.6, (4096, 36))  # a large request in the worker thread
    results = []

    def call():
        with CorrectionClient(server.url, "l96", timeout=30) as c:
            results.append(c.infer(x).correction.shape)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.05)
    server.stop()
    t.join()
    assert results == [(4096, 36)]


def test_mecs_serve_command_starts_and_stops(l96_repository, tmp_path):
    """``mecs serve`` in its own process: config file, port 0, clean stop on SIGTERM."""
    import re
    import subprocess
    import sys

    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"batch_max_size": 4, "log_level": "warning"}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mecs",
            "serve",
            "--repository",
            str(l96_repository),
            "--port",
            "0",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"on (http://\S+) ", line).group(1)
        with CorrectionClient(url, "l96") as c:
            assert c.ready() and c.infer(RNG.normal(size=(1, 36))).model_version == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, -15)  # uvicorn re-raises SIGTERM after a graceful stop
    assert "AUTHENTICATION DISABLED" in err
