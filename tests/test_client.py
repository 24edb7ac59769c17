"""CorrectionClient: degradation policies, breaker, retries, keep-alive, HTTP parsing."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from support import metric_value

from service.client import (
    CorrectionClient,
    RequestRejected,
    ServiceUnavailable,
)

RNG = np.random.default_rng(2)


def _stopped_after_one_call(start_server, **client_kw):
    """A client that got one real correction, then lost its server."""
    server = start_server()
    client = CorrectionClient(server.url, "l96", retries=1, backoff=0.001, **client_kw)
    x = RNG.normal(2.5, 3.6, (3, 36))
    first = client.correct(x)
    server.stop()
    return client, x, first


def test_policy_raise_against_stopped_server(start_server):
    client, x, _ = _stopped_after_one_call(start_server, degrade="raise")
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        client.correct(x)
    assert client.degraded_steps == 0 and client.failures == 1


def test_policy_zero_against_stopped_server(start_server):
    client, x, _ = _stopped_after_one_call(start_server, degrade="zero")
    for _ in range(3):
        out = client.correct(x)
        assert out.shape == x.shape and out.dtype == x.dtype and not out.any()
    assert client.degraded_steps == 3
    assert isinstance(client.last_error, ServiceUnavailable)


def test_policy_last_against_stopped_server(start_server):
    client, x, first = _stopped_after_one_call(start_server, degrade="last")
    np.testing.assert_array_equal(client.correct(x), first)
    np.testing.assert_array_equal(client.correct(x), first)
    assert client.degraded_steps == 2
    # a different shape cannot reuse the last correction: zero instead, still counted
    assert not client.correct(x[:1]).any() and client.degraded_steps == 3


def test_breaker_stops_calling_a_dead_service(start_server):
    client, x, _ = _stopped_after_one_call(
        start_server, degrade="zero", failure_threshold=2, cooldown_s=30
    )
    client.correct(x)
    client.correct(x)  # breaker opens
    calls = client.calls
    for _ in range(100):
        client.correct(x)
    assert client.calls == calls  # no network attempt while open
    assert client.degraded_steps == 102
    assert "circuit open" in str(client.last_error)


def test_caller_errors_are_never_degraded(start_server):
    server = start_server()
    with CorrectionClient(server.url, "l96", degrade="zero") as client:
        with pytest.raises(RequestRejected, match="400"):
            client.correct(RNG.normal(size=(2, 35)))
        assert client.degraded_steps == 0
        with (
            CorrectionClient(server.url, "no-such-model", degrade="zero") as typo,
            pytest.raises(RequestRejected, match="404"),
        ):
            typo.correct(RNG.normal(size=(2, 36)))


def test_unloaded_model_degrades_and_degraded_steps_reach_the_server(start_server):
    server = start_server()
    x = RNG.normal(2.5, 3.6, (2, 36))
    with CorrectionClient(
        server.url, "l96", degrade="last", retries=0, failure_threshold=100
    ) as client:
        good = client.correct(x)
        client.unload_model()
        for _ in range(4):
            np.testing.assert_array_equal(client.correct(x), good)
        assert client.degraded_steps == 4
        assert client.load_model()["version"] == "1"
        client.correct(x)  # reports the 4 degraded steps with this call
        assert (
            metric_value(client.metrics_text(), "mecs_client_degraded_steps_total", model="l96")
            == 4
        )


def test_idle_keep_alive_close_is_retried_silently(start_server):
    server = start_server(keep_alive_s=1)
    x = RNG.normal(2.5, 3.6, (1, 36))
    with CorrectionClient(server.url, "l96", retries=0) as client:
        client.infer(x)
        time.sleep(1.6)  # the server closes the idle connection
        assert client.infer(x).model_version == 1
        assert client.failures == 0


class _FakeServer:
    """A raw socket server answering each request with canned bytes (or never)."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            while self.responses:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        h.split(b":")[1]
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length")
                    )
                )
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests += 1
                reply = self.responses.pop(0)
                if reply is None:  # hang: never answer
                    time.sleep(5)
                    return
                conn.sendall(reply)

    def close(self):
        self.sock.close()


def _chunked_json(obj: bytes) -> bytes:
    half = len(obj) // 2
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (obj[:half], obj[half:]))
    return (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json"
        b"\r\n\r\n" + body + b"0\r\n\r\n"
    )


def test_timeouts_retries_and_chunked_responses():
    import json

    x = np.ones((1, 36))
    answer = json.dumps(
        {
            "model_name": "m",
            "model_version": "3",
            "parameters": {},
            "outputs": [
                {"name": "correction", "datatype": "FP64", "shape": [1, 36], "data": [0.5] * 36}
            ],
        }
    ).encode()
    busy = b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 17\r\n\r\n{"error": "busy"}'
    fake = _FakeServer([busy, _chunked_json(answer)])
    with CorrectionClient(fake.url, "m", retries=2, backoff=0.001) as client:
        res = client.infer(x)  # 503 retried, then a chunked answer parsed
        assert res.model_version == 3 and (res.correction == 0.5).all() and fake.requests == 2
    fake.close()
    slow = _FakeServer([None, None, None])
    with CorrectionClient(
        slow.url, "m", timeout=0.2, retries=1, backoff=0.001, degrade="zero"
    ) as client:
        assert not client.correct(x).any()  # two attempts of 0.2 s, then degraded
        assert slow.requests == 2 and client.degraded_steps == 1
        assert "timed out" in str(client.last_error)
    slow.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="degrade"):
        CorrectionClient("http://127.0.0.1:1", "m", degrade="ignore")
    with pytest.raises(ValueError, match="URL"):
        CorrectionClient("ftp://x", "m")
    with CorrectionClient("http://127.0.0.1:1", "m") as c, pytest.raises(TypeError, match="float"):
        c.infer(np.ones((1, 36), dtype=np.int64))
