"""Pretraining under torchrun: 1 process against 2 (gloo on CPU), in one run.

Runs the real command line on the same increment store with the same settings and
global batch: ``mecs pretrain`` in one process (1 and 2 intra-op threads) and
``torchrun --standalone --nproc-per-node 2 -m mecs pretrain`` (1 thread per rank).
For each it reports the best validation loss, the samples/s of the training loop
(samples over the epochs' training time, as each run's history records them) and
the wall time of the command. Then a 2-process job is killed after its checkpoint
at ``--kill-after`` epochs and resumed in 1 process, which must finish and reach the
same validation loss. Writes ``bench/results/distributed.json``.

    python bench/distributed.py [--epochs 12] [--duration 1000] [--network column-mlp]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from common import prepare, write  # noqa: E402


def command(nproc: int, inc: Path, repo: Path, cfg: Path) -> list[str]:
    args = ["pretrain", "--data", str(inc), "--repository", str(repo), "--name", "m"]
    args += ["--config", str(cfg), "--no-progress"]
    if nproc == 1:
        return [sys.executable, "-m", "mecs", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc-per-node={nproc}", "-m", "mecs", *args]


def env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def figures(repo: Path) -> dict:
    config = json.loads((repo / "m" / "1" / "config.json").read_text())
    hist = config["training"]["history"][1:]
    samples = sum(h["samples"] for h in hist)
    seconds = sum(h["train_seconds"] for h in hist)
    return {
        "best_val_loss": config["metrics"]["val_loss"],
        "best_epoch": config["training"]["best_epoch"],
        "epochs": len(hist),
        "samples_per_epoch": hist[0]["samples"],
        "samples_per_s": samples / seconds,
        "world_size": config["training"]["world_size"],
    }


def run(nproc: int, threads: int, inc: Path, work: Path, cfg: Path) -> dict:
    repo = work / f"p{nproc}-t{threads}"
    shutil.rmtree(repo, ignore_errors=True)
    t0 = time.perf_counter()
    out = subprocess.run(
        command(nproc, inc, repo, cfg), capture_output=True, text=True, env=env(threads)
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    got = figures(repo) | {"processes": nproc, "threads_per_process": threads, "wall_s": wall}
    print(
        f"{nproc} process(es) x {threads} thread(s): val {got['best_val_loss']:.5f}, "
        f"{got['samples_per_s']:.0f} samples/s, {wall:.1f} s",
        flush=True,
    )
    return got


def kill_and_resume(inc: Path, work: Path, cfg: Path, kill_after: int) -> dict:
    repo = work / "resume"
    shutil.rmtree(repo, ignore_errors=True)
    proc = subprocess.Popen(
        command(2, inc, repo, cfg),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env(1),
        start_new_session=True,
    )
    epoch = 0
    while proc.poll() is None and epoch < kill_after:
        for p in (repo / "m").glob(".train-*/checkpoint/progress.json"):
            with contextlib.suppress(OSError, ValueError):
                epoch = json.loads(p.read_text())["epoch"]
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"the job ended before epoch {kill_after}: {proc.stderr.read()[-2000:]}")
    for victim in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(command(1, inc, repo, cfg), capture_output=True, text=True, env=env(1))
    if out.returncode != 0 or "resumed from the checkpoint" not in out.stdout:
        raise RuntimeError(f"the resume failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    got = figures(repo) | {"killed_after_epoch": epoch}
    print(f"killed at epoch {epoch} (2 processes), resumed in 1: val {got['best_val_loss']:.5f}")
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--duration", type=float, default=1000.0)
    p.add_argument("--network", default="column-mlp")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--kill-after", type=int, default=4)
    args = p.parse_args()
    _, inc, _ = prepare("l96-2s", "noisy-truth", duration=args.duration)
    settings = {
        "network": args.network,
        "max_epochs": args.epochs,
        "batch_size": args.batch_size,
        "early_stopping": args.epochs,  # every run trains every epoch: comparable times
        "seed": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = work / "pretrain.json"
        cfg.write_text(json.dumps(settings))
        runs = [run(1, 1, inc, work, cfg), run(2, 1, inc, work, cfg), run(1, 2, inc, work, cfg)]
        resumed = kill_and_resume(inc, work, cfg, args.kill_after)
    one, two, one_t2 = runs
    report = {
        "settings": settings | {"store": str(inc), "duration": args.duration},
        "runs": runs,
        "resume": resumed,
        "val_loss_two_over_one": two["best_val_loss"] / one["best_val_loss"],
        "val_loss_resumed_over_one": resumed["best_val_loss"] / one["best_val_loss"],
        "speedup_two_processes": two["samples_per_s"] / one["samples_per_s"],
        "speedup_two_threads": one_t2["samples_per_s"] / one["samples_per_s"],
        "wall_ratio_two_processes": two["wall_s"] / one["wall_s"],
    }
    print(
        f"val loss 2/1 {report['val_loss_two_over_one']:.4f}, resumed/1 "
        f"{report['val_loss_resumed_over_one']:.4f}; samples/s 2 processes / 1: "
        f"{report['speedup_two_processes']:.2f}x, 2 threads / 1: "
        f"{report['speedup_two_threads']:.2f}x"
    )
    write("distributed", report)


if __name__ == "__main__":
    main()
