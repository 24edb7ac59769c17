"""``mecs verify``: forecasts scored against analyses (no truth needed), metrics.json and plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from correction.evaluation import clean_for_json
    from correction.evaluation.verification import VerificationError, as_metrics, verify
    from data_pipeline.increments import InputError, open_input
    from data_pipeline.increments.base import INIT, TIME
    from data_pipeline.increments.inputs import parse_renames

    try:
        ana, _ = open_input(args.analyses, "analyses", TIME)
        renames = parse_renames(args.dims, "--dims")
        fc, _ = open_input(args.forecasts, "forecasts", INIT, renames)
        ref = None
        if args.reference:
            ref_renames = parse_renames(args.reference_dims, "--reference-dims")
            ref, _ = open_input(args.reference, "reference forecasts", INIT, ref_renames)
        end = None
        if args.climatology_end is not None:
            kind = ana[TIME].dtype.kind
            end = (
                np.datetime64(args.climatology_end) if kind == "M" else float(args.climatology_end)
            )
        fields = [v.strip() for v in args.variables.split(",")] if args.variables else None
        result = verify(fc, ana, fields=fields, reference=ref, climatology_end=end)
    except (InputError, VerificationError, ValueError) as err:
        raise UsageError(f"mecs verify: {' '.join(str(err).split())}") from None
    doc = as_metrics(result)  # the schema mecs evaluate writes, kind "analyses"
    doc["sources"] = {
        "analyses": str(args.analyses),
        "forecast": str(args.forecasts),
        "reference": str(args.reference) if args.reference else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(clean_for_json(doc), indent=1) + "\n")
    plots = _plots(result, out)
    longest = result["leads"][-1]
    for f, entry in result["fields"].items():
        rmse = np.nanmean(np.atleast_1d(entry["rmse"][-1]))
        line = f"verify: {f:>6}: RMSE at lead {longest} {rmse:.4g} {entry['units']}"
        if "rmse_vs_reference" in entry:
            ratios = np.atleast_1d(np.array(entry["rmse_vs_reference"][-1], float))
            ratios = ratios[np.isfinite(ratios)]
            if ratios.size:
                line += f"  ({ratios.mean():.3f} of the reference)"
            else:
                line += "  (no error in either: no ratio)"
        print(line)
    print(f"verify: wrote {out.resolve() / 'metrics.json'} and {plots} plots")
    return 0


def _plots(result: dict, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = 0
    leads = result["leads"]
    for f, entry in result["fields"].items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        rmse = np.array(entry["rmse"], dtype=float).reshape(len(leads), -1)
        labels = entry["levels"] or [""]
        for j, lab in enumerate(labels):
            ax.plot(range(len(leads)), rmse[:, j], marker="o", label=f"forecast {lab}".strip())
        if "reference_rmse" in entry:
            ref = np.array(entry["reference_rmse"], dtype=float).reshape(len(leads), -1)
            for j, lab in enumerate(labels):
                ax.plot(range(len(leads)), ref[:, j], ls="--", label=f"reference {lab}".strip())
        ax.set_xticks(range(len(leads)), leads, rotation=30, fontsize=7)
        ax.set_xlabel("lead")
        ax.set_ylabel(f"RMSE ({entry['units']})")
        ax.set_title(f"{f}: RMSE against analyses ({result['weighting']})", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"rmse_{f}.png", dpi=110)
        plt.close(fig)
        n += 1
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="score forecasts against analyses (RMSE, bias, ACC)")
    p.add_argument("--analyses", required=True, help="analyses: zarr, netCDF or a glob")
    p.add_argument("--forecasts", required=True, help="forecasts (init_time, lead_time, ...)")
    p.add_argument("--reference", help="reference forecasts of the same cases (uncorrected)")
    p.add_argument("--variables", help="comma-separated fields (default: all shared)")
    p.add_argument(
        "--climatology-end",
        help="analyses before this time form the climatology (default: the first init time)",
    )
    p.add_argument("--dims", help="rename the forecasts' dims, e.g. time=init_time,step=lead_time")
    p.add_argument("--reference-dims", help="the same for the reference forecasts")
    p.add_argument("--out", required=True, help="directory for metrics.json and plots")
    p.set_defaults(func=run)
