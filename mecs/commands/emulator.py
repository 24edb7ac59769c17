"""``mecs emulator``: train a neural emulator of the host model (forward calls only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    from correction.hosts import BlackBoxHost
    from correction.layout import ModelLayout
    from correction.training.emulator import EmulatorConfig, train_emulator
    from data_pipeline.config import ConfigError

    from ._common import load_analyses, make_named_host, settings_with_flags

    try:
        cfg = EmulatorConfig.from_dict(settings_with_flags(args, ("seed", "epochs")))
    except (ConfigError, ValueError) as err:
        raise UsageError(f"mecs emulator: {err}") from None
    if Path(args.out).exists():
        raise UsageError(f"mecs emulator: output {args.out} exists; choose a new path")
    data = load_analyses(args.data)
    host = make_named_host(args.host, data.host_params)
    k = data.values.shape[-1]
    layout = ModelLayout(("X",), {"X": ("k",)}, {"X": ()}, ("k",), {"k": k}, {"X": "1"})
    path, metrics = train_emulator(
        BlackBoxHost.wrap(host),
        args.host,
        data.values[: data.train_end],
        layout,
        args.out,
        cfg,
        host_params=data.host_params,
        progress=not args.no_progress,
    )
    print(
        f"emulator: one-step RMSE {metrics['one_step_rmse']:.4g}, 10-step RMSE "
        f"{metrics['ten_step_rmse']:.4g} against the host"
    )
    print(f"emulator: wrote {Path(path).resolve()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("emulator", help="train a neural emulator of the host model")
    p.add_argument("--host", required=True, help="host model name (l96)")
    p.add_argument("--data", required=True, help="mecs synth directory or analyses store")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--config", help="JSON or TOML file of emulator settings")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
