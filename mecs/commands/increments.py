"""``mecs increments``: analyses + forecasts -> increment store (+ statistics, splits)."""

from __future__ import annotations

import argparse
import sys

from data_pipeline.config import DEFAULT_SPLIT, LOCAL_WORKERS
from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    from correction.storage import OutputExistsError
    from data_pipeline.increments import InputError, build_increments

    try:
        report = build_increments(
            args.analyses,
            args.forecasts,
            args.window,
            args.out,
            variables=args.variables,
            split=args.split,
            chunk_samples=args.chunk_samples,
            scheduler=args.scheduler or "local",
            missing=args.missing,
            gap=args.gap,
            state=args.state,
            tolerance=args.tolerance,
            level_dims=args.level_dims,
            analysis_dims=args.analysis_dims,
            forecast_dims=args.dims,
            overwrite=args.overwrite,
            n_workers=args.workers,
            progress=not args.no_progress,
        )
    except (InputError, OutputExistsError) as err:
        message = " ".join(str(err).split())  # one line
        raise UsageError(f"mecs increments: {message}") from None
    print(f"increments: wrote {report.path} in {report.wall_time:.1f} s")
    for line in report.summary().splitlines():
        print(f"  {line}")
    sys.stdout.flush()
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "increments",
        help="analyses + forecasts -> increment store (+ statistics, splits)",
        description="Align analyses and forecasts on valid time and write an increment "
        "store (state, increment, target = increment / window) with normalisation "
        "statistics and time-block splits.",
    )
    p.add_argument(
        "--analyses", required=True, help="analyses: zarr store, netCDF file or glob, or fsspec URL"
    )
    p.add_argument(
        "--forecasts", required=True, help="forecast archive with dims (init_time, lead_time, ...)"
    )
    p.add_argument(
        "--window",
        required=True,
        help="lead time of the increment: a number in the data's time units, "
        "or a duration such as 6h for datetime64 times",
    )
    p.add_argument("--out", required=True, help="output store (created; must not hold data)")
    p.add_argument("--variables", help="comma-separated fields (default: every field)")
    p.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        help="fractions train:val:test of the time range, or ranges "
        "train=A:B,val=C:D,test=E:F (numbers or ISO dates, ends "
        "inclusive); default 0.7:0.15:0.15",
    )
    p.add_argument(
        "--gap",
        default=None,
        help="gap between fraction blocks (default: max(window, 1%% of the range))",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="address of a running dask scheduler (default: start a local "
        "cluster); 'sync' or 'threads' for dask's local schedulers",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=LOCAL_WORKERS,
        help="worker processes of the local cluster (default %(default)s)",
    )
    p.add_argument(
        "--chunk-samples",
        type=_positive_int,
        default=None,
        help="samples per chunk (default: up to 4096, at most 32 MiB per chunk)",
    )
    p.add_argument(
        "--missing",
        choices=["skip", "error"],
        default="skip",
        help="a missing analysis inside the analysis period: skip the sample (counted) or fail",
    )
    p.add_argument(
        "--state",
        choices=["analysis", "forecast"],
        default="analysis",
        help="state at the start of the window: the analysis or the lead-0 forecast",
    )
    p.add_argument(
        "--tolerance", default=None, help="time matching tolerance (default: window / 1000)"
    )
    p.add_argument(
        "--level-dims",
        default=None,
        help="comma-separated vertical dims (default: detected from CF attributes and usual names)",
    )
    p.add_argument(
        "--dims",
        default=None,
        metavar="NAME=NEW,...",
        help="rename the forecasts' dims and coordinates to init_time/lead_time, e.g. "
        "time=init_time,step=lead_time (IFS-style archives)",
    )
    p.add_argument(
        "--analysis-dims",
        default=None,
        metavar="NAME=NEW,...",
        help="rename the analyses' dims and coordinates, e.g. valid_time=time",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
