"""The ``mecs`` command line: one subcommand per stage.

Heavy imports (torch, xarray, dask) happen inside each subcommand so that
``mecs --help`` and argument errors answer at once. Every usage or input error is
one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mecs import __version__

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or input: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(f"{self.prog}: {message}")


def _cmd_synth(args: argparse.Namespace) -> int:
    from data_pipeline.config import ConfigError, load_config
    from data_pipeline.stores import OutputExistsError, check_destination
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from mecs.demo import run_demo

    return run_demo(out=Path(args.out), preset=args.preset, quick=args.quick, fresh=args.fresh)


def _add_synth(sub: argparse._SubParsersAction, presets: Sequence[str]) -> None:
    p = sub.add_parser("synth", help="build the l96-2s benchmark stores")
    p.add_argument("--out", required=True, help="output directory (created; must be empty)")
    p.add_argument("--preset", default="l96-2s", choices=presets)
    p.add_argument("--config", help="JSON or TOML file of benchmark settings")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="small version for tests and demos")
    p.add_argument("--obs-sigma", type=float, default=None, help="observation noise std")
    p.add_argument("--analysis", choices=["letkf", "noisy-truth"], default=None)
    p.add_argument("--duration", type=float, default=None, help="stored cycling period (MTU)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_synth)


def _add_demo(sub: argparse._SubParsersAction, presets: Sequence[str]) -> None:
    p = sub.add_parser("demo", help="run the whole chain on the embedded default")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="l96-2s", choices=presets)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--fresh", action="store_true", help="redo finished stages")
    p.set_defaults(func=_cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipeline.config import PRESETS

    presets = sorted(PRESETS)
    parser = _Parser(prog="mecs", description="Model-error correction for forecast models.")
    parser.add_argument("--version", action="version", version=f"mecs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_synth(sub, presets)
    _add_demo(sub, presets)
    try:
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
