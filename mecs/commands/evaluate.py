"""``mecs evaluate``: forecasts, free runs, metrics.json and PNG plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    from correction.artifacts import ArtifactError
    from correction.evaluation import (
        Benchmark,
        clean_for_json,
        evaluate,
        fit_polynomial,
        write_plots,
    )
    from correction.inference import Corrector

    try:
        corrector = Corrector.load(args.repository, args.name, args.version)
        bench = Benchmark.open(args.data)
    except (ArtifactError, FileNotFoundError) as err:
        raise UsageError(f"mecs evaluate: {err}") from None
    increments = args.increments or corrector.config.get("training", {}).get("data")
    if not increments or not Path(increments).exists():
        raise UsageError(
            "mecs evaluate: the polynomial baseline needs the increment store; "
            "pass --increments STORE"
        )
    poly = fit_polynomial(increments)
    metrics = evaluate(
        bench,
        {"model": corrector},
        poly=poly,
        lead_max=args.lead_max,
        init_every=args.init_every,
        free_run=args.free_run,
        keep_trajectories=True,
    )
    metrics["model"] = {"name": corrector.name, "version": corrector.version}
    metrics["data"] = str(Path(args.data).absolute())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(metrics, out)
    (out / "metrics.json").write_text(json.dumps(clean_for_json(metrics), indent=1) + "\n")
    for label, f in metrics["forecasts"].items():
        print(
            f"evaluate: {label:>8}: valid time {f['valid_time']:.2f}  "
            f"gap closed {f['gap_closed']:.2f}"
        )
    print(f"evaluate: wrote {out.resolve() / 'metrics.json'} and {len(plots)} plots")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="forecast skill and climate of a model version")
    p.add_argument("--repository", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, default=None, help="default: the newest")
    p.add_argument("--data", required=True, help="benchmark directory from mecs synth")
    p.add_argument("--out", required=True, help="directory for metrics.json and plots")
    p.add_argument(
        "--increments",
        help="increment store for the polynomial baseline (default: the model's training data)",
    )
    p.add_argument("--lead-max", type=float, default=5.0)
    p.add_argument("--init-every", type=float, default=None)
    p.add_argument("--free-run", type=float, default=500.0, help="free-run length (MTU)")
    p.set_defaults(func=run)
