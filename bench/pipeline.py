"""Increment pipeline figures: build throughput against a plain zarr copy, 1 vs 2 dask
workers, and peak memory for two input sizes 4x apart.

Writes synthetic archive-like inputs (a field on levels x lat x lon, numeric time,
forecasts with leads 0, W, 2W) as zarr, then in the same run:

- copies both input stores zarr-to-zarr with xarray on a LocalCluster (the baseline);
- builds the increment store on LocalClusters of 1 and 2 single-threaded workers;
- for each input size, builds it in a fresh process with dask's threaded scheduler
  and records that process's peak RSS and the most bytes of task results dask held
  at once, and on a fresh 2-worker LocalCluster and records each worker's peak RSS.

Throughput is MB of input (uncompressed bytes of the fields read) per second of wall
time, cluster start-up excluded. Usage:

    python bench/pipeline.py [--small-mb 100] [--chunk-samples 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from correction.storage import open_zarr, write_zarr

GRID = {"level": 4, "lat": 32, "lon": 32}  # 16 KiB per time step
LEADS = 3
WINDOW = 0.25


def make_inputs(root: Path, n_times: int, seed: int = 0) -> tuple[Path, Path]:
    """Analyses ``u(time, level, lat, lon)`` and forecasts with leads 0, W, 2W."""
    rng = np.random.default_rng(seed)
    shape = tuple(GRID.values())
    lat = np.linspace(-1, 1, GRID["lat"])[:, None]
    lon = np.linspace(0, 2 * np.pi, GRID["lon"])[None, :]
    times = np.round(np.arange(n_times + LEADS) * WINDOW, 10)
    truth = np.empty((n_times + LEADS, *shape), np.float32)
    for i, t in enumerate(times):  # a smooth travelling wave plus noise
        wave = np.sin(lon - 0.3 * t) * np.cos(np.pi * lat / 2)
        truth[i] = wave[None] * np.arange(1, shape[0] + 1)[:, None, None]
    truth += 0.05 * rng.standard_normal(truth.shape).astype(np.float32)
    coords = {d: (d, np.arange(n), {"units": "1"}) for d, n in GRID.items()}
    coords["level"] = ("level", np.arange(GRID["level"]), {"positive": "down"})
    ana = xr.Dataset(
        {"u": (("time", *GRID), truth[:n_times], {"units": "m s-1"})},
        coords={**coords, "time": ("time", times[:n_times], {"units": "1"})},
    )
    idx = np.arange(n_times)[:, None] + np.arange(LEADS)[None, :]
    fc_vals = truth[idx] - 0.01 * np.arange(LEADS).reshape(1, -1, 1, 1, 1).astype(np.float32)
    fc = xr.Dataset(
        {"u": (("init_time", "lead_time", *GRID), fc_vals, {"units": "m s-1"})},
        coords={
            **coords,
            "init_time": ("init_time", times[:n_times], {"units": "1"}),
            "lead_time": ("lead_time", np.arange(LEADS) * WINDOW, {"units": "1"}),
        },
    )
    a_path, f_path = root / "analyses.zarr", root / "forecasts.zarr"
    write_zarr(ana, a_path, encoding={"u": {"chunks": (512, *GRID.values())}})
    write_zarr(fc, f_path, encoding={"u": {"chunks": (256, LEADS, *GRID.values())}})
    return a_path, f_path


def input_mb(a_path: Path, f_path: Path) -> float:
    return sum(open_zarr(p)["u"].nbytes for p in (a_path, f_path)) / 1e6


def plain_copy(a_path: Path, f_path: Path, dest: Path, client) -> float:
    """Wall time of an xarray zarr-to-zarr copy of both inputs (same chunks)."""
    t = time.perf_counter()
    for p in (a_path, f_path):
        delayed = write_zarr(open_zarr(p), dest / p.name, compute=False)
        client.compute(delayed).result()
    return time.perf_counter() - t


def cluster_runs(a_path: Path, f_path: Path, tmp: Path, chunk: int, repeats: int) -> dict:
    from distributed import Client, LocalCluster

    from data_pipeline.increments import build_increments

    mb = input_mb(a_path, f_path)
    out: dict = {"input_mb": round(mb, 1)}
    for workers in (1, 2):
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(lambda: __import__("data_pipeline.increments"))  # warm the imports
            copies, builds = [], []
            for r in range(repeats):
                dest = tmp / f"copy-{workers}-{r}"
                copies.append(plain_copy(a_path, f_path, dest, client))
                shutil.rmtree(dest)
                store = tmp / f"inc-{workers}-{r}.zarr"
                t = time.perf_counter()
                build_increments(
                    a_path,
                    f_path,
                    WINDOW,
                    store,
                    chunk_samples=chunk,
                    scheduler=cluster.scheduler_address,
                )
                builds.append(time.perf_counter() - t)
                shutil.rmtree(store)
        copy_s, build_s = min(copies), min(builds)
        out[f"workers_{workers}"] = {
            "copy_s": round(copy_s, 3),
            "copy_mb_s": round(mb / copy_s, 1),
            "build_s": round(build_s, 3),
            "build_mb_s": round(mb / build_s, 1),
            "build_vs_copy": round(copy_s / build_s, 3),
        }
    out["speedup_2_vs_1_workers"] = round(
        out["workers_2"]["build_mb_s"] / out["workers_1"]["build_mb_s"], 3
    )
    return out


def peak_rss_kib() -> int:
    """This process's peak RSS: VmHWM (reset by exec, unlike ru_maxrss, which a child
    inherits from the parent that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(args: argparse.Namespace) -> None:
    """Build once with the threaded scheduler and report this process's peak RSS."""
    from dask.callbacks import Callback
    from dask.sizeof import sizeof

    from data_pipeline.increments import build_increments

    class Held(Callback):
        """The most bytes of task results dask held at once."""

        peak = 0

        def _posttask(self, key, result, dsk, state, id) -> None:  # noqa: A002
            self.peak = max(self.peak, sum(sizeof(v) for v in state["cache"].values()))

    base = peak_rss_kib()
    t = time.perf_counter()
    ana, fc, out = args.child
    with Held() as held:
        report = build_increments(
            ana, fc, WINDOW, out, chunk_samples=args.chunk_samples, scheduler="threads"
        )
    wall = time.perf_counter() - t
    peak = peak_rss_kib()
    print(
        json.dumps(
            {
                "peak_rss_mb": round(peak / 1024, 1),
                "rss_after_imports_mb": round(base / 1024, 1),
                "peak_dask_held_mb": round(held.peak / 1e6, 1),
                "wall_s": round(wall, 3),
                "n_samples": report.n_samples,
            }
        )
    )


def memory_run(a_path: Path, f_path: Path, tmp: Path, chunk: int) -> dict:
    """Peak RSS of a fresh process building with the threaded scheduler."""
    store = tmp / "mem.zarr"
    # glibc keeps freed chunks of its per-thread arenas; dask's workers set this same
    # trim threshold (distributed.nanny.pre-spawn-environ) so that RSS tracks live data
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--chunk-samples",
            str(chunk),
            "--child",
            str(a_path),
            str(f_path),
            str(store),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    shutil.rmtree(store)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["input_mb"] = round(input_mb(a_path, f_path), 1)
    return row


def cluster_memory_run(a_path: Path, f_path: Path, tmp: Path, chunk: int) -> dict:
    """Peak RSS of each worker of a fresh 2-worker LocalCluster over one build."""
    from distributed import Client, LocalCluster

    from data_pipeline.increments import build_increments

    store = tmp / "cmem.zarr"
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        before = client.run(peak_rss_kib)
        build_increments(
            a_path, f_path, WINDOW, store, chunk_samples=chunk, scheduler=cluster.scheduler_address
        )
        after = client.run(peak_rss_kib)
    shutil.rmtree(store)
    return {
        "worker_peak_rss_mb": sorted(round(v / 1024, 1) for v in after.values()),
        "worker_rss_before_mb": sorted(round(v / 1024, 1) for v in before.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small-mb",
        type=float,
        default=100.0,
        help="input size of the small case; the large one is 4x",
    )
    parser.add_argument("--chunk-samples", type=int, default=256)
    parser.add_argument(
        "--throughput-on",
        choices=["small", "large"],
        default="large",
        help="input size of the throughput runs",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "pipeline.json"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    step_bytes = 4 * int(np.prod(list(GRID.values()))) * (1 + LEADS)
    sizes = {"small": args.small_mb, "large": 4 * args.small_mb}
    report: dict = {
        "bench": "pipeline",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "grid": GRID,
        "leads": LEADS,
        "chunk_samples": args.chunk_samples,
        "chunk_mb_per_variable": round(args.chunk_samples * step_bytes / (1 + LEADS) / 1e6, 2),
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        memory = {}
        for name, mb in sizes.items():
            n_times = int(mb * 1e6 / step_bytes)
            root = tmp / name
            root.mkdir()
            a_path, f_path = make_inputs(root, n_times)
            if name == args.throughput_on:
                report["throughput"] = cluster_runs(
                    a_path, f_path, tmp, args.chunk_samples, args.repeats
                )
            memory[name] = memory_run(a_path, f_path, tmp, args.chunk_samples)
            memory[name]["local_cluster"] = cluster_memory_run(
                a_path, f_path, tmp, args.chunk_samples
            )
            shutil.rmtree(root)
        memory["peak_rss_ratio_large_vs_small"] = round(
            memory["large"]["peak_rss_mb"] / memory["small"]["peak_rss_mb"], 3
        )
        memory["worker_peak_ratio_large_vs_small"] = round(
            max(memory["large"]["local_cluster"]["worker_peak_rss_mb"])
            / max(memory["small"]["local_cluster"]["worker_peak_rss_mb"]),
            3,
        )
        report["memory"] = memory
    text = json.dumps(report, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
