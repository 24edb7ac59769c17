"""Offline correction skill on l96-2s (issue figures), over several training seeds.

For noisy-truth and LETKF analyses (sigma 0.1, 1000 MTU): pretrain each network
(the column MLP and a 5-point stencil CNN) with N seeds, evaluate each against
none / poly3 / limit, and report the mean and spread of the valid time, the gap
closed and the 500-MTU free-run climate.

    python bench/offline.py [--seeds 0 1 2] [--analyses noisy-truth letkf] [--free-run 500]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, prepare, summary, write  # noqa: E402

from correction.evaluation import Benchmark, evaluate, fit_polynomial  # noqa: E402
from correction.inference import Corrector  # noqa: E402
from correction.training.pretrain import PretrainConfig, pretrain  # noqa: E402

NETWORKS = {
    "column-mlp": {},
    "stencil-cnn-k5": {
        "network": "stencil-cnn",
        "params": {"hidden": 64, "depth": 3, "kernel": 5},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--analyses", nargs="+", default=["noisy-truth", "letkf"])
    parser.add_argument("--preset", default="l96-2s")
    parser.add_argument("--free-run", type=float, default=500.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for analysis, (net, net_cfg) in ((a, n) for a in args.analyses for n in NETWORKS.items()):
        synth, inc, cfg = prepare(args.preset, analysis)
        bench = Benchmark.open(synth)
        poly = fit_polynomial(inc)
        repo = DATA / f"models-offline-{args.preset}-{analysis}-{net}"
        shutil.rmtree(repo, ignore_errors=True)
        runs = []
        for seed in args.seeds:
            t = time.perf_counter()
            pcfg = PretrainConfig.from_dict({**net_cfg, "seed": seed})
            res = pretrain(inc, repo, f"seed{seed}", pcfg, progress=False)
            train_s = time.perf_counter() - t
            m = evaluate(
                bench,
                {"offline": Corrector.load(repo, f"seed{seed}")},
                poly=poly,
                free_run=args.free_run,
            )
            f, fr = m["forecasts"], m["free_run"]
            run = {
                "seed": seed,
                "train_seconds": train_s,
                "epochs": res.epochs_run,
                "valid_time": {k: v["valid_time"] for k, v in f.items()},
                "gap_closed": {k: v["gap_closed"] for k, v in f.items()},
                "rmse_at": {k: v["rmse_at"] for k, v in f.items()},
                "free_run": {
                    k: {
                        x: fr[k][x]
                        for x in (
                            "bounded",
                            "mean",
                            "std",
                            "mean_rel_err",
                            "std_rel_err",
                            "pdf_hellinger",
                        )
                    }
                    for k in ("none", "poly3", "offline")
                },
            }
            print(
                f"{analysis} {net} seed {seed}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in run["valid_time"].items())
                + f"; gap closed {run['gap_closed']['offline']:.3f}; free run mean err "
                f"{run['free_run']['offline']['mean_rel_err']:.3f} std err "
                f"{run['free_run']['offline']['std_rel_err']:.3f}",
                flush=True,
            )
            runs.append(run)
        results[f"{analysis}/{net}"] = {
            "analysis_rmse": float(((bench.analyses - bench.truth_x) ** 2).mean() ** 0.5),
            "runs": runs,
            "valid_time": {
                k: summary([r["valid_time"][k] for r in runs]) for k in runs[0]["valid_time"]
            },
            "gap_closed_offline": summary([r["gap_closed"]["offline"] for r in runs]),
            "offline_beats_poly3": sum(
                r["valid_time"]["offline"] > r["valid_time"]["poly3"] for r in runs
            ),
            "free_run_bounded": all(r["free_run"]["offline"]["bounded"] for r in runs),
            "free_run_mean_rel_err": summary(
                [r["free_run"]["offline"]["mean_rel_err"] for r in runs]
            ),
            "free_run_std_rel_err": summary(
                [r["free_run"]["offline"]["std_rel_err"] for r in runs]
            ),
        }
    write("offline", {"preset": args.preset, "free_run": args.free_run, "results": results})


if __name__ == "__main__":
    main()
