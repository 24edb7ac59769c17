"""``mecs synth``: build a benchmark's stores (the l96 presets, or the 2-D ``qg-*`` presets)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    from correction.storage import OutputExistsError, check_destination
    from data_pipeline.config import ConfigError, load_config
    from data_pipeline.qg import QG_PRESETS, load_qg_config
    from data_pipeline.qg_stores import generate_qg
    from data_pipeline.synth import generate

    try:
        if args.preset in QG_PRESETS:
            cfg = load_qg_config(
                args.preset,
                args.config,
                quick=args.quick,
                seed=args.seed,
                obs_noise=args.obs_sigma,
                analysis=args.analysis,
                duration=args.duration,
            )
            make = generate_qg
        else:
            make = generate
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
    result = make(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"synth: wrote {result.out.resolve()} in {result.wall_time:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from data_pipeline.config import PRESETS
    from data_pipeline.qg import QG_PRESETS

    p = sub.add_parser("synth", help="build a benchmark's stores (l96-2s, qg-eddy, ...)")
    p.add_argument("--out", required=True, help="output directory (created; must be empty)")
    p.add_argument("--preset", default="l96-2s", choices=sorted([*PRESETS, *QG_PRESETS]))
    p.add_argument("--config", help="JSON or TOML file of benchmark settings")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="small version for tests and demos")
    p.add_argument(
        "--obs-sigma",
        type=float,
        default=None,
        help="observation noise std (qg presets: times each layer's std)",
    )
    p.add_argument("--analysis", choices=["letkf", "noisy-truth"], default=None)
    p.add_argument(
        "--duration", type=float, default=None, help="stored period (MTU; hours for qg presets)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
