"""``mecs monitor``: score the corrections a recording service returned, against analyses.

Reads ``<records>/<name>/*.nc`` (written by ``mecs serve`` with ``record_dir``),
matches each sample's ``valid_time`` with the analyses, and reports the increment
reduction by version and field (:mod:`correction.evaluation.monitoring`), the
out-of-distribution rate, and a flag for every field below ``--threshold``. The
figures go to stdout, to ``--out`` (JSON) and as Prometheus gauges: written to
``--textfile`` (for node-exporter's textfile collector) or served on ``--port``,
re-scored every ``--every`` seconds (the compose monitoring profile runs it so).
Exit status 4 when a field is flagged (a one-shot run in a cron job can alert).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mecs.cli import UsageError

from ._common import add_host_options, make_named_host

EXIT_ALERT = 4


def _gauges(registry):
    from prometheus_client import Gauge

    return {
        "reduction": Gauge(
            "mecs_monitor_increment_reduction",
            "share of the increment (analysis minus forecast) the served corrections removed",
            ["model", "version", "stage", "field"],
            registry=registry,
        ),
        "alert": Gauge(
            "mecs_monitor_skill_alert",
            "1 when a field's increment reduction is below the monitor's threshold",
            ["model", "version", "field"],
            registry=registry,
        ),
        "scored": Gauge(
            "mecs_monitor_samples_scored",
            "recorded samples matched with analyses and scored",
            ["model", "version"],
            registry=registry,
        ),
        "ood": Gauge(
            "mecs_monitor_ood_rate",
            "share of the recorded samples flagged out of distribution",
            ["model"],
            registry=registry,
        ),
        "at": Gauge(
            "mecs_monitor_last_run_timestamp_seconds",
            "when the monitor last scored the records",
            ["model"],
            registry=registry,
        ),
    }


def _export(gauges, name: str, result: dict) -> None:
    for g in gauges.values():
        g.clear()
    for version, v in result["versions"].items():
        gauges["scored"].labels(name, version).set(v["scored"])
        for field, e in v["fields"].items():
            gauges["reduction"].labels(name, version, v["stage"] or "", field).set(
                e["increment_reduction"]
            )
            gauges["alert"].labels(name, version, field).set(1 if e["alert"] else 0)
    gauges["ood"].labels(name).set(result["ood_rate"])
    gauges["at"].labels(name).set(time.time())


def _score_once(args, host, ds) -> dict:
    from correction.evaluation.monitoring import MonitorError, read_records, score_records

    try:
        records = read_records(Path(args.records) / args.name)
        return score_records(records, ds, host, threshold=args.threshold)
    except MonitorError as err:
        raise UsageError(f"mecs monitor: {err}") from None


def _report(args, result: dict) -> bool:
    flagged = False
    print(
        f"monitor: {args.name}: {result['samples']} samples recorded, "
        f"{result['samples'] - result['unmatched']} matched with analyses; "
        f"out-of-distribution rate {result['ood_rate']:.4f}"
    )
    for version, v in result["versions"].items():
        for field, e in v["fields"].items():
            mark = "  BELOW THRESHOLD" if e["alert"] else ""
            flagged |= e["alert"]
            print(
                f"monitor:   v{version} ({v['stage']}) {field}: increment reduction "
                f"{e['increment_reduction']:.4f} (RMSE {e['increment_rmse_uncorrected']:.4g} -> "
                f"{e['increment_rmse_corrected']:.4g}, {v['scored']} samples){mark}"
            )
    return flagged


def run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile

    from .promote import _open_analyses

    ds, params = _open_analyses(args.analyses, args.dims)
    host = make_named_host(args.host, params, dt=args.host_dt, timeout_s=args.host_timeout)
    registry = CollectorRegistry()
    gauges = _gauges(registry)
    if args.port is not None:
        start_http_server(args.port, addr=args.bind, registry=registry)
        print(f"monitor: gauges at http://{args.bind}:{args.port}/metrics")
    while True:
        result = _score_once(args, host, ds)
        flagged = _report(args, result)
        _export(gauges, args.name, result)
        if args.textfile:
            write_to_textfile(args.textfile, registry)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        if not args.every:
            return EXIT_ALERT if flagged else 0
        time.sleep(args.every)
        if args.reload:
            ds, _ = _open_analyses(args.analyses, args.dims)  # analyses that arrived since


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="score the corrections a recording service returned against later analyses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--records", required=True, help="the service's record_dir")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--analyses", required=True, help="analyses (mecs synth dir, zarr, netCDF)")
    p.add_argument("--dims", help="rename the analyses' dims, e.g. valid_time=time")
    add_host_options(p, required=True)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="flag a field whose increment reduction is below this (default 0: harmful)",
    )
    p.add_argument("--out", help="write the figures to this JSON file")
    p.add_argument("--textfile", help="write the Prometheus gauges to this file")
    p.add_argument("--port", type=int, help="serve the gauges on this port (/metrics)")
    p.add_argument("--bind", default="127.0.0.1", help="address for --port (default loopback)")
    p.add_argument("--every", type=float, default=0.0, help="re-score every this many seconds")
    p.add_argument(
        "--reload", action="store_true", help="re-read the analyses before each re-scoring"
    )
    p.set_defaults(func=run)
