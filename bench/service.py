"""Correction service figures, all in one run, with the project's own client.

Starts ``mecs serve`` in subprocesses on 127.0.0.1 over a small l96 model and
measures, writing ``bench/results/service.json``:

1. one l96 correction (1 x 36 FP32): p50/p99 round trip over HTTP (binary) against
   the in-process ``Corrector`` call, plus the bare HTTP floor (``/v2/health/live``);
2. 40 concurrent independent callers (separate processes, one state each, closed
   loop), with micro-batching and without (``MECS_BATCH_MAX_SIZE=1``);
3. the same 40 members sent as one batched request per step;
4. a 4 MB state (29127 x 36 FP32), binary against JSON: round trip, and the transport
   cost alone (round trip minus the server's forward time, from its ``Server-Timing``
   header), against the in-process forward.

Usage: ``python bench/service.py [--duration 3] [--calls 3000] [--out PATH]``.
The machine's load average is recorded: figures from a busy machine are not floors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MEMBERS = 40
BIG_ROWS = 29127  # 29127 * 36 * 4 bytes = 4.19 MB


def pct(values, q) -> float:
    return round(float(np.percentile(np.asarray(values) * 1e6, q)), 1)


def summary(values) -> dict:
    return {"p50_us": pct(values, 50), "p99_us": pct(values, 99), "n": len(values)}


class Server:
    """``mecs serve`` in a subprocess; the URL is read from its start-up line."""

    def __init__(self, repository: Path, **env: str) -> None:
        environ = dict(os.environ, MECS_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        environ.update({f"MECS_{k.upper()}": str(v) for k, v in env.items()})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mecs", "serve", "--repository", str(repository), "--port", "0"],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        match = re.search(r"on (http://\S+) ", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = match.group(1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def timed(fn, n: int, warmup: int = 200) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _caller(url, state, start, stop_at, ready, queue):
    """One independent caller (its own process): closed loop until ``stop_at``."""
    from service.client import CorrectionClient

    lat, sizes = [], []
    with CorrectionClient(url, "l96", timeout=30) as c:
        for _ in range(20):
            c.infer(state)
        ready.put(1)
        start.wait()
        while time.time() < stop_at.value:
            t = time.perf_counter()
            r = c.infer(state)
            lat.append(time.perf_counter() - t)
            sizes.append(r.batch_size)
    queue.put((lat, sizes))


def concurrent_callers(url: str, states: np.ndarray, duration: float) -> dict:
    ctx = mp.get_context("spawn")
    start, queue, ready = ctx.Event(), ctx.Queue(), ctx.Queue()
    stop_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_caller, args=(url, states[i : i + 1], start, stop_at, ready, queue))
        for i in range(len(states))
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every caller imported and warmed up
        ready.get(timeout=300)
    time.sleep(1.0)  # let the machine settle after the start-up burst
    stop_at.value = time.time() + duration + 0.5
    start.set()
    results = [queue.get(timeout=duration + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = [x for r, _ in results for x in r]
    sizes = [s for _, ss in results for s in ss]
    calls = len(lat)
    return {
        "callers": len(procs),
        "requests_per_s": round(calls / (duration + 0.5), 1),
        "latency": summary(lat),
        "mean_batch_size": round(float(np.mean(sizes)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per throughput run")
    parser.add_argument("--calls", type=int, default=3000, help="calls for the latency figures")
    parser.add_argument("--big-reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "service.json"))
    args = parser.parse_args()

    import psutil
    import torch
    from conftest import make_l96_model

    from correction.artifacts import publish
    from correction.inference import Corrector
    from service.client import CorrectionClient

    torch.set_num_threads(1)  # as the server does
    load_before = os.getloadavg()
    # CPU taken by other jobs while this benchmark is idle: figures from a busy
    # machine are upper bounds, not floors
    busy_before = psutil.cpu_percent(interval=2.0)
    rng = np.random.default_rng(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        publish(repo, "l96", *make_l96_model())
        corr = Corrector.load(repo, "l96")
        x1 = rng.normal(2.5, 3.6, (1, 36)).astype(np.float32)
        members = rng.normal(2.5, 3.6, (MEMBERS, 36)).astype(np.float32)
        big = rng.normal(2.5, 3.6, (BIG_ROWS, 36)).astype(np.float32)

        with Server(repo) as server, CorrectionClient(server.url, "l96", timeout=120) as c:
            # 1. one call
            in_process = timed(lambda: corr(x1), args.calls)
            live = timed(lambda: c.live(), args.calls)
            http = timed(lambda: c.infer(x1), args.calls)
            results["single_call"] = {
                "in_process": summary(in_process),
                "http_binary": summary(http),
                "http_floor_health_live": summary(live),
            }
            print("single call", json.dumps(results["single_call"]), flush=True)
            # 3. 40 members in one request per step
            n_steps = 0
            t_end = time.perf_counter() + args.duration
            lat = []
            while time.perf_counter() < t_end:
                t = time.perf_counter()
                c.infer(members)
                lat.append(time.perf_counter() - t)
                n_steps += 1
            results["one_request_40_members"] = {
                "requests_per_s": round(n_steps / args.duration, 1),
                "member_steps_per_s": round(MEMBERS * n_steps / args.duration, 1),
                "latency": summary(lat),
                "in_process_40": summary(timed(lambda: corr(members), 500, 50)),
            }
            print("one request", json.dumps(results["one_request_40_members"]), flush=True)
            # 4. a 4 MB state, binary and JSON
            fwd = timed(lambda: corr(big), args.big_reps, 1)
            rows = {}
            for binary, reps in ((True, args.big_reps), (False, max(2, args.big_reps // 2))):
                rtt, server_fwd, overhead = [], [], []
                for i in range(reps + 1):
                    t = time.perf_counter()
                    res = c.infer(big, binary=binary)
                    elapsed = time.perf_counter() - t
                    if i:  # the first call warms up
                        f = res.server_timing_ms["forward"] / 1e3
                        rtt.append(elapsed)
                        server_fwd.append(f)
                        overhead.append(elapsed - f)
                rows["binary" if binary else "json"] = {
                    "round_trip_ms": round(float(np.median(rtt)) * 1e3, 1),
                    "server_forward_ms": round(float(np.median(server_fwd)) * 1e3, 1),
                    "transport_overhead_ms": round(float(np.median(overhead)) * 1e3, 1),
                    "reps": reps,
                }
            rows["in_process_forward_ms"] = round(float(np.median(fwd)) * 1e3, 1)
            rows["state_bytes"] = int(big.nbytes)
            rows["json_over_binary_round_trip"] = round(
                rows["json"]["round_trip_ms"] / rows["binary"]["round_trip_ms"], 1)  # fmt: skip
            rows["json_over_binary_transport"] = round(
                rows["json"]["transport_overhead_ms"]
                / max(rows["binary"]["transport_overhead_ms"], 0.1), 1)  # fmt: skip
            results["state_4mb"] = rows
            print("4 MB", json.dumps(rows), flush=True)
            # 2a. 40 independent callers, micro-batching on
            results["callers_40_batched"] = concurrent_callers(server.url, members, args.duration)
            print("batched", json.dumps(results["callers_40_batched"]), flush=True)
        # 2b. the same without micro-batching
        with Server(repo, batch_max_size=1) as server:
            results["callers_40_unbatched"] = concurrent_callers(server.url, members,
                                                                 args.duration)  # fmt: skip
            print("unbatched", json.dumps(results["callers_40_unbatched"]), flush=True)

    single = results["single_call"]["http_binary"]
    unbatched = results["callers_40_unbatched"]["requests_per_s"]
    results["ratios"] = {
        "batching_speedup_40_callers": round(
            results["callers_40_batched"]["requests_per_s"] / unbatched, 2),
        "one_request_vs_member_per_request": round(
            results["one_request_40_members"]["member_steps_per_s"] / unbatched, 1),
    }  # fmt: skip
    results["targets"] = {
        "single_call_p50_le_500us": single["p50_us"] <= 500,
        "single_call_p99_le_2ms": single["p99_us"] <= 2000,
        "batching_ge_1.5x": results["ratios"]["batching_speedup_40_callers"] >= 1.5,
        "one_request_ge_10x": results["ratios"]["one_request_vs_member_per_request"] >= 10,
        "binary_4mb_adds_le_10ms": results["state_4mb"]["binary"]["transport_overhead_ms"] <= 10,
        "json_ge_20x_binary_transport": results["state_4mb"]["json_over_binary_transport"] >= 20,
    }
    report = {
        "bench": "service",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_before": [round(v, 2) for v in load_before],
            "other_jobs_cpu_percent_before": busy_before,
        },
        "model": "l96 stencil-cnn (hidden 16, depth 3), state [36] FP32",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"]["ratios"]), json.dumps(report["results"]["targets"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
