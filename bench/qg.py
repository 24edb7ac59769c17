"""The 2-D benchmark's results table: none, Smagorinsky, offline and every online mode.

For each preset (``qg-eddy``, ``qg-jet``) and seed this runs the chain with the
real commands (``mecs increments``, ``pretrain``, ``emulator``, ``finetune``) and
evaluates every correction against the coarse-grained truth:

- forecasts from the test period's analyses: RMSE and ACC by lead and layer;
- free runs from test-period analyses (``--free-days``): stability, KE and
  enstrophy spectral errors, energy terms, normalised Wasserstein distances to the
  truth's distribution (Ross et al. 2023), and their similarity to the truth
  relative to the uncorrected host (``1 - d_model / d_none``).

It writes ``bench/results/qg.json`` (every figure, per seed and the mean and spread
over seeds, wall times of each stage) and ``bench/results/qg.md`` (the table), and
checks the issue's two findings: whether offline training is unstable or drifts
and an online mode without host gradients fixes it or cuts the distributional
distance by 30 %, and whether the emulator-gradient modes recover 80 % of what
the ``differentiable`` oracle gains over ``one-step`` (in a-posteriori validation
loss). Usage: ``python bench/qg.py [--quick] [--presets qg-eddy,qg-jet]
[--seeds 0,1,2] [--duration HOURS] [--free-days DAYS] [--iterations N]
[--modes unrolled --unroll 16 --tag u16]``. ``--modes`` runs some of the online
modes only (an experiment, not the table: the findings need every mode); ``--tag``
names its files apart from the table's; ``--pretrained-from TAG`` starts from that
tagged run's offline network instead of pretraining one; ``--coarse-cutoff K`` (or
``filter``) coarse-grains otherwise than the preset (stores are named by it, and a cut
store derives its truth from the filtered store's when that exists). Generated data
are kept under ``bench/results/data/`` and reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
# the project first, and not bench/ itself: bench/service.py must not shadow the
# service package when the mecs commands import it
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from bench.common import DATA, RESULTS  # noqa: E402

PER_SEED = RESULTS / "qg"
MODES = ("one-step", "unrolled", "emulator", "hybrid", "differentiable")
#: the table's emulator (states, epochs, host steps of its states), kept in ``emulator/``
EMULATOR = (3000, 12, 3)


def _tagged(name: str, tag: str) -> str:
    """``name-tag``: an experiment's files and repositories, apart from the table's."""
    return f"{name}-{tag}" if tag else name


def _cut(preset: str, args) -> str:
    """The coarse-graining in result file names: ``""`` for the preset's own cut,
    ``-filter`` for the host filter (every table before the cut), ``-kK`` otherwise;
    so a run never overwrites results of another coarse-graining."""
    from data_pipeline.qg import load_qg_config

    cut = args.coarse_cutoff
    if cut is None or cut == load_qg_config(preset, quick=args.quick).coarse_cutoff:
        return ""
    return "-filter" if cut == "filter" else f"-k{cut:g}"


def _cli(argv: list[str]) -> None:
    from mecs.cli import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"mecs {' '.join(argv[:1])} failed ({code})")


def _same_but_the_cut(base: Path, cfg) -> bool:
    """Whether ``base`` holds a filtered store of ``cfg`` but for its coarse-graining."""
    path = base / "bench" / "config.json"
    if not path.exists():
        return False
    theirs = json.loads(path.read_text())["config"]
    ours = cfg.to_dict()
    same = {k: v for k, v in theirs.items() if k != "coarse_cutoff"} == {
        k: v for k, v in ours.items() if k != "coarse_cutoff"
    } and theirs.get("coarse_cutoff") is None
    if not same:
        print(f"truth: {base.name} is not this config's filtered store; running the truth")
    return same


def prepare(preset: str, seed: int, args, **overrides) -> tuple[Path, object, dict]:
    """Synth + increments for one preset and seed, cached; wall times of both.

    ``overrides`` are further config values (``bench/sift.py`` shortens the truth's
    spin-up); they are part of the cache key.
    """
    from data_pipeline import build_increments
    from data_pipeline.qg import QGBenchmark, load_qg_config
    from data_pipeline.qg_stores import generate_qg

    cut = getattr(args, "coarse_cutoff", None)  # "filter", a wavenumber or the preset's
    if cut is not None:
        overrides = {**overrides, "coarse_cutoff": cut}

    def store(overrides: dict) -> tuple[Path, object]:
        cfg = load_qg_config(
            preset, quick=args.quick, seed=seed, duration=args.duration, **overrides
        )
        extra = "".join(f"-{k}{v:g}" for k, v in sorted(overrides.items()) if k != "coarse_cutoff")
        k = "filter" if cfg.coarse_cutoff is None else f"k{cfg.coarse_cutoff:g}"
        quick = "-quick" if args.quick else ""
        return DATA / f"{preset}{quick}-d{cfg.duration:g}{extra}-{k}-seed{seed}", cfg

    root, cfg = store(overrides)
    times = {}
    if not (root / "bench" / "config.json").exists():
        t0 = time.perf_counter()
        # a cut store derives its truth from the filtered store's, when that exists
        base = store({**overrides, "coarse_cutoff": "filter"})[0]
        truth = None
        if cfg.coarse_cutoff is not None and _same_but_the_cut(base, cfg):
            import xarray as xr

            with xr.open_zarr(base / "bench" / "truth.zarr") as ds:
                truth = QGBenchmark(cfg).recut(ds["q"].values)
            print(f"truth: {base.name}'s, cut at {cfg.coarse_cutoff:g}", flush=True)
        generate_qg(cfg, root / "bench", overwrite=True, progress=args.progress, truth=truth)
        times["synth_s"] = round(time.perf_counter() - t0, 1)
    if not (root / "inc.zarr").exists():
        t0 = time.perf_counter()
        build_increments(
            root / "bench" / "analyses.zarr",
            root / "bench" / "forecasts_archive.zarr",
            cfg.obs_interval,
            root / "inc.zarr",
            split=cfg.increment_split(),
        )
        times["increments_s"] = round(time.perf_counter() - t0, 1)
    return root, cfg, times


def train(root: Path, args) -> dict:
    """Offline pretraining, the emulator, and every fine-tuning mode (version 2 on)."""
    import shutil

    repo = root / _tagged(f"models-it{args.iterations}", args.tag)
    times = {}
    if repo.exists():
        shutil.rmtree(repo)
    progress = [] if args.progress else ["--no-progress"]
    if args.pretrained_from:  # the same offline network as another run's: online modes compare
        src = root / _tagged(f"models-it{args.iterations}", args.pretrained_from) / "qg" / "1"
        if not (src / "config.json").exists():
            raise SystemExit(f"--pretrained-from {args.pretrained_from}: no {src}")
        shutil.copytree(src, repo / "qg" / "1")
    else:
        t0 = time.perf_counter()
        _cli(
            [
                "pretrain",
                "--data",
                str(root / "inc.zarr"),
                "--repository",
                str(repo),
                "--name",
                "qg",
                "--network",
                "stencil-cnn",
                "--max-epochs",
                str(args.epochs),
                *progress,
            ]
        )
        times["pretrain_s"] = round(time.perf_counter() - t0, 1)
    settings = (args.emulator_states, args.emulator_epochs, args.emulator_rollout)
    # the table's emulator keeps its old place; another one is kept apart by its settings
    emu = root / _tagged(
        "emulator", "" if settings == EMULATOR else "s{}-e{}-r{}".format(*settings)
    )
    host = ["--host", "torch:qg", "--data", str(root / "bench"), *progress]
    if not (emu / "config.json").exists():
        cfg = emu.with_suffix(".json")
        cfg.write_text(
            json.dumps(
                {
                    "network": "stencil-cnn",
                    "params": {"hidden": 32, "kernel": 5},
                    "n_states": args.emulator_states,
                    "epochs": args.emulator_epochs,
                    "rollout_steps": args.emulator_rollout,
                }
            )
        )
        t0 = time.perf_counter()
        _cli(["emulator", *host, "--out", str(emu), "--config", str(cfg)])
        times["emulator_s"] = round(time.perf_counter() - t0, 1)
    for mode in args.modes:
        t0 = time.perf_counter()
        _cli(
            [
                "finetune",
                "--mode",
                mode,
                *host,
                "--repository",
                str(repo),
                "--name",
                "qg",
                "--from",
                "1",
                "--emulator",
                str(emu),
                "--iterations",
                str(args.iterations),
                "--unroll",
                str(args.unroll),
                "--batch-size",
                "8",
            ]
        )
        times[f"finetune_{mode}_s"] = round(time.perf_counter() - t0, 1)
    return {"repository": repo, "times": times}


def corrections(repo: Path, host, caps: tuple[float, ...] = ()) -> dict:
    from correction import artifacts
    from correction.corrections import ZeroCorrection
    from correction.guardrails import GuardedCorrection
    from correction.inference import Corrector
    from correction.qg_closures import Smagorinsky

    out = {"none": ZeroCorrection(), "smagorinsky": Smagorinsky(host)}
    for v in artifacts.list_versions(repo, "qg"):
        cfg = artifacts.read_config(repo / "qg" / str(v))
        label = "offline" if v == 1 else cfg["training"]["mode"]
        out[label] = GuardedCorrection(Corrector.load(repo, "qg", v), cap_std=None)
    # the same networks behind the service's magnitude cap (mean +/- k std of the
    # training increments, per layer): does a tighter guard keep free runs stable?
    for k in caps:
        for v in artifacts.list_versions(repo, "qg"):
            cfg = artifacts.read_config(repo / "qg" / str(v))
            label = "offline" if v == 1 else cfg["training"]["mode"]
            out[f"{label} cap{k:g}"] = GuardedCorrection(Corrector.load(repo, "qg", v), cap_std=k)
    return out


def evaluate(root: Path, cfg, repo: Path, args) -> dict:
    from correction import artifacts
    from correction.evaluation.qg_experiment import evaluate_corrections
    from data_pipeline.qg import QGBenchmark

    host = QGBenchmark(cfg).host()
    results = evaluate_corrections(
        root / "bench",
        cfg,
        corrections(repo, host, args.caps),
        free_days=args.free_days,
        free_members=args.free_members,
        forecast_inits=args.forecast_inits,
    )
    for label, row in results.items():
        if label.startswith("_") or label in ("none", "smagorinsky"):
            continue
        base = label.split(" cap")[0]
        v = 1 if base == "offline" else 2 + args.modes.index(base)
        metrics = artifacts.read_config(repo / "qg" / str(v)).get("metrics") or {}
        row["val_loss_a_posteriori"] = metrics.get("val_loss_a_posteriori")
    results.pop("_truth")
    return results


def findings(per_seed: list[dict]) -> dict:
    """The issue's two checks, on the means over seeds."""

    def mean(label: str, key: str) -> float | None:
        vals = [r[label].get(key) for r in per_seed if r.get(label, {}).get(key) is not None]
        return float(np.mean(vals)) if vals else None

    def dist(label: str) -> float | None:
        vals = [r[label]["distribution"]["mean"] for r in per_seed if "distribution" in r[label]]
        return float(np.mean(vals)) if len(vals) == len(per_seed) else None

    offline_unstable = any(not r["offline"]["free_run"]["stable"] for r in per_seed)
    d_off = dist("offline")
    fixes = {}
    for mode in ("unrolled", "emulator", "hybrid"):
        stable = all(r[mode]["free_run"]["stable"] for r in per_seed)
        d = dist(mode)
        fixes[mode] = {
            "stable_in_every_seed": stable,
            "distribution": d,
            "reduction_vs_offline": None if (d is None or not d_off) else 1 - d / d_off,
        }
    one, oracle = (
        mean("one-step", "val_loss_a_posteriori"),
        mean("differentiable", "val_loss_a_posteriori"),
    )
    recovery = {}
    for mode in ("emulator", "hybrid"):
        v = mean(mode, "val_loss_a_posteriori")
        gain = None if None in (one, oracle) else one - oracle
        recovery[mode] = None if (v is None or not gain) else (one - v) / gain
    return {
        "offline_unstable_or_drifting": offline_unstable,
        "offline_distribution": d_off,
        "online_without_host_gradients": fixes,
        "recovery_of_the_oracle_gain": recovery,
    }


def table(report: dict) -> str:
    lines = []
    for preset, res in report["presets"].items():
        lines.append(f"### {preset} ({len(res['seeds'])} seeds: mean, spread over seeds)\n")
        lines.append(
            "| correction | RMSE q1 5 d | ACC q1 5 d | free run | KE spectrum err | "
            "energy flux err | correction energy err | distribution dist. | similarity | "
            "val loss |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        labels = list(
            dict.fromkeys(k for s in res["seeds"] for k, v in s.items() if "free_run" in v)
        )
        for label in labels:
            rows = [s[label] for s in res["seeds"] if label in s]

            def stat(get, rows=rows):
                vals = [get(r) for r in rows]
                vals = [v for v in vals if v is not None]
                if not vals:
                    return "-"
                return f"{np.mean(vals):.3g} ± {np.std(vals):.2g}"

            status = ", ".join(sorted({r["free_run"]["status"] for r in rows}))
            seeds_note = "" if len(rows) == len(res["seeds"]) else f" ({len(rows)} seeds)"
            lines.append(
                f"| {label}{seeds_note} | {stat(lambda r: (r.get('rmse_120h') or [None])[0])} | "
                f"{stat(lambda r: (r.get('acc_120h') or [None])[0])} | {status} | "
                f"{stat(lambda r: r.get('ke_spectral_error'))} | "
                f"{stat(lambda r: r.get('energy_flux_error'))} | "
                f"{stat(lambda r: r.get('correction_energy_error'))} | "
                f"{stat(lambda r: r.get('distribution', {}).get('mean'))} | "
                f"{stat(lambda r: r.get('similarity_to_truth'))} | "
                f"{stat(lambda r: r.get('val_loss_a_posteriori'))} |"
            )
        lines.append("")
        if "findings" in res:
            lines.append(f"Findings: `{json.dumps(res['findings'])}`\n")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="qg-eddy,qg-jet")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--duration", type=float, default=None, help="stored hours (default: preset)")
    p.add_argument("--free-days", type=float, default=180.0)
    p.add_argument("--free-members", type=int, default=2)
    p.add_argument("--forecast-inits", type=int, default=8)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--unroll", type=int, default=4)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--emulator-states", type=int, default=EMULATOR[0])
    p.add_argument("--emulator-epochs", type=int, default=EMULATOR[1])
    p.add_argument(
        "--emulator-rollout", type=int, default=EMULATOR[2], help="host steps of its states"
    )
    p.add_argument(
        "--coarse-cutoff",
        default="",
        help="K: a sharp cut at this wavenumber; 'filter': the host filter (default: the preset's)",
    )
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--caps", default="3", help="extra rows: each network behind a cap of k stds (comma list)"
    )
    p.add_argument(
        "--assemble",
        action="store_true",
        help="run nothing: build the table from the per-seed files under bench/results/qg/",
    )
    p.add_argument("--modes", default=",".join(MODES), help="online modes to fine-tune")
    p.add_argument("--tag", default="", help="suffix of this run's files (an experiment)")
    p.add_argument(
        "--pretrained-from",
        default="",
        help="TAG: version 1 (offline) copied from that tagged run's repository, not retrained",
    )
    p.add_argument("--out", default=None, help="default bench/results/qg[-TAG].json")
    args = p.parse_args()
    args.modes = tuple(m for m in args.modes.split(",") if m)
    if unknown := set(args.modes) - set(MODES):
        p.error(f"--modes: unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.coarse_cutoff in ("", "filter"):
        args.coarse_cutoff = args.coarse_cutoff or None
    else:
        try:
            args.coarse_cutoff = float(args.coarse_cutoff)
        except ValueError:
            p.error(f"--coarse-cutoff: a wavenumber or 'filter', not {args.coarse_cutoff!r}")
    cut = _cut(args.presets.split(",")[0], args)
    args.out = args.out or str(RESULTS / f"{_tagged('qg' + cut, args.tag)}.json")
    args.caps = tuple(float(c) for c in args.caps.split(",") if c)
    torch.set_num_threads(1)
    report: dict = {"settings": vars(args), "presets": {}}
    for preset in args.presets.split(","):
        seeds = []
        for seed in (int(s) for s in args.seeds.split(",")):
            stem = _tagged(
                f"{preset}{'-quick' if args.quick else ''}{_cut(preset, args)}", args.tag
            )
            per_seed = PER_SEED / f"{stem}-seed{seed}.json"
            if args.assemble:
                seeds.append(json.loads(per_seed.read_text())["result"])
                continue
            print(f"{preset} seed {seed}", flush=True)
            root, cfg, times = prepare(preset, seed, args)
            trained = train(root, args)
            t0 = time.perf_counter()
            res = evaluate(root, cfg, trained["repository"], args)
            res["wall_times"] = {
                **times,
                **trained["times"],
                "evaluate_s": round(time.perf_counter() - t0, 1),
            }
            seeds.append(res)
            PER_SEED.mkdir(parents=True, exist_ok=True)
            settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "presets", "out")}
            settings["coarse_cutoff"] = cfg.coarse_cutoff  # what the store was cut with
            per_seed.write_text(
                json.dumps({"settings": settings, "result": res}, indent=1, default=str) + "\n"
            )
            Path(args.out).write_text(
                json.dumps(report | {"partial": [preset, seed, res]}, indent=1, default=str)
            )
        clean = [{k: v for k, v in s.items() if k != "wall_times"} for s in seeds]
        report["presets"][preset] = {
            "seeds": clean,
            "wall_times": [s["wall_times"] for s in seeds],
        }
        if args.modes == MODES:  # the checks compare every mode
            report["presets"][preset]["findings"] = findings(clean)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    Path(args.out).with_suffix(".md").write_text(table(report))
    print(table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
