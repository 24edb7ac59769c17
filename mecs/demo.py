"""``mecs demo``: the whole chain on the embedded default, stage by stage.

synthetic benchmark -> increment store (local dask cluster) -> offline pretraining
-> emulator -> online fine-tuning -> ``mecs serve`` as a real server process on
127.0.0.1 -> coupled forecasts through HTTP (a single run and a 20-member
ensemble) -> evaluation -> ``report.md``.

Every stage writes into its own place under the demo directory and is skipped
when its output is already complete, so a re-run resumes where it stopped
(``--fresh`` starts over). Each stage calls the same functions as its subcommand.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL = "l96"


# LETKF analyses carry spatially correlated errors and the host's bias; a 5-point
# stencil uses the neighbours' information where a column network cannot
# (bench/offline.py: valid time 2.46 against 2.35 for the column MLP).
STENCIL = {"network": "stencil-cnn", "params": {"hidden": 64, "depth": 3, "kernel": 5}}


@dataclass
class DemoPlan:
    """Sizes of every stage; ``quick`` is the CI end-to-end run."""

    quick: bool
    preset: str
    synth: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    emulator: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    forecast_steps: int = 500
    members: int = 20
    free_run: float = 500.0
    # the promotion gate: hindcasts of 20 analysis intervals (1 MTU) from every 4th
    # held-out analysis, and a free run of gate_free_run intervals
    gate: tuple[str, ...] = ("--intervals", "20", "--init-every", "4", "--max-inits", "64")
    gate_free_run: int = 200

    @classmethod
    def make(cls, preset: str, quick: bool) -> DemoPlan:
        if quick:
            return cls(
                quick,
                preset,
                synth={
                    "duration": 60.0,
                    "da_spinup": 5.0,
                    "truth_spinup": 5.0,
                    "forecast_init_every": 1.0,
                },
                pretrain={**STENCIL, "max_epochs": 12, "early_stopping": 4},
                emulator={"n_states": 6000, "epochs": 10},
                finetune={"mode": "hybrid", "iterations": 100, "unroll": 4, "val_every": 25},
                forecast_steps=200,
                members=20,
                free_run=50.0,
                gate_free_run=100,
            )
        return cls(
            quick,
            preset,
            synth={"duration": 500.0},
            pretrain={**STENCIL, "max_epochs": 30},
            emulator={},
            finetune={"mode": "hybrid", "iterations": 300, "unroll": 10, "val_every": 50},
        )


class Stages:
    """Runs named stages with progress lines and timings, skipping finished ones."""

    def __init__(self, out: Path, fresh: bool, total: int) -> None:
        self.out, self.fresh, self.total, self.count = out, fresh, total, 0
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def run(self, name: str, done: Path, fn: Callable[[], Any]) -> None:
        self.count += 1
        label = f"[demo {self.count}/{self.total}] {name}"
        if done.exists() and not self.fresh:
            print(f"{label}: reusing {done}", flush=True)
            self.timings[name] = 0.0
            return
        print(f"{label} ...", flush=True)
        t = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t
        print(f"{label}: done in {self.timings[name]:.1f} s", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str, timeout: float = 2.0) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback)
        return resp.read()


def _metric_total(text: str, name: str) -> float:
    """Sum of a Prometheus counter over all its label sets."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


class ServiceProcess:
    """``mecs serve`` as a child process on 127.0.0.1 with a one-off API key."""

    def __init__(self, repository: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.key = secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(
            os.environ,
            MECS_INFERENCE_KEYS=self.key,
            MECS_ADMIN_KEYS=self.key,
            MECS_LOG_LEVEL="warning",
            **(env or {}),
        )
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mecs",
                "serve",
                "--repository",
                str(repository),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mecs serve exited with {self.proc.returncode}; see {log}")
            try:
                _get(f"{self.url}/v2/health/ready", self.key)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mecs serve did not become ready in 60 s; see {log}")

    def metrics(self) -> str:
        return _get(f"{self.url}/metrics", self.key).decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _run_cli(args: list[str], env: dict[str, str] | None = None, ok=(0,)) -> int:
    """Run one ``mecs`` subcommand in a child process; fail loudly on a code not in ``ok``."""
    proc = subprocess.run(
        [sys.executable, "-m", "mecs", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    if proc.returncode not in ok:
        raise RuntimeError(f"mecs {args[0]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    for line in proc.stdout.splitlines():
        print(f"    {line}")
    return proc.returncode


def build_increments_stage(synth_dir: Path, cfg: Any, inc: Path) -> None:
    """The increment stage of a demo: the benchmark's window and split, a local cluster."""
    from data_pipeline import build_increments

    report = build_increments(
        synth_dir / "analyses.zarr",
        synth_dir / "forecasts_archive.zarr",
        cfg.obs_interval,
        inc,
        split=cfg.increment_split(),
        scheduler="local",
        overwrite=True,
    )
    for line in report.summary().splitlines():
        print(f"    {line}")


def pretrain_stage(inc: Path, repo: Path, model: str, settings: dict[str, Any]) -> None:
    """The offline pretraining stage of a demo."""
    from correction.training.pretrain import PretrainConfig, pretrain

    res = pretrain(inc, repo, model, PretrainConfig.from_dict(settings), progress=False)
    print(f"    best validation loss {res.best_val_loss:.4f} at epoch {res.best_epoch}")


def run_demo(out: Path, preset: str = "l96-2s", quick: bool = False, fresh: bool = False) -> int:
    """Run the chain and write ``out/report.md``; returns the exit code."""
    import torch

    from correction.evaluation import (
        Benchmark,
        clean_for_json,
        evaluate,
        fit_polynomial,
        write_plots,
    )
    from correction.inference import Corrector
    from correction.training.emulator import EmulatorConfig, train_emulator
    from correction.training.finetune import FinetuneConfig, finetune
    from data_pipeline.benchmarks import L96Benchmark
    from data_pipeline.config import load_config
    from data_pipeline.synth import generate
    from mecs.report import write_report

    torch.set_num_threads(1)  # small tensors: threads cost more than they give on 2 cores
    plan = DemoPlan.make(preset, quick)
    out = out.absolute()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    synth_dir, inc, repo = out / "synth", out / "increments.zarr", out / "models"
    emu, fc_dir, eval_dir = out / "emulator", out / "forecasts", out / "evaluation"
    stages = Stages(out, fresh, total=10)
    cfg = load_config(preset, quick=quick, **plan.synth)

    stages.run(
        "synthetic benchmark (mecs synth)",
        synth_dir / "config.json",
        lambda: generate(cfg, synth_dir, overwrite=True),
    )

    def increments() -> None:
        build_increments_stage(synth_dir, cfg, inc)

    stages.run("increment store on a local dask cluster (mecs increments)", inc, increments)

    def offline() -> None:
        pretrain_stage(inc, repo, MODEL, plan.pretrain)

    stages.run("offline pretraining (mecs pretrain)", repo / MODEL / "1" / "config.json", offline)

    bench = Benchmark.open(synth_dir)
    train_end = int(sum(bench.times < bench.test_start))
    layout, host = L96Benchmark(cfg).layout(), L96Benchmark(cfg).host()

    def emulator() -> None:
        _, m = train_emulator(
            host,
            "l96",
            bench.analyses[:train_end],
            layout,
            emu,
            EmulatorConfig(**plan.emulator),
            progress=False,
        )
        print(f"    one-step RMSE {m['one_step_rmse']:.4f}, 10-step {m['ten_step_rmse']:.4f}")

    stages.run("host-model emulator (mecs emulator)", emu / "config.json", emulator)

    def online() -> None:
        steps = round(cfg.obs_interval / cfg.dt_host)
        res = finetune(
            repo,
            MODEL,
            bench.analyses,
            host,
            FinetuneConfig(**plan.finetune),
            steps,
            train_end,
            from_version=1,
            emulator_path=emu,
            data_ref=str(synth_dir),
            progress=False,
        )
        print(
            f"    a posteriori validation loss {res.history[0]['val_loss']:.5f} -> "
            f"{res.best_val:.5f}"
        )

    stages.run(
        f"online fine-tuning, {plan.finetune['mode']} mode (mecs finetune)",
        repo / MODEL / "2" / "config.json",
        online,
    )

    gate_json = out / "promotion.json"

    def gate() -> None:
        # the fine-tuned version is a candidate: served only if it beats the offline one
        code = _run_cli(
            [
                "promote",
                "--repository",
                str(repo),
                "--name",
                MODEL,
                "--data",
                str(synth_dir),
                "--host",
                "l96",
                "--free-run",
                str(plan.gate_free_run),
                *plan.gate,
                "--out",
                str(gate_json.with_suffix(".partial")),
            ],
            ok=(0, 3),
        )
        doc = json.loads(gate_json.with_suffix(".partial").read_text())
        doc["decision"] = "promoted" if code == 0 else "refused"
        gate_json.write_text(json.dumps(doc, indent=1) + "\n")
        gate_json.with_suffix(".partial").unlink()

    stages.run("promotion gate: online against offline (mecs promote)", gate_json, gate)

    service_json = fc_dir / "service.json"

    def serve_and_forecast() -> None:
        fc_dir.mkdir(parents=True, exist_ok=True)
        records = out / "records"
        shutil.rmtree(records, ignore_errors=True)
        # every answer recorded (a small run): mecs monitor scores them afterwards
        server = ServiceProcess(
            repo,
            fc_dir / "serve.log",
            env={"MECS_RECORD_DIR": str(records), "MECS_RECORD_FRACTION": "1.0"},
        )
        try:
            print(f"    mecs serve is ready at {server.url}")
            figures: dict[str, Any] = {"url": server.url}
            for label, members in [("single", 1), ("ensemble", plan.members)]:
                store = fc_dir / f"{label}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                _run_cli(
                    [
                        "forecast",
                        "--host",
                        "l96",
                        "--init",
                        str(synth_dir / "analyses.zarr"),
                        "--steps",
                        str(plan.forecast_steps),
                        "--members",
                        str(members),
                        "--service",
                        server.url,
                        "--model",
                        MODEL,
                        "--out",
                        str(store),
                        "--no-progress",
                    ],
                    env={"MECS_API_KEY": server.key},
                )
                figures[label] = _forecast_figures(store)
                figures[label]["served_versions"] = _served_versions(store)
            figures["cycles"] = _cycle_starts(server, bench, train_end)
            text = server.metrics()
            figures["requests_total"] = _metric_total(text, "mecs_http_requests_total")
            figures["infer_requests"] = _metric_total(text, "mecs_inference_requests_total")
        finally:
            server.stop()
        service_json.write_text(json.dumps(figures, indent=1) + "\n")

    stages.run(
        "mecs serve + coupled forecasts through HTTP (mecs forecast)",
        service_json,
        serve_and_forecast,
    )

    monitor_json = out / "monitoring.json"

    def monitoring() -> None:
        from correction.evaluation.monitoring import predicted_reduction

        served = Corrector.load(repo, MODEL)  # production: what the service answered with
        _run_cli(
            [
                "monitor",
                "--records",
                str(out / "records"),
                "--name",
                MODEL,
                "--analyses",
                str(synth_dir),
                "--host",
                "l96",
                "--out",
                str(monitor_json.with_suffix(".partial")),
                "--textfile",
                str(out / "monitoring.prom"),
            ]
        )
        doc = json.loads(monitor_json.with_suffix(".partial").read_text())
        # predicted: the validation split (before the monitored period); and the monitored
        # period offline (the test split), which the served path must reproduce
        doc["predicted"] = {
            "version": int(served.version),
            "store": str(inc),
            "split": "val",
            "fields": predicted_reduction(served, inc, "val"),
            "same_period_offline": predicted_reduction(served, inc, "test"),
        }
        monitor_json.write_text(json.dumps(doc, indent=1) + "\n")
        monitor_json.with_suffix(".partial").unlink()
        for f, p in doc["predicted"]["fields"].items():
            print(
                f"    predicted by the increment store's validation split: {f} "
                f"{p['increment_reduction']:.4f} +- {p['spread']:.4f}"
            )

    stages.run("live skill monitoring (mecs monitor)", monitor_json, monitoring)

    metrics_path = eval_dir / "metrics.json"

    def evaluation() -> None:
        offline_c, online_c = Corrector.load(repo, MODEL, 1), Corrector.load(repo, MODEL, 2)
        metrics = evaluate(
            bench,
            {"offline": offline_c, "online": online_c},
            poly=fit_polynomial(inc),
            free_run=plan.free_run,
            keep_trajectories=True,
        )
        metrics["models"] = {
            "offline": {"name": MODEL, "version": 1},
            "online": {"name": MODEL, "version": 2},
        }
        write_plots(metrics, eval_dir)
        metrics_path.write_text(json.dumps(clean_for_json(metrics), indent=1) + "\n")

    stages.run("evaluation (mecs evaluate)", metrics_path, evaluation)

    report = out / "report.md"
    stages.run("report", out / ".never", lambda: write_report(out, plan, cfg, stages.timings))
    total = time.perf_counter() - stages.t0
    print(f"[demo] finished in {total:.1f} s; the report is {report}")
    return 0


def _cycle_starts(server: ServiceProcess, bench: Any, train_end: int) -> int:
    """A cycling forecast system's first step of every held-out cycle: each analysis
    sent with its ``valid_time``, so the recorded answers can be scored later."""
    import numpy as np

    from service.client import CorrectionClient

    times = np.asarray(bench.times)[train_end:-1]
    states = np.asarray(bench.analyses)[train_end:-1]
    with CorrectionClient(server.url, MODEL, api_key=server.key) as client:
        for t, x in zip(times, states, strict=True):
            client.infer(x[None], valid_time=float(t))
    return int(len(times))


def _served_versions(store: Path) -> list[int]:
    from correction.storage import open_zarr

    ds = open_zarr(store)
    return sorted({int(v) for v in ds["model_version"].values if v >= 0})


def _forecast_figures(store: Path) -> dict[str, Any]:
    from correction.storage import open_zarr

    ds = open_zarr(store)
    keys = [k for k in ds.attrs if "latency" in k or "degraded" in k or k == "members"]
    return {k: ds.attrs[k] for k in keys}
