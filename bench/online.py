"""The six fine-tuning modes compared, from the same offline model, on both presets.

For each preset (noisy-truth analyses, sigma 0.1, 1000 MTU) and each seed: pretrain
the offline model, fine-tune it in every mode (same iterations, batch, unroll and
learning rate; ``sip`` gets a quarter of the iterations on windows of 4 intervals,
its Gauss-Newton Jacobians being the costly part), then
evaluate all of them together: valid time, RMSE at leads 0.2 and 1.0, free-run
stability and climate error, wall time. Writes ``bench/results/online.json``,
``online.md`` (the table docs/results.md quotes) and ``online.png``.

    python bench/online.py [--presets l96-2s l96-2s-c4] [--seeds 0 1 2] [--iterations 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, RESULTS, prepare, summary, write  # noqa: E402

from correction.evaluation import Benchmark, evaluate, fit_polynomial  # noqa: E402
from correction.inference import Corrector  # noqa: E402
from correction.training.emulator import train_emulator  # noqa: E402
from correction.training.finetune import MODES, FinetuneConfig, finetune  # noqa: E402
from correction.training.pretrain import PretrainConfig, pretrain  # noqa: E402
from data_pipeline.benchmarks import L96Benchmark  # noqa: E402

LABELS = ("none", "poly3", "offline", *MODES, "limit")


def run_preset(
    preset: str,
    seeds: list[int],
    iterations: int,
    free_run: float,
    modes: list[str],
    analysis: str = "noisy-truth",
) -> dict:
    synth, inc, cfg = prepare(preset, analysis)
    bench = Benchmark.open(synth)
    poly = fit_polynomial(inc)
    train_end = int(np.sum(bench.times < bench.test_start))
    host, layout = L96Benchmark(cfg).host(), L96Benchmark(cfg).layout()
    work = DATA / f"online-{preset}-{analysis}"
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    _, emu_metrics = train_emulator(
        host, "l96", bench.analyses[:train_end], layout, work / "emulator", progress=False
    )
    emu_seconds = time.perf_counter() - t
    print(f"{preset}: emulator {emu_metrics} in {emu_seconds:.0f} s", flush=True)
    runs = []
    for seed in seeds:
        repo = work / f"seed{seed}"
        # the offline network that suits the analyses (bench/offline.py)
        net = {"network": "stencil-cnn", "params": {"hidden": 64, "depth": 3, "kernel": 5}}
        pcfg = PretrainConfig.from_dict({**(net if analysis == "letkf" else {}), "seed": seed})
        pretrain(inc, repo, "offline", pcfg, progress=False)
        correctors = {"offline": Corrector.load(repo, "offline")}
        seconds = {}
        for mode in modes:
            shutil.copytree(repo / "offline", repo / mode)  # each mode starts from version 1
            ft = FinetuneConfig(mode=mode, iterations=iterations, seed=seed)
            if mode == "sip":  # Jacobians over 10 intervals cost too much here
                ft = dataclasses.replace(
                    ft, iterations=max(iterations // 4, 1), unroll=4, batch_size=16
                )
            t = time.perf_counter()
            finetune(
                repo,
                mode,
                bench.analyses,
                host,
                ft,
                5,
                train_end,
                from_version=1,
                emulator_path=work / "emulator",
                torch_host=host if mode == "differentiable" else None,
                progress=False,
            )
            seconds[mode] = time.perf_counter() - t
            correctors[mode] = Corrector.load(repo, mode)
        m = evaluate(bench, correctors, poly=poly, free_run=free_run)
        f, fr = m["forecasts"], m["free_run"]
        run = {
            "seed": seed,
            "valid_time": {k: f[k]["valid_time"] for k in f},
            "gap_closed": {k: f[k]["gap_closed"] for k in f},
            "rmse_0.2": {k: f[k]["rmse_at"]["0.2"] for k in f},
            "rmse_1.0": {k: f[k]["rmse_at"]["1.0"] for k in f},
            "free_run": {
                k: {
                    x: fr[k][x] for x in ("bounded", "mean_rel_err", "std_rel_err", "pdf_hellinger")
                }
                for k in fr
                if k not in ("truth", "bins", "length")
            },
            "wall_seconds": seconds,
        }
        print(
            f"{preset} seed {seed}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in run["valid_time"].items()),
            flush=True,
        )
        runs.append(run)
    labels = [k for k in LABELS if k in runs[0]["valid_time"]]
    agg = {}
    for k in labels:
        agg[k] = {
            "valid_time": summary([r["valid_time"][k] for r in runs]),
            "gap_closed": summary([r["gap_closed"][k] for r in runs]),
            "rmse_0.2": summary([r["rmse_0.2"][k] for r in runs]),
            "rmse_1.0": summary([r["rmse_1.0"][k] for r in runs]),
        }
        if k in runs[0]["free_run"]:
            agg[k]["free_run_bounded"] = sum(r["free_run"][k]["bounded"] for r in runs)
            agg[k]["std_rel_err"] = summary([r["free_run"][k]["std_rel_err"] for r in runs])
            agg[k]["pdf_hellinger"] = summary([r["free_run"][k]["pdf_hellinger"] for r in runs])
        if k in runs[0]["wall_seconds"]:
            agg[k]["wall_seconds"] = summary([r["wall_seconds"][k] for r in runs])
    return {"emulator": emu_metrics, "emulator_seconds": emu_seconds, "runs": runs, "summary": agg}


def _ms(a: dict, key: str, d: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` of one aggregated figure, or blank when absent."""
    if key not in a:
        return ""
    return f"{scale * a[key]['mean']:.{d}f} ± {scale * a[key]['std']:.{d}f}"


def markdown(results: dict, n_seeds: int, free_run: float, analysis: str = "noisy-truth") -> str:
    lines = []
    for preset, res in results.items():
        s = res["summary"]
        lines += [
            f"**{preset}** ({analysis} analyses, sigma 0.1; mean ± std over {n_seeds} seeds; "
            f"free runs of {free_run:g} MTU)",
            "",
            "| mode | valid time | gap closed | RMSE@0.2 | RMSE@1.0 | bounded | std err | "
            "PDF Hellinger | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for k, a in s.items():
            bounded = f"{a['free_run_bounded']}/{n_seeds}" if "free_run_bounded" in a else ""
            lines.append(
                f"| {k} | {_ms(a, 'valid_time', 3)} | {_ms(a, 'gap_closed')} | "
                f"{_ms(a, 'rmse_0.2', 3)} | {_ms(a, 'rmse_1.0', 3)} | {bounded} | "
                f"{_ms(a, 'std_rel_err', 1, 100)}{' %' if 'std_rel_err' in a else ''} | "
                f"{_ms(a, 'pdf_hellinger', 3)} | "
                f"{_ms(a, 'wall_seconds', 0)} |"
            )
        lines.append("")
        rec = recovery(s)
        if rec:
            lines += [
                "Share of the oracle's valid-time gain over `one-step` (differentiable minus "
                "one-step) that each emulator-gradient mode recovers, from the means: "
                + ", ".join(f"`{k}` {v:.0%}" for k, v in rec.items()),
                "",
            ]
    return "\n".join(lines)


def recovery(summary_: dict) -> dict[str, float]:
    """(mode - one-step) / (differentiable - one-step) of the mean valid times.

    The acceptance measure for emulator gradients; empty when the oracle does not
    beat ``one-step`` (the ratio means nothing then).
    """
    vt = {k: a["valid_time"]["mean"] for k, a in summary_.items()}
    if not {"one-step", "differentiable"} <= vt.keys():
        return {}
    gain = vt["differentiable"] - vt["one-step"]
    if gain <= 0:
        return {}
    return {k: (vt[k] - vt["one-step"]) / gain for k in ("emulator", "hybrid") if k in vt}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    presets = list(results)
    labels = list(results[presets[0]]["summary"])
    width = 0.8 / len(presets)
    for i, preset in enumerate(presets):
        s = results[preset]["summary"]
        means = [s[k]["valid_time"]["mean"] for k in labels]
        stds = [s[k]["valid_time"]["std"] for k in labels]
        ax.bar(np.arange(len(labels)) + i * width, means, width, yerr=stds, label=preset, capsize=2)
    ax.set_xticks(np.arange(len(labels)) + width * (len(presets) - 1) / 2, labels, rotation=30)
    ax.set(ylabel="valid time (MTU)", title="Valid time by training mode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["l96-2s", "l96-2s-c4"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--free-run", type=float, default=500.0)
    parser.add_argument("--analysis", default="noisy-truth", choices=["noisy-truth", "letkf"])
    parser.add_argument("--name", help="results name (default: online or online-ANALYSIS)")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="NAME",
        help="combine earlier results (one per preset, e.g. run in parallel) "
        "into --name instead of running",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.merge:
        parts = [json.loads((RESULTS / f"{m}.json").read_text()) for m in args.merge]
        keys = ("analysis", "seeds", "iterations", "free_run")
        setups = {
            tuple(str(p.get(k, "noisy-truth" if k == "analysis" else None)) for k in keys)
            for p in parts
        }
        if len(setups) != 1:
            raise SystemExit(f"--merge: the results differ in {', '.join(keys)}: {setups}")
        args.analysis = parts[0].get("analysis", "noisy-truth")
        args.seeds, args.iterations = parts[0]["seeds"], parts[0]["iterations"]
        args.free_run = parts[0].get("free_run", args.free_run)
        results = {k: v for p in parts for k, v in p["results"].items()}
    else:
        results = {
            p: run_preset(p, args.seeds, args.iterations, args.free_run, args.modes, args.analysis)
            for p in args.presets
        }
    name = args.name or ("online" if args.analysis == "noisy-truth" else f"online-{args.analysis}")
    write(
        name,
        {
            "analysis": args.analysis,
            "iterations": args.iterations,
            "seeds": args.seeds,
            "free_run": args.free_run,
            "results": results,
        },
    )
    table = markdown(results, len(args.seeds), args.free_run, args.analysis)
    (RESULTS / f"{name}.md").write_text(table)
    plot(results, RESULTS / f"{name}.png")
    print(table)


if __name__ == "__main__":
    main()
