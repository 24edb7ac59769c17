"""Benchmark generator figures: LETKF analysis accuracy and ``mecs synth`` wall time.

Runs the full-length default preset (about 1000 MTU of cycles) at two observation
noise levels and writes ``bench/results/synth.json``. Usage:

    python bench/synth.py [--duration 1000] [--sigmas 0.1 0.5] [--preset l96-2s]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from correction.storage import open_zarr
from data_pipeline.config import load_config
from data_pipeline.synth import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1000.0)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--preset", default="l96-2s")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "synth.json"))
    args = parser.parse_args()
    rows = []
    for sigma in args.sigmas:
        cfg = load_config(args.preset, obs_sigma=sigma, duration=args.duration)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            result = generate(cfg, Path(tmp) / "b", progress=False, log=lambda _: None)
            wall = time.perf_counter() - t
            truth = open_zarr(Path(tmp) / "b" / "truth.zarr")["X"].values
            ana = open_zarr(Path(tmp) / "b" / "analyses.zarr")["X"].values
            per_time = np.sqrt(np.mean((ana - truth) ** 2, axis=1))
        row = {
            "preset": args.preset,
            "obs_sigma": sigma,
            "duration": args.duration,
            "analysis_rmse": result.analysis_rmse,
            "analysis_rmse_p95_over_time": float(np.quantile(per_time, 0.95)),
            "observation_rmse": result.obs_rmse,
            "wall_time_s": wall,
        }
        print(json.dumps(row))
        rows.append(row)
    report = {
        "bench": "synth",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
