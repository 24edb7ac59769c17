"""``mecs emulator``: train a neural emulator of the host model (forward calls only)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mecs.cli import UsageError

from ._common import add_host_options, report


def run(args: argparse.Namespace) -> int:
    from correction.hosts import BlackBoxHost
    from correction.hosts.process import HostProcessError
    from correction.hosts.specs import close_host
    from correction.training.emulator import EmulatorConfig, train_emulator
    from data_pipeline.config import ConfigError

    from ._common import load_analyses, make_named_host, settings_with_flags

    try:
        cfg = EmulatorConfig.from_dict(settings_with_flags(args, ("seed", "epochs")))
    except (ConfigError, ValueError) as err:
        raise UsageError(f"mecs emulator: {err}") from None
    if not args.host:
        raise UsageError('mecs emulator: give --host SPEC (or host = "..." in --config)')
    if Path(args.out).exists():
        raise UsageError(f"mecs emulator: output {args.out} exists; choose a new path")
    data = load_analyses(args.data, dims=args.dims, variables=args.variables)
    layout = data.layout
    if args.host.startswith("archive:"):  # no live host: consecutive leads of an archive
        from ._common import archive_pairs

        pairs, dt = archive_pairs(args.host[len("archive:") :], layout, args.archive_dims)
        path, metrics = train_emulator(
            None,
            args.host,
            data.values[: data.train_end],
            layout,
            args.out,
            cfg,
            progress=not args.no_progress,
            pairs=pairs,
            dt=dt,
        )
        report(f"emulator: one-step RMSE {metrics['one_step_rmse']:.4g} on held-out archive pairs")
        report(f"emulator: wrote {Path(path).resolve()}")
        return 0
    host = make_named_host(
        args.host,
        data.host_params,
        state_shape=layout.state_shape,
        dt=args.host_dt,
        timeout_s=args.host_timeout,
        fields=layout.channel_names(),
    )
    try:
        path, metrics = train_emulator(
            host if isinstance(host, BlackBoxHost) else BlackBoxHost.wrap(host),
            args.host,
            data.values[: data.train_end],
            layout,
            args.out,
            cfg,
            host_params=data.host_params,
            progress=not args.no_progress,
        )
    except HostProcessError as err:  # nothing was written
        print(f"error: mecs emulator: {err}", file=sys.stderr)
        return 1
    finally:
        close_host(host)
    report(
        f"emulator: one-step RMSE {metrics['one_step_rmse']:.4g}, 10-step RMSE "
        f"{metrics['ten_step_rmse']:.4g} against the host"
    )
    report(f"emulator: wrote {Path(path).resolve()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("emulator", help="train a neural emulator of the host model")
    add_host_options(p, default_note=" (or 'host' in --config)")
    p.add_argument(
        "--data", required=True, help="mecs synth directory, or an analyses store or glob"
    )
    p.add_argument("--variables", help="comma-separated fields of the state (default: all)")
    p.add_argument("--dims", help="rename the analyses' dims, e.g. valid_time=time")
    p.add_argument(
        "--archive-dims",
        help="with --host archive:STORE, rename the archive's dims (time=init_time,step=lead_time)",
    )
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--config", help="JSON or TOML file of emulator settings")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
