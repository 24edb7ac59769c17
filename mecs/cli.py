"""The ``mecs`` command line: one subcommand per stage.

Each stage's arguments live in ``mecs/commands/<stage>.py``, which defines
``register(sub)`` adding its parser and setting ``func``. Heavy imports (torch,
xarray, dask) happen inside the command functions, so ``mecs --help`` and argument
errors answer at once. Every usage or input error is one line on stderr and exit
code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

from mecs import __version__

EXIT_USAGE = 2

# Stage order as the design lists it; a stage whose module does not exist yet is skipped.
COMMANDS = [
    "synth",
    "increments",
    "pretrain",
    "emulator",
    "finetune",
    "evaluate",
    "verify",
    "forecast",
    "serve",
    "demo",
]


class UsageError(Exception):
    """A bad argument or input: reported on one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mecs", description="Model-error correction for forecast models.")
    parser.add_argument("--version", action="version", version=f"mecs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMANDS:
        module_name = f"mecs.commands.{name}"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
