"""``mecs synth``: build the l96-2s benchmark stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    from correction.storage import OutputExistsError, check_destination
    from data_pipeline.config import ConfigError, load_config
    from data_pipeline.synth import generate

    try:
        cfg = load_config(
            args.preset,
            args.config,
            quick=args.quick,
            seed=args.seed,
            obs_sigma=args.obs_sigma,
            analysis=args.analysis,
            duration=args.duration,
        )
        check_destination(Path(args.out), args.overwrite)
    except (ConfigError, OutputExistsError) as err:
        raise UsageError(f"mecs synth: {err}") from None
    result = generate(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"synth: wrote {result.out.resolve()} in {result.wall_time:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from data_pipeline.config import PRESETS

    p = sub.add_parser("synth", help="build the l96-2s benchmark stores")
    p.add_argument("--out", required=True, help="output directory (created; must be empty)")
    p.add_argument("--preset", default="l96-2s", choices=sorted(PRESETS))
    p.add_argument("--config", help="JSON or TOML file of benchmark settings")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="small version for tests and demos")
    p.add_argument("--obs-sigma", type=float, default=None, help="observation noise std")
    p.add_argument("--analysis", choices=["letkf", "noisy-truth"], default=None)
    p.add_argument("--duration", type=float, default=None, help="stored cycling period (MTU)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
