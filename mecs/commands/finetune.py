"""``mecs finetune``: online fine-tuning of a published model, in one of six modes."""

from __future__ import annotations

import argparse
import sys

from mecs.cli import UsageError

from ._common import add_host_options, report


def run(args: argparse.Namespace) -> int:
    from correction.artifacts import ArtifactError, resolve
    from correction.hosts.process import HostProcessError
    from correction.hosts.specs import close_host
    from correction.training.finetune import NEEDS_EMULATOR, FinetuneConfig, finetune
    from data_pipeline.config import ConfigError

    from ._common import load_analyses, make_named_host, settings_with_flags

    try:
        flags = ("mode", "unroll", "iterations", "seed", "lr", "batch_size")
        settings = settings_with_flags(args, flags)
        if args.curriculum:
            settings["curriculum"] = [int(v) for v in args.curriculum.split(",")]
        cfg = FinetuneConfig.from_dict(settings)
        resolve(args.repository, args.name, args.from_version)
    except (ConfigError, ValueError, ArtifactError) as err:
        raise UsageError(f"mecs finetune: {err}") from None
    args.host = args.host or "l96"
    if cfg.mode in NEEDS_EMULATOR and not args.emulator:
        raise UsageError(f"mecs finetune: mode '{cfg.mode}' needs --emulator PATH")
    from correction.hosts.specs import HostSpecError, parse_host_spec
    from correction.inference import Corrector

    try:
        parent_layout = Corrector.load(args.repository, args.name, args.from_version).layout
        spec = parse_host_spec(args.host)
    except (ArtifactError, HostSpecError) as err:
        raise UsageError(f"mecs finetune: {err}") from None
    shape = parent_layout.state_shape
    if spec.kind == "archive":  # no live host: only the emulator, trained on the archive
        if cfg.mode != "emulator":
            raise UsageError(
                f"mecs finetune: mode '{cfg.mode}' steps the host model; '{args.host}' is a "
                "forecast archive: give torch:NAME, python:MODULE:CALLABLE or process:COMMAND, "
                "or use --mode emulator"
            )
        from correction.emulator import Emulator

        host = Emulator.load(args.emulator)
        data = load_analyses(args.data, layout=parent_layout, dims=args.dims, time_unit="hour")
    elif spec.kind == "torch":  # its parameters come with a benchmark's analyses
        data = load_analyses(args.data, layout=parent_layout, dims=args.dims)
        host = make_named_host(args.host, data.host_params, state_shape=shape)
    else:  # a black box says its time unit, which datetime analyses are counted in
        host = make_named_host(
            args.host,
            {},
            state_shape=shape,
            dt=args.host_dt,
            timeout_s=args.host_timeout,
            fields=parent_layout.channel_names(),
        )
        try:
            data = load_analyses(
                args.data,
                layout=parent_layout,
                dims=args.dims,
                time_unit=getattr(host, "time_unit", None),
            )
        except UsageError:
            close_host(host)
            raise
    steps = round(data.interval / host.dt)
    if abs(steps * host.dt - data.interval) > 1e-6:
        raise UsageError(
            f"mecs finetune: analysis interval {data.interval} is not a whole number of "
            f"host steps (dt={host.dt})"
        )
    torch_host = host if cfg.mode == "differentiable" else None
    if torch_host is not None and not getattr(host, "differentiable", False):
        close_host(host)
        raise UsageError(
            f"mecs finetune: mode 'differentiable' needs a differentiable host (torch:NAME); "
            f"'{args.host}' is a black box: use unrolled, hybrid or sip"
        )
    try:
        result = finetune(
            args.repository,
            args.name,
            data.values,
            host,
            cfg,
            steps,
            data.train_end,
            from_version=args.from_version,
            emulator_path=args.emulator,
            torch_host=torch_host,
            data_ref=str(data.path),
            progress=not args.no_progress,
            host_spec=args.host,
            stage=args.stage,
        )
    except HostProcessError as err:  # nothing was published
        print(f"error: mecs finetune: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        raise UsageError(f"mecs finetune: {err}") from None
    finally:
        close_host(host)
    first, best = result.history[0]["val_loss"], result.best_val
    report(f"finetune: mode {cfg.mode}; validation a posteriori loss {first:.5f} -> {best:.5f}")
    report(f"finetune: published {result.version.path.resolve()} ({result.wall_time:.1f} s)")
    from correction import stages

    mv = result.version
    stage = stages.read(args.repository, mv.name).stage_of(mv.version)
    if stage == stages.CANDIDATE:
        report(
            f"finetune: version {mv.version} is a candidate; `mecs promote --repository "
            f"{args.repository} --name {mv.name} --version {mv.version} ...` verifies it "
            "against production and promotes it if it wins"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from correction.training.settings import MODES

    p = sub.add_parser("finetune", help="online fine-tuning, unrolled in time")
    p.add_argument("--mode", choices=MODES, default=None, help="default: hybrid")
    p.add_argument("--repository", required=True)
    p.add_argument("--name", required=True)
    p.add_argument(
        "--from",
        dest="from_version",
        type=int,
        default=None,
        help="parent version (default: the newest)",
    )
    p.add_argument("--emulator", help="emulator artifact (from mecs emulator)")
    p.add_argument("--data", required=True, help="mecs synth directory or analyses store")
    add_host_options(p, default_note=" (default l96)")
    p.add_argument("--dims", help="rename the analyses' dims, e.g. valid_time=time")
    p.add_argument("--unroll", type=int, default=None, help="analysis intervals per window")
    p.add_argument("--curriculum", help="unroll lengths in turn, e.g. 1,4,10")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", help="JSON or TOML file of finetune settings")
    p.add_argument(
        "--stage",
        choices=["candidate", "production"],
        default="candidate",
        help="the new version's stage (default candidate: served once mecs promote passes it)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
