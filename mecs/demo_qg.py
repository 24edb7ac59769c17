"""``mecs demo --preset qg-eddy`` (or ``qg-jet``): the chain on the 2-D QG benchmark.

synth (high-resolution truth coarse-grained to the host grid) -> increments on
``(lev, y, x)`` (local dask cluster) -> offline pretraining (a stencil CNN with
periodic padding) -> the emulator of the 64^2 host -> online fine-tuning (hybrid)
-> ``mecs serve`` with ``[batch, 2, ny, nx]`` states and coupled forecasts over
HTTP (a single run and an ensemble) -> evaluation against the coarse-grained truth
(the uncorrected host, Smagorinsky, offline, online: RMSE/ACC by lead, spectra,
energy, distributional distances and stability of free runs) -> ``report.md``
with the table and plots. Stages are reused when complete, as in the l96 demo.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .demo import (
    ServiceProcess,
    Stages,
    _forecast_figures,
    _run_cli,
    build_increments_stage,
    pretrain_stage,
)

MODEL = "qg"
NETWORK = {"network": "stencil-cnn", "params": {"hidden": 32, "depth": 3, "kernel": 5}}


@dataclass
class QGDemoPlan:
    quick: bool
    pretrain: dict[str, Any] = field(default_factory=dict)
    emulator: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    forecast_steps: int = 240
    members: int = 20
    free_days: float = 180.0

    @classmethod
    def make(cls, quick: bool) -> QGDemoPlan:
        if quick:
            return cls(
                quick,
                pretrain={**NETWORK, "max_epochs": 8},
                emulator={
                    "network": "stencil-cnn",
                    "params": {"hidden": 16, "kernel": 3},
                    "n_states": 400,
                    "epochs": 4,
                    "rollout_steps": 2,
                },
                finetune={
                    "mode": "hybrid",
                    "iterations": 20,
                    "unroll": 2,
                    "batch_size": 4,
                    "val_every": 10,
                },
                forecast_steps=48,
                members=8,
                free_days=20.0,
            )
        return cls(
            quick,
            pretrain={**NETWORK, "max_epochs": 30},
            emulator={
                "network": "stencil-cnn",
                "params": {"hidden": 32, "kernel": 5},
                "n_states": 3000,
                "epochs": 12,
                "rollout_steps": 3,
            },
            finetune={
                "mode": "hybrid",
                "iterations": 150,
                "unroll": 4,
                "batch_size": 8,
                "val_every": 25,
            },
        )


def run_qg_demo(
    out: Path, preset: str = "qg-eddy", quick: bool = False, fresh: bool = False
) -> int:
    import numpy as np
    import torch

    from correction.corrections import ZeroCorrection
    from correction.evaluation.qg_experiment import (
        evaluate_corrections,
        results_table,
        write_qg_plots,
    )
    from correction.guardrails import GuardedCorrection
    from correction.inference import Corrector
    from correction.qg_closures import Smagorinsky
    from correction.storage import open_zarr
    from correction.training.emulator import EmulatorConfig, train_emulator
    from correction.training.finetune import FinetuneConfig, finetune
    from data_pipeline.qg import QGBenchmark, load_qg_config
    from data_pipeline.qg_stores import generate_qg

    torch.set_num_threads(1)
    plan = QGDemoPlan.make(quick)
    out = out.absolute()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    synth_dir, inc, repo = out / "synth", out / "increments.zarr", out / "models"
    emu, fc_dir, eval_dir = out / "emulator", out / "forecasts", out / "evaluation"
    stages = Stages(out, fresh, total=8)
    cfg = load_qg_config(preset, quick=quick)
    bench = QGBenchmark(cfg)
    host, layout = bench.host(), bench.layout()

    stages.run(
        "synthetic QG benchmark (mecs synth)",
        synth_dir / "config.json",
        lambda: generate_qg(cfg, synth_dir, overwrite=True),
    )

    def increments() -> None:
        build_increments_stage(synth_dir, cfg, inc)

    stages.run("increments on (lev, y, x), local dask cluster (mecs increments)", inc, increments)

    def offline() -> None:
        pretrain_stage(inc, repo, MODEL, plan.pretrain)

    stages.run("offline pretraining (mecs pretrain)", repo / MODEL / "1" / "config.json", offline)
    ana_ds = open_zarr(synth_dir / "analyses.zarr")
    analyses = ana_ds["q"].values.astype(np.float64)
    train_end = int((ana_ds["time"].values < cfg.test_start).sum())

    def emulator() -> None:
        _, m = train_emulator(
            host,
            "qg",
            analyses[:train_end],
            layout,
            emu,
            EmulatorConfig(**plan.emulator),
            progress=False,
        )
        print(f"    one-step RMSE {m['one_step_rmse']:.3e}, 10-step {m['ten_step_rmse']:.3e}")

    stages.run("host-model emulator (mecs emulator)", emu / "config.json", emulator)

    def online() -> None:
        res = finetune(
            repo,
            MODEL,
            analyses,
            host,
            FinetuneConfig(**plan.finetune),
            cfg.steps(cfg.obs_interval, "obs_interval"),
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

    service_json = fc_dir / "service.json"

    def serve_and_forecast() -> None:
        fc_dir.mkdir(parents=True, exist_ok=True)
        server = ServiceProcess(repo, fc_dir / "serve.log")
        figures: dict[str, Any] = {"url": server.url}
        params = [a for k, v in bench.host_params().items() for a in ("--host-param", f"{k}={v}")]
        try:
            for label, members in [("single", 1), ("ensemble", plan.members)]:
                store = fc_dir / f"{label}.zarr"
                shutil.rmtree(store, ignore_errors=True)
                _run_cli(
                    [
                        "forecast",
                        "--host",
                        "torch:qg",
                        *params,
                        "--init",
                        str(synth_dir / "analyses.zarr"),
                        "--init-time",
                        str(cfg.test_start),
                        "--steps",
                        str(plan.forecast_steps),
                        "--members",
                        str(members),
                        "--perturbation",
                        f"{0.01 * float(analyses.std()):.3e}",
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
        finally:
            server.stop()
        service_json.write_text(json.dumps(figures, indent=1) + "\n")

    stages.run(
        "mecs serve + coupled forecasts through HTTP (mecs forecast)",
        service_json,
        serve_and_forecast,
    )
    metrics_path = eval_dir / "metrics.json"

    def evaluation() -> None:
        corrections = {
            "none": ZeroCorrection(),
            "smagorinsky": Smagorinsky(host),
            "offline": GuardedCorrection(Corrector.load(repo, MODEL, 1), cap_std=None),
            "online": GuardedCorrection(Corrector.load(repo, MODEL, 2), cap_std=None),
        }
        res = evaluate_corrections(
            synth_dir,
            cfg,
            corrections,
            free_days=plan.free_days,
            keep=True,
            log=lambda s: print(f"  {s}"),
        )
        write_qg_plots(res, eval_dir)
        table = results_table(res)
        clean = {
            k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
            for k, v in res.items()
            if not k.startswith("_")
        }
        clean["_truth_energy"] = res["_truth"]["energy"]
        metrics_path.write_text(json.dumps({"results": clean, "table": table}, indent=1) + "\n")

    stages.run("evaluation against the coarse-grained truth", metrics_path, evaluation)

    def report() -> None:
        metrics = json.loads(metrics_path.read_text())
        service = json.loads(service_json.read_text())
        lines = [
            "# mecs demo report: two-layer QG",
            "",
            f"Benchmark `{cfg.preset}` ({'quick' if quick else 'default'} size): truth "
            f"{cfg.truth_nx}^2 coarse-grained to the {cfg.host_nx}^2 host, analyses every "
            f"{cfg.obs_interval:g} h ({cfg.obs_noise} x layer std noise), {cfg.duration:g} h "
            f"stored, test period from {cfg.test_start:g} h.",
            "",
            "## Corrections against the coarse-grained truth",
            "",
            metrics["table"],
            "",
            "Offline is version 1, online version 2 "
            f"({plan.finetune['mode']} fine-tuning). Distances are normalised "
            "Wasserstein distances of free runs to the truth's distribution; similarity is "
            "`1 - d / d(none)`.",
            "",
            "![snapshots](evaluation/qg_snapshots.png)",
            "",
            "![spectra, PDFs, RMSE](evaluation/qg_spectra_pdfs_rmse.png)",
            "",
            "## Coupled forecasts through HTTP",
            "",
            f"`mecs serve` at {service['url']}: single run {service['single']}, ensemble "
            f"{service['ensemble']}.",
            "",
            "## Stage wall times (s)",
            "",
            *[f"- {k}: {v:.1f}" for k, v in stages.timings.items()],
        ]
        (out / "report.md").write_text("\n".join(lines) + "\n")

    stages.run("report", out / ".never", report)
    print(
        f"[demo] finished in {time.perf_counter() - stages.t0:.1f} s; the report is "
        f"{out / 'report.md'}"
    )
    return 0


__all__ = ["run_qg_demo"]
