"""Replicated serving: two ``mecs serve`` processes behind nginx, clients that fail over.

The balancer is the distribution's nginx running the shipped configuration
(``deploy/nginx/mecs.conf``, see ``support.balancer``) on 127.0.0.1; the replicas
share one model repository, as compose's ``replicated`` profile mounts it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import numpy as np
import pytest
from support import NginxProcess, ServeProcess, make_l96_model, missing_tools, nginx_binary
from support.balancer import free_port, render

from correction import artifacts
from service.client import CorrectionClient

needs_nginx = pytest.mark.skipif(
    nginx_binary() is None, reason="nginx not installed (apt-get install nginx)"
)


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
        return json.loads(resp.read())


def _served(replica: ServeProcess) -> str | None:
    try:
        return str(_get_json(f"{replica.url}/v2/models/l96")["version"])
    except OSError:
        return None


def _wait(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pin(replica: ServeProcess, version: int) -> None:
    """The rollback: pin ``version`` as the default, on this replica's own address."""
    body = json.dumps({"parameters": {"version": str(version)}}).encode()
    req = urllib.request.Request(
        f"{replica.url}/v2/repository/models/l96/load",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback)
        assert resp.status == 200


@pytest.fixture
def replicas(l96_repository, tmp_path):
    started = [
        ServeProcess(l96_repository, tmp_path / f"replica{i}.log", poll_interval_s=0.2)
        for i in range(2)
    ]
    for r in started:
        _wait(f"{r.url} to be ready", lambda r=r: _served(r) == "1")
    yield started
    for r in started:
        r.close()


def test_the_shipped_config_names_one_upstream_to_replace():
    text = render(["127.0.0.1:1", "127.0.0.1:2"], 9)
    assert text.count("server 127.0.0.1:") == 2 and "api-replica:8000" not in text
    assert "listen 127.0.0.1:9;" in text
    assert "max_fails=1 fail_timeout=2s" in text  # the parameters stay on every line
    with pytest.raises(ValueError, match="api-replica"):
        render(["127.0.0.1:1"], 9, text="server { listen 8080; }")


@needs_nginx
def test_40_callers_through_nginx_across_publish_rollback_and_a_killed_replica(
    replicas, l96_repository, tmp_path
):
    """The acceptance run: 0 failed requests, every answer version 1 or 2."""
    lb = NginxProcess([r.url.removeprefix("http://") for r in replicas], tmp_path / "nginx")
    stop = threading.Event()
    answers: list[tuple[float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with CorrectionClient(lb.url, "l96", timeout=20, retries=3) as client:
            while not stop.is_set():
                state = rng.normal(2.5, 3.0, (36,)).astype(np.float32)
                try:
                    res = client.infer(state)
                except Exception as err:  # noqa: BLE001 - every failure is the finding
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")
                    continue
                with lock:
                    answers.append((time.monotonic(), res.model_version))

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(40)]
    try:
        for t in threads:
            t.start()
        _wait("answers", lambda: len(answers) > 200)
        # a new version, published into the shared repository mid-run
        model, config = make_l96_model(seed=1)
        artifacts.publish(l96_repository, "l96", model, config)
        _wait("every replica to serve v2", lambda: all(_served(r) == "2" for r in replicas))
        t_v2 = time.monotonic()
        _wait("answers from v2", lambda: sum(t > t_v2 + 0.3 for t, _ in answers) > 200)
        # the rollback: version 1 pinned on every replica
        t_pin = time.monotonic()
        for r in replicas:
            _pin(r, 1)
        t_back = time.monotonic()
        _wait("answers after the rollback", lambda: sum(t > t_back + 0.3 for t, _ in answers) > 200)
        # one replica dies mid-run: nginx resends what it had in flight
        os.kill(replicas[0].pid, signal.SIGKILL)
        t_kill = time.monotonic()
        _wait("answers after the kill", lambda: sum(t > t_kill for t, _ in answers) > 300)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        lb.close()
    assert errors == [], errors[:5]
    versions = {v for _, v in answers}
    assert versions == {1, 2}, versions
    # (answers within 0.3 s of a swap may come from requests sent before it)
    assert {v for t, v in answers if t_v2 + 0.3 < t < t_pin} == {2}
    assert {v for t, v in answers if t > t_back + 0.3} == {1}
    assert any(t > t_kill for t, _ in answers)
    print(f"{len(answers)} answers, 0 failed; nginx log: {lb.error_log()[-300:]!r}")


def test_python_client_fails_over_to_the_next_replica(replicas):
    a, b = replicas
    state = np.full((36,), 3.0)
    with CorrectionClient([a.url, b.url], "l96", timeout=5, retries=0) as client:
        assert client.url == a.url
        first = client.correct(state)
        os.kill(a.pid, signal.SIGKILL)
        a.proc.wait(10)
        for _ in range(5):  # every call answered, by b, without waiting on a again
            np.testing.assert_allclose(client.correct(state), first, rtol=1e-6)
        assert client.url == b.url and client.failovers == 1
    # a comma-separated string is the same, and a dead first endpoint is skipped
    with CorrectionClient(f"{a.url},{b.url}", "l96", timeout=5, retries=0) as client:
        assert client.infer(state).model_version == 1
        assert client.urls == [a.url, b.url] and client.url == b.url
    # all endpoints down: the error says so
    b.close()
    with (
        CorrectionClient([a.url, b.url], "l96", timeout=2, retries=0, backoff=0) as client,
        pytest.raises(Exception, match="all 2 endpoints failed"),
    ):
        client.infer(state)


@pytest.mark.skipif(bool(missing_tools()), reason=f"missing {missing_tools()}")
def test_c_client_fails_over_and_runs_through_nginx(native, replicas, tmp_path):
    a, b = replicas
    dead = f"http://127.0.0.1:{free_port()}"

    def probe(url: str, calls: int = 200) -> dict:
        out = subprocess.run(
            [str(native.probe), url, "l96", "", "--calls", str(calls)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    got = probe(f"{dead},{b.url}")
    assert got["failovers"] == 1 and got["endpoint"] == b.url and got["version"] == 1
    if nginx_binary() is not None:
        with NginxProcess([r.url.removeprefix("http://") for r in replicas], tmp_path / "ng") as lb:
            through = probe(lb.url)
        assert through["failovers"] == 0 and through["version"] == 1
        assert through["correction_sum"] == pytest.approx(got["correction_sum"], rel=1e-6)
    # a replica killed while the C client streams calls at it: nothing fails
    proc = subprocess.Popen(
        [str(native.probe), f"{a.url},{b.url}", "l96", "timeout=5", "--calls", "20000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    os.kill(a.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    got = json.loads(stdout)
    assert got["endpoint"] == b.url and got["failovers"] >= 1 and got["degraded_steps"] == 0
