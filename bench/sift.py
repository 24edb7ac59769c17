"""Uniform against loss-prioritised (SIFT) sampling in pretraining, over seeds.

For each increment store and seed, pretrains the same network twice with the same
settings, ``--sampling uniform`` and ``--sampling sift``, and reports from the
histories: the uniform run's best validation loss; the backpropagation steps and
training seconds each run needed to reach it (SIFT: the first epoch at or below
it, or never); the final (best) validation loss of each; and, on the l96 store,
the downstream forecast skill of both models through the existing evaluation
(valid time against the truth). Writes ``bench/results/sift.json`` and ``.md``.

SIFT stays an option unless, on every store, it reaches the uniform best in at
most 70 % of the steps and 85 % of the wall time with skill no worse within the
seed spread (the issue's rule); the ``decision`` entry says which.

    python bench/sift.py [--seeds 0 1 2] [--qg-store PATH] [--max-epochs 40]

``--qg-years Y`` adds a qg-eddy increment store of ``Y`` stored years (built and
cached under ``bench/results/data``; the truth's spin-up on its 256^2 grid is cut
to ``--qg-truth-spinup`` years, the host-grid spin-up stays the preset's), or
``--qg-store PATH`` an existing one; the QG models are the network ``bench/qg.py``
pretrains (the 5-point stencil CNN). On a store built by ``--qg-years`` both models
are also scored downstream through the QG evaluation (``mecs demo --preset qg-eddy``'s):
5-day forecasts from the held-out analyses against the coarse-grained truth, behind
the service's default magnitude guard; the skill is the RMSE by lead and layer
relative to the uncorrected host's, averaged (lower is better; a forecast that blows
up scores as missing). ``--resume`` keeps the model repositories, so a killed run
continues from its checkpoints (the same weights as an uninterrupted one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# the project first, and not bench/ itself: bench/distributed.py and bench/service.py
# must not shadow the packages of those names
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from bench.common import DATA, RESULTS, prepare, summary, write  # noqa: E402
from correction.evaluation import Benchmark, evaluate  # noqa: E402
from correction.inference import Corrector  # noqa: E402
from correction.training.pretrain import PretrainConfig, pretrain  # noqa: E402

STEPS_RULE, WALL_RULE = 0.70, 0.85


def reach(history: list[dict], target: float) -> dict:
    """Steps and training seconds at the first epoch whose val loss is <= ``target``."""
    for h in history[1:]:
        if h["val_loss"] <= target * (1 + 1e-9):
            return {"epoch": h["epoch"], "steps": h["steps"], "train_wall": h["train_wall"]}
    return {"epoch": None, "steps": None, "train_wall": None}


def one_seed(
    store: Path,
    repo: Path,
    seed: int,
    base: dict,
    bench: Benchmark | None,
    sift_epochs: int | None = None,
    uniform_prev: dict | None = None,
    qg: tuple | None = None,
) -> dict:
    """Uniform and SIFT runs of one seed. ``sift_epochs``: SIFT's epoch budget (a pool
    of ``sift_pool`` batches makes one step, so ``sift_pool`` times the epochs gives
    both the same backprop steps); ``uniform_prev``: this seed's uniform run from an
    earlier report (same store and settings), reused instead of trained again;
    ``qg``: (synth dir, config) of a QG store, for the downstream skill."""
    out: dict = {"seed": seed}
    models = {}
    for sampling in ("uniform", "sift"):
        if sampling == "uniform" and uniform_prev is not None:
            out["uniform"] = uniform_prev
            models["uniform"] = SimpleNamespace(history=uniform_prev["history"])
            continue
        extra = {"max_epochs": sift_epochs} if sampling == "sift" and sift_epochs else {}
        cfg = PretrainConfig.from_dict({**base, "seed": seed, "sampling": sampling, **extra})
        t = time.perf_counter()
        res = pretrain(store, repo, f"{sampling}-seed{seed}", cfg, progress=False)
        out[sampling] = {
            "best_val_loss": res.best_val_loss,
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "total_steps": res.history[-1]["steps"],
            "wall_s": round(time.perf_counter() - t, 1),
            "history": [
                {k: h.get(k) for k in ("epoch", "val_loss", "steps", "train_wall")}
                for h in res.history
            ],
        }
        models[sampling] = res
    target = out["uniform"]["best_val_loss"]
    u, s = reach(models["uniform"].history, target), reach(models["sift"].history, target)
    out["uniform"]["to_uniform_best"], out["sift"]["to_uniform_best"] = u, s
    if s["steps"] is not None:
        out["steps_ratio"] = s["steps"] / u["steps"]
        out["wall_ratio"] = s["train_wall"] / u["train_wall"]
    else:
        out["steps_ratio"] = out["wall_ratio"] = None
    if bench is not None:
        m = evaluate(
            bench,
            {k: Corrector.load(repo, f"{k}-seed{seed}") for k in ("uniform", "sift")},
            free_run=100.0,
        )
        out["valid_time"] = {
            k: m["forecasts"][k]["valid_time"] for k in ("none", "uniform", "sift")
        }
    if qg is not None:
        out["qg_skill"] = qg_skill(repo, seed, *qg)
    return out


def qg_skill(repo: Path, seed: int, synth_dir: Path, cfg, cap_std: float = 10.0) -> dict:
    """Both models' 5-day forecasts through the QG evaluation, behind the service's
    default guard (``correction_cap_std``): RMSE by lead relative to the uncorrected
    host's, averaged over leads and layers, and whether the free run stays stable."""
    from correction.corrections import ZeroCorrection
    from correction.evaluation.qg_experiment import evaluate_corrections
    from correction.guardrails import GuardedCorrection

    corr = {"none": ZeroCorrection()}
    for k in ("uniform", "sift"):
        corr[k] = GuardedCorrection(Corrector.load(repo, f"{k}-seed{seed}"), cap_std=cap_std)
    res = evaluate_corrections(synth_dir, cfg, corr, free_days=30.0, log=lambda s: None)
    none = np.asarray(res["none"]["rmse_by_lead"])[1:]
    out: dict = {"cap_std": cap_std, "leads_h": res["_truth"]["leads_h"]}
    for k in ("none", "uniform", "sift"):
        row = res[k]
        rmse = row.get("rmse_by_lead")
        out[k] = {
            "relative_rmse": None if rmse is None else float(np.mean(np.asarray(rmse)[1:] / none)),
            "rmse_24h": row.get("rmse_24h"),
            "rmse_120h": row.get("rmse_120h"),
            "forecasts": row.get("forecasts", "ok"),
            "free_run": row["free_run"]["status"],
        }
    return out


def qg_store(years: float, truth_spinup: float) -> tuple[Path, tuple]:
    """A qg-eddy increment store of ``years`` stored years, built once and cached, and
    (synth dir, config) for its downstream skill."""

    from bench.qg import prepare as prepare_qg
    from data_pipeline.qg import HOURS_PER_YEAR

    args = SimpleNamespace(quick=False, duration=years * HOURS_PER_YEAR, progress=False)
    root, cfg, times = prepare_qg("qg-eddy", 0, args, spinup_truth_years=truth_spinup)
    if times:
        print(f"qg store: {times}", flush=True)
    return root / "inc.zarr", (root / "bench", cfg)


def no_worse(uniform: list, sift: list, higher_is_better: bool) -> bool:
    """SIFT's skill no worse than uniform's within the seed spread (the larger of the
    two standard deviations); a missing figure (a forecast that blew up) is worse
    than any."""
    if None in sift:
        return False
    if None in uniform:
        return True
    spread = max(float(np.std(uniform)), float(np.std(sift)))
    gain = float(np.mean(sift)) - float(np.mean(uniform))
    return bool(gain >= -spread if higher_is_better else gain <= spread)


def store_summary(runs: list[dict], with_skill: bool) -> dict:
    ratios_s = [r["steps_ratio"] for r in runs]
    ratios_w = [r["wall_ratio"] for r in runs]
    reached = all(v is not None for v in ratios_s)
    res: dict = {
        "reached_uniform_best_in_every_seed": reached,
        "steps_ratio": summary(ratios_s) if reached else None,
        "wall_ratio": summary(ratios_w) if reached else None,
        "best_val_loss": {
            k: summary([r[k]["best_val_loss"] for r in runs]) for k in ("uniform", "sift")
        },
    }
    ok = reached and max(ratios_s) <= STEPS_RULE and max(ratios_w) <= WALL_RULE
    if with_skill:
        vt = {k: [r["valid_time"][k] for r in runs] for k in ("none", "uniform", "sift")}
        res["valid_time"] = {k: summary(v) for k, v in vt.items()}
        res["skill_no_worse_within_spread"] = no_worse(vt["uniform"], vt["sift"], True)
        ok = ok and res["skill_no_worse_within_spread"]
    if "qg_skill" in runs[0]:  # relative RMSE: lower is better
        sk = {k: [r["qg_skill"][k]["relative_rmse"] for r in runs] for k in ("uniform", "sift")}
        res["qg_relative_rmse"] = {k: summary(v) if None not in v else None for k, v in sk.items()}
        res["skill_no_worse_within_spread"] = no_worse(sk["uniform"], sk["sift"], False)
        ok = ok and res["skill_no_worse_within_spread"]
    res["meets_the_rule"] = bool(ok)
    return res


def table(report: dict) -> str:
    lines = [
        "| store | seeds | uniform best val | SIFT best val | SIFT steps / uniform "
        "| SIFT wall / uniform | skill uniform | skill SIFT | rule met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(s):
        return "never" if s is None else f"{s['mean']:.3g} ± {s['std']:.2g}"

    for name, st in report["stores"].items():
        sm = st["summary"]
        # l96: valid time (higher is better); QG: RMSE relative to none (lower is better)
        sk = sm.get("valid_time") or sm.get("qg_relative_rmse") or {}
        unit = " (valid time)" if "valid_time" in sm else " (rel. RMSE)" if sk else ""
        lines.append(
            f"| {name} | {len(st['runs'])} | {fmt(sm['best_val_loss']['uniform'])} "
            f"| {fmt(sm['best_val_loss']['sift'])} | {fmt(sm['steps_ratio'])} "
            f"| {fmt(sm['wall_ratio'])} | {fmt(sk.get('uniform')) + unit if sk else '-'} "
            f"| {fmt(sk.get('sift')) + unit if sk else '-'} "
            f"| {'yes' if sm['meets_the_rule'] else 'no'} |"
        )
    return "\n".join(lines) + f"\n\nDecision: {report['decision']}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="l96-2s")
    p.add_argument("--analysis", default="noisy-truth")
    p.add_argument("--qg-store", default=None, help="a QG increment store to add")
    p.add_argument("--qg-years", type=float, default=None, help="build a qg-eddy store")
    p.add_argument("--qg-truth-spinup", type=float, default=0.25)
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--floor", type=float, default=0.25)
    p.add_argument("--out", default=str(RESULTS / "sift.json"))
    p.add_argument(
        "--only-qg", action="store_true", help="measure the QG store alone (no l96 store)"
    )
    p.add_argument(
        "--sift-epochs-factor",
        type=int,
        default=1,
        help="SIFT's epochs = max_epochs times this (sift_pool: the same backprop steps)",
    )
    p.add_argument("--uniform-from", help="reuse the uniform runs of this earlier report")
    p.add_argument(
        "--resume", action="store_true", help="keep the repositories: resume killed runs"
    )
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine reports of runs made side by side (one seed each) into --out",
    )
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    torch.set_num_threads(1)
    base = {"max_epochs": args.max_epochs, "sift_pool": args.pool, "sift_floor": args.floor}
    stores: list[tuple[str, Path, Benchmark | None, dict, tuple | None]] = []
    if not args.only_qg:
        synth, inc, _ = prepare(args.preset, args.analysis)
        stores.append((f"{args.preset}-{args.analysis}", inc, Benchmark.open(synth), base, None))
    qg = None
    if args.qg_years:
        store, qg = qg_store(args.qg_years, args.qg_truth_spinup)
        args.qg_store = str(store)
    if args.qg_store:
        qg_base = {**base, "network": "stencil-cnn", "params": {"hidden": 64, "kernel": 5}}
        stores.append(("qg-eddy", Path(args.qg_store), None, qg_base, qg))
    report: dict = {"settings": vars(args), "stores": {}}
    for name, store, bench, cfg, qg_eval in stores:
        # one repository per seed list: runs of other seeds may go on beside this one
        repo = DATA / f"models-sift-{name}-seeds{'-'.join(map(str, args.seeds))}"
        if not args.resume:
            shutil.rmtree(repo, ignore_errors=True)
        runs = []
        prev = {}
        if args.uniform_from:
            earlier = json.loads(Path(args.uniform_from).read_text())["stores"].get(name, {})
            prev = {r["seed"]: r["uniform"] for r in earlier.get("runs", [])}
        for seed in args.seeds:
            r = one_seed(
                store,
                repo,
                seed,
                cfg,
                bench,
                sift_epochs=args.max_epochs * args.sift_epochs_factor,
                uniform_prev=prev.get(seed),
                qg=qg_eval,
            )
            print(
                f"{name} seed {seed}: uniform best {r['uniform']['best_val_loss']:.4f} "
                f"({r['uniform']['to_uniform_best']['steps']} steps), SIFT best "
                f"{r['sift']['best_val_loss']:.4f}, steps ratio {r['steps_ratio']}, "
                f"wall ratio {r['wall_ratio']}, valid time {r.get('valid_time')}, "
                f"QG skill {r.get('qg_skill')}",
                flush=True,
            )
            runs.append(r)
        report["stores"][name] = {
            "settings": cfg,
            "runs": runs,
            "summary": store_summary(runs, bench is not None),
        }
    finish(report, args.out)


def merge(paths: list[str], out: Path) -> None:
    """One report from several (the same stores, other seeds), summaries recomputed."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    report: dict = {"settings": {"merged": paths, **parts[0]["settings"]}, "stores": {}}
    for part in parts:
        for name, st in part["stores"].items():
            entry = report["stores"].setdefault(name, {"settings": st["settings"], "runs": []})
            entry["runs"] += st["runs"]
    for st in report["stores"].values():
        st["runs"].sort(key=lambda r: r["seed"])
        st["summary"] = store_summary(st["runs"], "valid_time" in st["runs"][0])
    finish(report, str(out))


def finish(report: dict, out: str) -> None:
    every = all(s["summary"]["meets_the_rule"] for s in report["stores"].values())
    report["decision"] = (
        "SIFT meets the rule on every store measured"
        if every
        else "SIFT stays an option: the rule (<= 70 % of the steps and <= 85 % of the wall "
        "time to the uniform best, skill no worse) is not met on every store"
    )
    path = write("sift", report) if out == str(RESULTS / "sift.json") else Path(out)
    if path != RESULTS / "sift.json":
        path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
