"""Shared set-up for the science benchmarks: cached benchmark data and increments."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
DATA = RESULTS / "data"


def prepare(
    preset: str, analysis: str, sigma: float = 0.1, duration: float = 1000.0, seed: int = 0
) -> tuple[Path, Path, Any]:
    """``mecs synth`` + ``mecs increments`` for one setting, reused across runs."""
    from data_pipeline import build_increments
    from data_pipeline.config import load_config
    from data_pipeline.synth import generate

    cfg = load_config(preset, analysis=analysis, obs_sigma=sigma, duration=duration, seed=seed)
    tag = f"{preset}-{analysis}-s{sigma:g}-d{duration:g}-seed{seed}"
    synth, inc = DATA / tag, DATA / f"{tag}.increments.zarr"
    if not (synth / "config.json").exists():
        generate(cfg, synth, overwrite=True, progress=False, log=lambda _: None)
    if not inc.exists():
        build_increments(
            synth / "analyses.zarr",
            synth / "forecasts_archive.zarr",
            cfg.obs_interval,
            inc,
            split=cfg.increment_split(),
        )
    return synth, inc, cfg


def summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(len(a)),
    }


def write(name: str, report: dict[str, Any]) -> Path:
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    report = {"bench": name, "machine": machine, **report}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return path
