"""``mecs promote``: verify a candidate against production and promote it only if it wins.

Exit codes: 0 promoted (or, with ``--dry-run``, would be), 3 refused (a refusal
is recorded too, without ``--dry-run``), 2 bad arguments or data. ``--rollback``
makes the version production was before the current one production again,
without scoring (a record says so).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mecs.cli import UsageError

from ._common import add_host_options, make_named_host

EXIT_REFUSED = 3

# the command-line flags of GateRule fields, and the one whose field has another name
_RULE_FLAGS = (
    "intervals",
    "leads",
    "margin",
    "tolerance",
    "free_run",
    "bound_std",
    "init_every",
    "max_inits",
)
_RULE_FIELD = {"free_run": "free_run_intervals"}


def _rule(args):
    from correction.config_files import SettingsFileError, read_settings_file
    from correction.evaluation.promotion import GateError, GateRule

    values = {}
    if args.rule:
        try:
            values.update(read_settings_file(args.rule))
        except SettingsFileError as err:
            raise UsageError(f"mecs promote: --rule: {err}") from None
    for flag in _RULE_FLAGS:
        v = getattr(args, flag, None)
        if v is None:
            continue
        key = _RULE_FIELD.get(flag, flag)
        if flag == "leads":
            try:
                v = [int(x) for x in str(v).split(",") if x.strip()]
            except ValueError:
                raise UsageError(f"mecs promote: --leads {v!r}: comma-separated integers") from None
        values[key] = v
    try:
        return GateRule.from_dict(values)
    except GateError as err:
        raise UsageError(f"mecs promote: {err}") from None


def _open_analyses(path: str, dims: str | None):
    """The analyses dataset and, for a ``mecs synth`` directory, its host parameters."""
    from data_pipeline.benchmarks import benchmark_of
    from data_pipeline.increments import InputError, open_input
    from data_pipeline.increments.base import TIME
    from data_pipeline.increments.inputs import parse_renames

    p = Path(path)
    params, source = {}, path
    if p.name == "analyses.zarr" and (p.parent / "config.json").exists():
        p = p.parent  # the analyses of a mecs synth directory: its host parameters too
    if (p / "analyses.zarr").exists():
        source = p / "analyses.zarr"
        summary = json.loads((p / "config.json").read_text())
        params = benchmark_of(summary["config"]).host_params()
    try:
        ds, _ = open_input(source, "analyses", TIME, parse_renames(dims, "--dims"))
    except InputError as err:
        raise UsageError(f"mecs promote: {' '.join(str(err).split())}") from None
    if (p / "analyses.zarr").exists() and "test_start" not in ds.attrs:
        ds.attrs["test_start"] = summary["test_start"]
    return ds, params


def _rollback(args, book, versions) -> int:
    from correction import stages

    target = args.version if args.version is not None else book.previous_production()
    current = book.production(versions)
    if target is None:
        raise UsageError(f"mecs promote: model '{args.name}' has no earlier production version")
    if target not in versions:
        raise UsageError(f"mecs promote: model '{args.name}' has no version {target}")
    if target == current:
        raise UsageError(f"mecs promote: version {target} is production already")
    if args.dry_run:
        print(f"promote: would roll back {args.name} from v{current} to v{target}")
        return 0
    with stages.editing(args.repository, args.name) as book:
        before = stages.set_production(book, target)
        book.records.append(stages.record(target, "rollback", before, reason=args.reason))
    print(f"promote: rolled back {args.name}: v{target} is production (v{before} retired)")
    return 0


def run(args: argparse.Namespace) -> int:
    from correction import artifacts, stages
    from correction.artifacts import ArtifactError
    from correction.evaluation import clean_for_json
    from correction.evaluation.promotion import GateError, decide, score
    from correction.hosts.specs import close_host
    from correction.inference import Corrector

    try:
        versions = artifacts.list_versions(args.repository, args.name)
        book = stages.read(args.repository, args.name)
    except (ArtifactError, stages.StageError) as err:
        raise UsageError(f"mecs promote: {err}") from None
    if not versions:
        raise UsageError(f"mecs promote: model '{args.name}' has no versions in {args.repository}")
    if args.rollback:
        return _rollback(args, book, versions)
    production = book.production(versions)
    if production is None:
        raise UsageError(f"mecs promote: model '{args.name}' has no production version")
    if args.version is None:
        pending = [v for v in versions if book.stage_of(v, versions) == stages.CANDIDATE]
        if not pending:
            print(f"promote: model '{args.name}' has no candidate (production is v{production})")
            return 0
        args.version = pending[-1]
    if args.version not in versions:
        raise UsageError(f"mecs promote: model '{args.name}' has no version {args.version}")
    if args.version == production:
        raise UsageError(f"mecs promote: version {args.version} is production already")
    if not args.data or not args.host:
        raise UsageError("mecs promote: scoring needs --data ANALYSES and --host SPEC")
    rule = _rule(args)
    try:
        cand = Corrector.load(args.repository, args.name, args.version)
        prod = Corrector.load(args.repository, args.name, production)
    except ArtifactError as err:
        raise UsageError(f"mecs promote: {err}") from None
    ds, params = _open_analyses(args.data, args.dims)
    host = make_named_host(
        args.host,
        params,
        state_shape=tuple(cand.state_shape),
        dt=args.host_dt,
        timeout_s=args.host_timeout,
        fields=cand.layout.channel_names(),
    )
    try:
        scores = score(cand, prod, host, ds, rule, since=args.since, runtime=args.runtime)
    except (GateError, ValueError) as err:
        raise UsageError(f"mecs promote: {' '.join(str(err).split())}") from None
    finally:
        close_host(host)
    promote, reasons = decide(scores, rule)
    verdict = "promote" if promote else "refuse"
    print(
        f"promote: {args.name} v{args.version} against production v{production} on "
        f"{scores['n_inits']} hindcasts from {scores['held_out_start']}: {verdict}"
    )
    for f, e in scores["fields"].items():
        lead_ratios = " ".join(f"{r:.3f}" for r in e["ratio_by_lead"])
        print(f"promote:   {f}: RMSE ratio by lead {lead_ratios} (mean {e['ratio']:.4f})")
    for r in reasons:
        print(f"promote:   {r}")
    doc = {
        "candidate": args.version,
        "production": production,
        "rule": rule.to_dict(),
        "data": str(Path(args.data).absolute()),
        "data_digest": scores["data_digest"],
        "scores": scores,
        "reasons": reasons,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(clean_for_json(doc), indent=1) + "\n")
    if args.dry_run:
        print("promote: --dry-run: nothing changed")
        return 0 if promote else EXIT_REFUSED
    with stages.editing(args.repository, args.name) as book:
        if book.production(versions) != production:
            print(
                "error: mecs promote: production changed while scoring; nothing done",
                file=sys.stderr,
            )
            return 1
        extra = {k: doc[k] for k in ("rule", "data", "data_digest", "reasons")}
        extra["scores"] = clean_for_json(_brief(scores))
        if promote:
            before = stages.set_production(book, args.version)
            book.records.append(stages.record(args.version, "promoted", before, **extra))
        else:
            book.stages[args.version] = stages.CANDIDATE
            book.records.append(stages.record(args.version, "refused", production, **extra))
    if promote:
        print(f"promote: v{args.version} is production; v{production} retired")
        return 0
    print(f"promote: v{args.version} stays a candidate; v{production} is still production")
    return EXIT_REFUSED


def _brief(scores: dict) -> dict:
    """What a promotion record keeps of the scores (not the init-time list)."""
    return {k: v for k, v in scores.items() if k != "init_times"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="score a candidate version against production; promote it if it wins",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repository", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, default=None, help="default: the newest candidate")
    p.add_argument("--data", help="analyses: a mecs synth directory, zarr, netCDF or a glob")
    p.add_argument("--dims", help="rename the analyses' dims, e.g. valid_time=time")
    add_host_options(p)
    p.add_argument(
        "--since",
        help="first analysis time of the held-out period (default: the store's "
        "test_start, else its newest 20 %%)",
    )
    p.add_argument("--rule", help="JSON or TOML file of gate settings (flags win)")
    p.add_argument("--intervals", type=int, help="hindcast length in analysis intervals (4)")
    p.add_argument("--leads", help="leads scored, in analysis intervals, e.g. 1,2,4 (all)")
    p.add_argument("--margin", type=float, help="mean RMSE ratio must be <= 1 - margin (0.01)")
    p.add_argument("--tolerance", type=float, help="no field's ratio above 1 + this (0.02)")
    p.add_argument("--free-run", type=int, help="free-run length in analysis intervals (200)")
    p.add_argument("--bound-std", type=float, help="free-run bound, climatological std (10)")
    p.add_argument("--init-every", type=int, help="analyses between hindcast starts (1)")
    p.add_argument("--max-inits", type=int, help="at most this many hindcasts (64)")
    p.add_argument(
        "--runtime",
        default="onnxruntime",
        choices=["onnxruntime", "torchscript", "eager"],
        help="the forward path both versions run on (default: the service's)",
    )
    p.add_argument("--out", help="write the scores and decision to this JSON file")
    p.add_argument("--dry-run", action="store_true", help="show the decision, change nothing")
    p.add_argument(
        "--rollback",
        action="store_true",
        help="make the previous production version (or --version) production again, unscored",
    )
    p.add_argument("--reason", default=None, help="why (kept in the record of a rollback)")
    p.set_defaults(func=run)
