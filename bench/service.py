"""Correction service figures, all in one run, with the project's own client.

Starts ``mecs serve`` in subprocesses on 127.0.0.1 over a small l96 model and
measures, writing ``bench/results/service.json``:

1. one l96 correction (1 x 36 FP32): p50/p99 round trip over HTTP (binary; the client on
   its own socket transport and on the standard library's ``http.client``) against
   the in-process ``Corrector`` call, the server's own runtime called in process, and
   the bare HTTP floor (``/v2/health/live``), measured in interleaved blocks so
   that all of them see the same machine;
2. 40 concurrent independent callers (separate processes, one state each, closed
   loop), with micro-batching and without (``MECS_BATCH_MAX_SIZE=1``), for the
   default runtime (ONNX Runtime) and for TorchScript, whose forward costs more:
   four servers at once, the same callers taking turns on them in interleaved
   windows (a side-by-side comparison on a shared machine);
3. the same 40 members sent as one batched request per step;
4. a 4 MB state (29127 x 36 FP32), binary against JSON: round trip, and the transport
   cost alone (round trip minus the server's forward time, from its ``Server-Timing``
   header), against the in-process forward;
5. floors: a bare ASGI echo app on uvicorn, in its own process with the service's
   malloc tuning, answering the same bytes as a small call and as the 4 MB state,
   with the same client connection;
6. the old path side by side (``--baseline REF``, default the commit before the lean
   path): REF's server in the same interleaved blocks as 1., called by this client;
7. 40 callers in one timestep group of 40 (``group``/``group_size``) next to timer
   batching and no batching, in 2.'s interleaved windows;
8. the 4 MB state through shared memory next to 4.'s binary body.
9. busy polling (``MECS_BUSY_POLL_US=1000``): a third server in 1.'s interleaved blocks,
   and a fifth configuration in 2.'s windows (does it cost throughput under load?).
10. a CPU latency QoS request of 0 us (what ``MECS_CPU_LATENCY_QOS_US=0`` makes the
   service hold; idle CPUs poll instead of halting): held by this process in blocks of
   its own between 1.'s, and around a second pass of 8. Machine-wide, so a variant in
   time, not a server. Needs root; left out where ``/dev/cpu_dma_latency`` refuses.

Usage: ``python bench/service.py [--duration 3] [--calls 3000] [--baseline REF] [--out PATH]``.
The machine's load average is recorded: figures from a busy machine are not floors.
This script is longer than 500 lines because every figure is measured in one run,
on one machine state, and split it would compare figures from different runs.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
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


def _tree_from_argv(argv: list[str]) -> Path:
    """``--tree DIR``: the checkout whose code is measured (default: this one).

    ``bench/compare.py`` runs this one script on an old and a new tree, so that both
    are measured by the same code; it must be known before anything is imported.
    """
    if "--tree" in argv:
        return Path(argv[argv.index("--tree") + 1]).resolve()
    return ROOT


TREE = _tree_from_argv(sys.argv)
sys.path.insert(0, str(TREE))
sys.path.insert(0, str(TREE / "tests"))

MEMBERS = 40
BASELINE = "f97c06c"
BIG_ROWS = 29127  # 29127 * 36 * 4 bytes = 4.19 MB
BUSY_POLL_US = 1000  # the busy-poll window of the side-by-side server


def pct(values, q) -> float:
    return round(float(np.percentile(np.asarray(values) * 1e6, q)), 1)


def summary(values) -> dict:
    return {"p50_us": pct(values, 50), "p99_us": pct(values, 99), "n": len(values)}


async def _echo_app(scope, receive, send):
    """The floor: read the whole body and answer it, no framework in between."""
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _serve_echo(port: int) -> None:
    import uvicorn

    from service.app import tune_malloc

    tune_malloc(32 << 20)  # as the service does at start-up, so that this stays a floor
    uvicorn.run(_echo_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def echo_floor(sizes: dict[str, int], calls: int, big_reps: int) -> dict:
    """Round trips of a bare uvicorn echo (own process) with the project's connection."""
    import socket

    try:
        from service.client import SocketTransport
    except ImportError:  # a tree from before the client was split: its private name
        from service.client import _Connection as SocketTransport

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = mp.get_context("spawn").Process(target=_serve_echo, args=(port,), daemon=True)
    proc.start()
    conn = SocketTransport("127.0.0.1", port, False, 1.0)
    try:
        deadline = time.time() + 60
        while True:
            try:
                conn.open()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        out = {}
        for label, n in sizes.items():
            body = [b"", memoryview(bytes(n))]  # sent as the client sends a tensor: no copy
            head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n".encode()
            reps = calls if n < 65536 else big_reps * 4
            send = getattr(conn, "send_raw", None) or conn.request
            times = timed(lambda: send(head, body, 30), reps, max(reps // 10, 2))  # noqa: B023
            out[label] = {"bytes": n, **summary(times)}
        return out
    finally:
        conn.close()
        proc.terminate()
        proc.join(10)


class Server:
    """``mecs serve`` in a subprocess; the URL is read from its start-up line."""

    def __init__(self, repository: Path, tree: Path | None = None, **env: str) -> None:
        tree = tree or TREE
        environ = dict(os.environ, MECS_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
        environ.update({f"MECS_{k.upper()}": str(v) for k, v in env.items()})
        environ["PYTHONPATH"] = os.pathsep.join([str(tree), environ.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mecs", "serve", "--repository", str(repository), "--port", "0"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=tree,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
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


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the benchmark dies (no stray servers as noise)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def timed(fn, n: int, warmup: int = 200) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _caller(urls, state, schedule, t0, ready, queue, groups=None):
    """One independent caller (its own process): a closed loop on each window's server.

    ``groups`` maps a label to ``(group, size)``: that server's calls declare it.
    """
    from service.client import CorrectionClient

    clients = {}
    for k, u in urls.items():
        group, size = (groups or {}).get(k, (None, None))
        kw = {"group": group, "group_size": size} if group else {}
        clients[k] = CorrectionClient(u, "l96", timeout=30, **kw)
    for k, c in clients.items():
        if k not in (groups or {}):  # a group's warm-up would wait for the others' timeout
            for _ in range(20):
                c.infer(state)
    ready.put(1)
    parent = os.getppid()
    while t0.value == 0.0:
        if os.getppid() != parent:  # the benchmark died: do not poll forever as noise
            return
        time.sleep(0.005)
    out = []
    for label, begin, end in schedule:
        while time.time() < t0.value + begin:
            time.sleep(0.001)
        c, lat, sizes = clients[label], [], []
        while time.time() < t0.value + end:
            t = time.perf_counter()
            r = c.infer(state)
            lat.append(time.perf_counter() - t)
            sizes.append(r.batch_size)
        out.append((label, lat, sizes))
    for c in clients.values():
        c.close()
    queue.put(out)


def concurrent_callers(
    urls: dict[str, str],
    states: np.ndarray,
    duration: float,
    rounds: int = 3,
    pids: dict[str, int] | None = None,
    groups: dict[str, tuple[str, int]] | None = None,
) -> dict:
    """40 caller processes, taking turns on each server in ``urls``: a side-by-side run.

    The same processes call every server, in windows of ``duration`` seconds
    interleaved over ``rounds`` rounds (order reversed every other round), so slow
    drifts of a shared machine hit every configuration alike. Throughput is per
    window; a ratio between two servers is the median of their per-round ratios.
    With ``pids``, each server's CPU time per request over the run is reported too.
    """
    import psutil

    ctx = mp.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Queue()
    t0 = ctx.Value("d", 0.0)
    labels, schedule, at = list(urls), [], 0.0
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            schedule.append((label, at, at + duration))
            at += duration + 0.3  # a gap: the previous window's last calls drain
    procs = [
        ctx.Process(
            target=_caller, args=(urls, states[i : i + 1], schedule, t0, ready, queue, groups)
        )
        for i in range(len(states))
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every caller imported and warmed up on every server
        ready.get(timeout=300)
    time.sleep(1.0)  # let the machine settle after the start-up burst
    servers = {k: psutil.Process(pid) for k, pid in (pids or {}).items()}
    cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in servers.items()}
    t0.value = time.time() + 0.2
    results = [queue.get(timeout=at + 120) for _ in procs]
    cpu = {k: sum(p.cpu_times()[:2]) - cpu0[k] for k, p in servers.items()}
    for p in procs:
        p.join()
    out = {}
    for label in labels:
        per_round = []
        lat, sizes = [], []
        for w in range(rounds):
            calls = 0
            for res in results:
                windows = [x for x in res if x[0] == label]
                calls += len(windows[w][1])
                lat += windows[w][1]
                sizes += windows[w][2]
            per_round.append(calls / duration)
        out[label] = {
            "callers": len(procs),
            "requests_per_s": round(float(np.median(per_round)), 1),
            "requests_per_s_by_round": [round(x, 1) for x in per_round],
            "latency": summary(lat),
            # a closed loop obeys Little's law: mean latency = callers / throughput, so
            # at a given throughput the mean latency is fixed
            "latency_mean_us": round(float(np.mean(lat)) * 1e6, 1),
            "callers_over_throughput_us": round(len(procs) / float(np.median(per_round)) * 1e6, 1),
            "mean_batch_size": round(float(np.mean(sizes)), 2),
        }
        if label in cpu:  # user + system time of the server process, per answered call
            out[label]["server_cpu_us_per_request"] = round(cpu[label] / len(lat) * 1e6, 1)
    return out


def shared_memory_4mb(client, big: np.ndarray, reps: int) -> dict:
    """The 4 MB state through a shared-memory region: round trip, forward, the rest.

    The state is written into the region once (a model keeps its state there); each
    call carries a JSON header only and the correction comes back in the region.
    """
    try:
        from service.client import SharedMemoryRegion
    except ImportError:
        return {}
    with SharedMemoryRegion(client, "bench", 2 * big.nbytes) as region:
        region.array(big.shape)[...] = big
        rtt, fwd, overhead, split = [], [], [], []
        for i in range(reps + 1):
            t = time.perf_counter()
            res = client.infer_in_region(region, big.shape)
            elapsed = time.perf_counter() - t
            if i:  # the first call warms up
                st = res.server_timing_ms
                f = st["forward"] / 1e3
                rtt.append(elapsed)
                fwd.append(f)
                overhead.append(elapsed - f)
                # where the overhead goes (Server-Timing; "queue" from the commit that added it)
                split.append(
                    (
                        st["decode"],
                        st.get("queue", float("nan")),
                        st["total"] - st["forward"],
                        elapsed * 1e3 - st["total"],
                    )
                )
        med = np.median(np.asarray(split), axis=0)
        return {
            "round_trip_ms": round(float(np.median(rtt)) * 1e3, 2),
            "server_forward_ms": round(float(np.median(fwd)) * 1e3, 2),
            "transport_overhead_ms": round(float(np.median(overhead)) * 1e3, 3),
            "server_decode_ms": round(float(med[0]), 3),
            "server_queue_ms": round(float(med[1]), 3),
            "server_outside_forward_ms": round(float(med[2]), 3),
            "client_and_network_ms": round(float(med[3]), 3),
            "reps": reps,
        }


def _cpu_latency_qos():
    """A 0 us CPU latency request held by this process (what ``MECS_CPU_LATENCY_QOS_US=0``
    makes the service hold), or None where the measured tree or the device has none."""
    try:
        from service.cpulatency import CpuLatencyRequest
    except ImportError:
        return None
    req = CpuLatencyRequest(0)
    return req if req.open() else None


def ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's throughput over b's (same rounds, side by side)."""
    pairs = zip(a["requests_per_s_by_round"], b["requests_per_s_by_round"], strict=True)
    return round(float(np.median([x / y for x, y in pairs])), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per throughput window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of throughput windows")
    parser.add_argument("--calls", type=int, default=3000, help="calls for the latency figures")
    parser.add_argument("--big-reps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "service.json"))
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose code is measured")
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help="git revision or checkout of the old path, served side by side with the "
        f"single call ('none': skip; default {BASELINE}, the last commit before the lean path)",
    )
    parser.add_argument(
        "--callers-only",
        action="store_true",
        help="only the 40-caller figures (a quick old/new comparison of throughput)",
    )
    parser.add_argument(
        "--single-only",
        action="store_true",
        help="only the single-call and 40-member figures (a quick old/new comparison)",
    )
    args = parser.parse_args()

    import psutil
    import torch

    try:
        from support import make_l96_model
    except ImportError:  # a tree from before tests/support/
        from conftest import make_l96_model

    from correction.artifacts import publish
    from correction.inference import Corrector
    from correction.runtime import build_runtime
    from service.client import CorrectionClient
    from service.protocol import encode_infer_request

    torch.set_num_threads(1)  # as the server does
    load_before = os.getloadavg()
    # CPU taken by other jobs while this benchmark is idle: figures from a busy
    # machine are upper bounds, not floors
    busy_before = psutil.cpu_percent(interval=2.0)
    rng = np.random.default_rng(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as trees:
        old_tree = None
        if args.baseline != "none" and not args.callers_only:
            sys.path.insert(1, str(ROOT / "bench"))
            from compare import baseline_tree

            old_tree = trees.enter_context(baseline_tree(args.baseline, Path(tmp)))
        repo = Path(tmp) / "models"
        publish(repo, "l96", *make_l96_model())
        corr = Corrector.load(repo, "l96")
        x1 = rng.normal(2.5, 3.6, (1, 36)).astype(np.float32)
        members = rng.normal(2.5, 3.6, (MEMBERS, 36)).astype(np.float32)
        big = rng.normal(2.5, 3.6, (BIG_ROWS, 36)).astype(np.float32)

        stdlib = "transport" in inspect.signature(CorrectionClient).parameters
        if not args.callers_only:  # --callers-only: the 40-caller figures alone
            with contextlib.ExitStack() as clients:
                # JSON bodies are limited (4 MiB by default); the 4 MB state's JSON figure
                # needs a larger limit
                server = clients.enter_context(
                    Server(repo, max_json_body_bytes=64 << 20, shared_memory="true")
                )
                c = clients.enter_context(CorrectionClient(server.url, "l96", timeout=120))
                # the same server with busy polling (MECS_BUSY_POLL_US), side by side
                busy = clients.enter_context(Server(repo, busy_poll_us=BUSY_POLL_US))
                c_busy = clients.enter_context(CorrectionClient(busy.url, "l96", timeout=120))
                c_old = None
                if old_tree is not None:  # the old path's server, called by this client
                    old = clients.enter_context(Server(repo, tree=old_tree))
                    c_old = clients.enter_context(CorrectionClient(old.url, "l96", timeout=120))
                # 1. one call; interleaved blocks, so that every figure sees the same machine
                runtime = build_runtime(corr.model, (1, 36), "onnxruntime")
                packed = x1.reshape(1, 1, 36)
                fns = {
                    "in_process": lambda: corr(x1),
                    "in_process_runtime": lambda: runtime(packed),
                    "http_floor_health_live": c.live,
                    "http_binary": lambda: c.infer(x1),
                    "http_binary_busy_poll": lambda: c_busy.infer(x1),
                }
                if c_old is not None:
                    fns["http_binary_baseline"] = lambda: c_old.infer(x1)
                # the same calls while a 0 us CPU latency request is held (idle CPUs poll):
                # machine-wide, so measured in blocks of their own, interleaved with the rest
                qos_fns = {
                    "http_binary_cpu_latency_qos": fns["http_binary"],
                    "http_binary_busy_poll_cpu_latency_qos": fns["http_binary_busy_poll"],
                }
                times: dict[str, list[float]] = {k: [] for k in fns}
                client_cpu = 0.0
                for block in range(10):
                    for k, fn in fns.items():
                        cpu = time.process_time()
                        times[k] += timed(fn, args.calls // 10, 200 if block == 0 else 20)
                        if k == "http_binary":  # this process's CPU (user + kernel) per call
                            client_cpu += time.process_time() - cpu
                    held = _cpu_latency_qos()
                    if held is not None:  # where the device refuses, these figures are absent
                        with contextlib.closing(held):
                            for k, fn in qos_fns.items():
                                times.setdefault(k, []).extend(timed(fn, args.calls // 10, 20))
                results["single_call"] = {k: summary(v) for k, v in times.items()}
                results["single_call"]["runtime"] = runtime.name
                n_http = len(times["http_binary"]) + 200 + 9 * 20
                results["single_call"]["client_cpu_us_per_call"] = round(
                    client_cpu / n_http * 1e6, 1
                )
                print("single call", json.dumps(results["single_call"]), flush=True)
                # 1b. the client's transports side by side, after the main figures (so the
                # second connection is not open while those are measured)
                if stdlib:
                    c_std = clients.enter_context(
                        CorrectionClient(server.url, "l96", timeout=120, transport="http.client")
                    )
                    pair = {"socket": lambda: c.infer(x1), "http.client": lambda: c_std.infer(x1)}
                    tt: dict[str, list[float]] = {k: [] for k in pair}
                    for block in range(10):
                        for k, fn in pair.items():
                            tt[k] += timed(fn, args.calls // 10, 200 if block == 0 else 20)
                    results["client_transports"] = {k: summary(v) for k, v in tt.items()}
                    print("transports", json.dumps(results["client_transports"]), flush=True)
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
                if not args.single_only:  # --single-only: bench/compare.py's quick comparison
                    # 4. a 4 MB state, binary and JSON
                    fwd = timed(lambda: corr(big), args.big_reps, 1)
                    rows = {}
                    for binary, reps in (
                        (True, args.big_reps),
                        (False, max(2, args.big_reps // 2)),
                    ):
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
                    rows["shared_memory"] = shared_memory_4mb(c, big, args.big_reps)
                    qos = _cpu_latency_qos()
                    if qos is not None:
                        with contextlib.closing(qos):
                            rows["shared_memory_cpu_latency_qos"] = shared_memory_4mb(
                                c, big, args.big_reps
                            )
                    rows["in_process_forward_ms"] = round(float(np.median(fwd)) * 1e3, 1)
                    rows["state_bytes"] = int(big.nbytes)
                    rows["json_over_binary_round_trip"] = round(
                        rows["json"]["round_trip_ms"] / rows["binary"]["round_trip_ms"], 1
                    )
                    rows["json_over_binary_transport"] = round(
                        rows["json"]["transport_overhead_ms"]
                        / max(rows["binary"]["transport_overhead_ms"], 0.1),
                        1,
                    )
                    results["state_4mb"] = rows
                    print("4 MB", json.dumps(rows), flush=True)
        if not args.single_only:
            # 2. 40 independent callers, micro-batching on and off, for both runtimes: the
            # four servers run at once and the same callers take turns on them
            configs = {
                "batched": {},
                "grouped": {},
                "batched_busy_poll": {"busy_poll_us": BUSY_POLL_US},
                "unbatched": {"batch_max_size": 1},
                "batched_torchscript": {"runtime": "torchscript"},
                "unbatched_torchscript": {"runtime": "torchscript", "batch_max_size": 1},
            }
            with contextlib.ExitStack() as stack:
                servers = {
                    k: stack.enter_context(Server(repo, **env)) for k, env in configs.items()
                }
                callers = concurrent_callers(
                    {k: v.url for k, v in servers.items()},
                    members,
                    args.duration,
                    args.rounds,
                    {k: v.proc.pid for k, v in servers.items()},
                    groups={"grouped": ("bench-40", MEMBERS)},
                )
            for k, v in callers.items():
                results[f"callers_40_{k}"] = v
                print(f"callers_40_{k}", json.dumps(v), flush=True)
            # 5. floors: bare uvicorn echo of the same bytes
            if not args.callers_only:
                sizes = {
                    "small_call": len(encode_infer_request({"state": x1})[0]),
                    "state_4mb": BIG_ROWS * 36 * 4,
                }
                results["floor_bare_echo"] = echo_floor(sizes, args.calls, args.big_reps)
                print("floor", json.dumps(results["floor_bare_echo"]), flush=True)

    if not (args.single_only or args.callers_only):
        single = results["single_call"]["http_binary"]
        unbatched = results["callers_40_unbatched"]["requests_per_s"]
        results["ratios"] = {
            "batching_speedup_40_callers": ratio(callers["batched"], callers["unbatched"]),
            "batching_speedup_40_callers_torchscript": ratio(
                callers["batched_torchscript"], callers["unbatched_torchscript"]
            ),
            "batching_server_cpu_saving_40_callers": round(
                callers["unbatched"]["server_cpu_us_per_request"]
                / callers["batched"]["server_cpu_us_per_request"],
                2,
            ),
            "one_request_vs_member_per_request": round(
                results["one_request_40_members"]["member_steps_per_s"] / unbatched, 1
            ),
            "single_call_over_bare_echo_p50_us": round(
                single["p50_us"] - results["floor_bare_echo"]["small_call"]["p50_us"], 1
            ),
            "grouped_over_timer_throughput": ratio(callers["grouped"], callers["batched"]),
            "busy_poll_over_timer_throughput": ratio(
                callers["batched_busy_poll"], callers["batched"]
            ),
            "single_call_busy_poll_over_plain_p50": round(
                results["single_call"]["http_binary_busy_poll"]["p50_us"] / single["p50_us"], 3
            ),
            "grouped_over_unbatched_throughput": ratio(callers["grouped"], callers["unbatched"]),
            "grouped_over_timer_p50_latency": round(
                callers["grouped"]["latency"]["p50_us"] / callers["batched"]["latency"]["p50_us"],
                3,
            ),
            "single_call_over_bare_echo_p50": round(
                single["p50_us"] / results["floor_bare_echo"]["small_call"]["p50_us"], 2
            ),
            "transport_4mb_over_bare_echo_ms": round(
                results["state_4mb"]["binary"]["transport_overhead_ms"]
                - results["floor_bare_echo"]["state_4mb"]["p50_us"] / 1e3,
                1,
            ),
        }
        if "http_binary_baseline" in results["single_call"]:
            base = results["single_call"]["http_binary_baseline"]
            results["ratios"]["single_call_new_over_baseline_p50"] = round(
                single["p50_us"] / base["p50_us"], 3
            )
            results["ratios"]["single_call_new_over_baseline_p99"] = round(
                single["p99_us"] / base["p99_us"], 3
            )
        if "client_transports" in results:
            t = results["client_transports"]
            results["ratios"]["stdlib_transport_over_socket_p50"] = round(
                t["http.client"]["p50_us"] / t["socket"]["p50_us"], 3
            )
        echo = results["floor_bare_echo"]["small_call"]["p50_us"]
        grouped, timer = callers["grouped"], callers["batched"]
        busy_single = results["single_call"]["http_binary_busy_poll"]
        results["targets"] = {
            "single_call_p50_le_300us_p99_le_1ms_or_2x_echo": (
                single["p50_us"] <= 300 and single["p99_us"] <= 1000
            )
            or single["p50_us"] <= 2 * echo,
            "single_call_busy_poll_p50_le_300us_p99_le_1ms_or_2x_echo": (
                busy_single["p50_us"] <= 300 and busy_single["p99_us"] <= 1000
            )
            or busy_single["p50_us"] <= 2 * echo,
            **{
                f"single_call_{k.removeprefix('http_binary_')}_p50_le_300us_p99_le_1ms": (
                    results["single_call"][k]["p50_us"] <= 300
                    and results["single_call"][k]["p99_us"] <= 1000
                )
                for k in ("http_binary_cpu_latency_qos", "http_binary_busy_poll_cpu_latency_qos")
                if k in results["single_call"]
            },
            "grouped_lower_p50_than_timer": grouped["latency"]["p50_us"]
            < timer["latency"]["p50_us"],
            "grouped_throughput_ge_timer": results["ratios"]["grouped_over_timer_throughput"]
            >= 1.0,
            "grouped_throughput_gt_unbatched": results["ratios"][
                "grouped_over_unbatched_throughput"
            ]
            > 1.0,
            "shared_memory_4mb_overhead_le_1ms": results["state_4mb"]["shared_memory"][
                "transport_overhead_ms"
            ]
            <= 1.0,
            **(
                {
                    "shared_memory_4mb_cpu_latency_qos_overhead_le_1ms": results["state_4mb"][
                        "shared_memory_cpu_latency_qos"
                    ]["transport_overhead_ms"]
                    <= 1.0
                }
                if "shared_memory_cpu_latency_qos" in results["state_4mb"]
                else {}
            ),
            "single_call_p50_le_500us": single["p50_us"] <= 500,
            "single_call_p99_le_2ms": single["p99_us"] <= 2000,
            "batching_ge_1.5x": results["ratios"]["batching_speedup_40_callers"] >= 1.5,
            "one_request_ge_10x": results["ratios"]["one_request_vs_member_per_request"] >= 10,
            "binary_4mb_adds_le_10ms": results["state_4mb"]["binary"]["transport_overhead_ms"]
            <= 10,
            "json_ge_20x_binary_transport": results["state_4mb"]["json_over_binary_transport"]
            >= 20,
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
        "model": "l96 stencil-cnn (hidden 16, depth 3, kernel 5), state [36] FP32",
        "runtime": results.get("single_call", {}).get("runtime", "onnxruntime"),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results.get("ratios")), json.dumps(results.get("targets")))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
