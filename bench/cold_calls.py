"""What one infer call's code costs run back to back, and after the gap a caller leaves.

``bench/service.py`` measures one l96 call over HTTP at 450-700 us while the service's
whole infer path, driven in process back to back, costs ~120 us of CPU. This script
shows where the difference comes from: on this machine, code that runs after the
process has waited (in ``epoll_wait``, as a server does while its caller works)
runs several times slower than the same code run back to back. It times, in one
run and interleaved:

- the server's ONNX Runtime forward of the l96 model (1 x 36 FP32);
- the input check's two reductions (min and max of the state);
- the app's whole infer path in process (the ASGI app called with a binary infer
  request, no sockets): middleware, handler, batcher, runtime, guardrails, answer;

each back to back, and after a gap of 50 us, 300 us and 2 ms spent either asleep
(``time.sleep``: the core idles, as a server's does between calls) or spinning
(a busy loop: the core stays busy). A server between two calls of one caller waits
for the caller's own work and two loopback crossings: 200-400 us.

Usage: ``python bench/cold_calls.py [--calls 1500]``; writes
``bench/results/cold_calls.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

GAPS_S = (50e-6, 300e-6, 2e-3)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _pauses() -> dict[str, object]:
    out: dict[str, object] = {"back_to_back": None}
    for gap in GAPS_S:
        label = f"{gap * 1e6:g}us"
        out[f"sleep_{label}"] = lambda g=gap: time.sleep(g)
        out[f"spin_{label}"] = lambda g=gap: _spin(g)
    return out


async def _app_caller(repo: Path):
    """The app with its lifespan started, and a coroutine making one infer call."""
    from service.app import create_app
    from service.protocol import encode_infer_request_parts
    from service.settings import ServiceSettings

    app = create_app(ServiceSettings(repository=repo, log_level="warning"))
    x = np.random.default_rng(0).normal(2.5, 3.6, (1, 36)).astype(np.float32)
    parts, headers = encode_infer_request_parts({"state": x}, True)
    body = b"".join(bytes(p) for p in parts)
    head = [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v2/models/l96/infer",
        "raw_path": b"/v2/models/l96/infer",
        "query_string": b"",
        "root_path": "",
        "headers": head,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    message = {"type": "http.request", "body": body, "more_body": False}
    sent: list[dict] = []

    async def receive():
        return message

    async def send(m):
        sent.append(m)

    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    life = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")

    async def call() -> None:
        sent.clear()
        await app(dict(scope), receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"infer answered {sent[0]['status']}: {sent[-1]}")

    async def stop() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await life

    return call, stop


async def _measure(calls: int) -> dict:
    from support import make_l96_model

    from correction.artifacts import publish
    from correction.guardrails import GuardedCorrector
    from correction.inference import Corrector

    tmp = tempfile.mkdtemp()
    repo = Path(tmp) / "models"
    publish(repo, "l96", *make_l96_model())
    forward = GuardedCorrector(Corrector.load(repo, "l96"), 10.0, 6.0)
    x = np.random.default_rng(1).normal(2.5, 3.6, (1, *forward.packed)).astype(np.float32)
    state = x.reshape(1, -1)
    app_call, stop = await _app_caller(repo)

    def ort() -> None:
        forward.runtime(x, None)

    def check() -> None:
        state.min()
        state.max()

    subjects = {"onnxruntime_forward": ort, "input_check_min_max": check}
    pauses = _pauses()
    times: dict[str, dict[str, list[float]]] = {
        s: {p: [] for p in pauses} for s in [*subjects, "app_infer_path"]
    }
    for _ in range(200):  # warm-up
        ort()
        check()
        await app_call()
    blocks = 10
    for _ in range(blocks):  # interleaved: every figure sees the same machine
        for pname, pause in pauses.items():
            for sname, fn in subjects.items():
                out = times[sname][pname]
                for _ in range(calls // blocks):
                    if pause is not None:
                        pause()
                    t = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t)
            out = times["app_infer_path"][pname]
            for _ in range(calls // blocks):
                if pause is not None:
                    pause()
                t = time.perf_counter()
                await app_call()
                out.append(time.perf_counter() - t)
    await stop()
    return {
        s: {p: round(float(np.median(v)) * 1e6, 1) for p, v in per.items()}
        for s, per in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500, help="calls per figure")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cold_calls.json"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as the server does
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    load = os.getloadavg()
    p50 = run(_measure(args.calls))
    ratios = {
        s: {p: round(v / per["back_to_back"], 2) for p, v in per.items()} for s, per in p50.items()
    }
    result = {
        "bench": "cold_calls",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(v, 2) for v in load],
        },
        "calls_per_figure": args.calls,
        "p50_us": p50,
        "over_back_to_back": ratios,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
