"""``mecs demo``: the whole chain on the embedded default, stage by stage.

Each stage writes into its own folder under the demo directory and is skipped
when that folder is already complete, so a re-run resumes where it stopped.
Stages are added here as the project grows; today it ends with the benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path


def _stage(name: str, done: bool) -> float:
    state = "reusing finished output" if done else "running"
    print(f"[demo] {name}: {state}", flush=True)
    return time.perf_counter()


def run_demo(out: Path, preset: str = "l96-2s", quick: bool = False, fresh: bool = False) -> int:
    """Run every stage that exists and print where the outputs are."""
    from data_pipeline.config import load_config
    from data_pipeline.synth import generate

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    synth_dir = out / "synth"
    done = (synth_dir / "config.json").exists() and not fresh
    t = _stage("1/1 synthetic benchmark (mecs synth)", done)
    if not done:
        cfg = load_config(preset, quick=quick)
        generate(cfg, synth_dir, overwrite=True)
    print(f"[demo] synthetic benchmark: {time.perf_counter() - t:.1f} s -> {synth_dir}")
    print(f"[demo] finished in {time.perf_counter() - t0:.1f} s; outputs in {out.resolve()}")
    return 0
