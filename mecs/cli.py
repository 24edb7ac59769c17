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
    "promote",
    "evaluate",
    "verify",
    "forecast",
    "serve",
    "monitor",
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
    for p in sub.choices.values():  # every stage: --config and --no-progress
        dests = {a.dest for a in p._actions}
        if "config" not in dests:
            p.add_argument(
                "--config",
                dest="flag_config",
                metavar="FILE",
                help="JSON, TOML or KEY=VALUE file of this command's options (names as the "
                'long options, e.g. window = "6h"); flags on the command line win',
            )
        if "no_progress" not in dests:
            p.add_argument(
                "--no-progress", action="store_true", help="hide progress bars (none here)"
            )
    return parser


def _apply_flag_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Defaults from a stage's ``--config FILE`` of options, before the real parse.

    Read ahead of parsing so that a required option the file gives is not reported
    missing; an unknown name in the file is a usage error naming it.
    """
    if not argv or "--config" not in argv:
        return
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices.get(argv[0])
    if p is None or not any(a.dest == "flag_config" for a in p._actions):
        return  # the stage reads its own settings file
    i = argv.index("--config")
    if i + 1 >= len(argv):
        return
    from correction.config_files import SettingsFileError, read_settings_file

    try:
        values = read_settings_file(argv[i + 1])
    except SettingsFileError as err:
        raise UsageError(f"{p.prog}: {err}") from None
    actions = {a.dest: a for a in p._actions}
    defaults = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "flag_config"):
            raise UsageError(f"{p.prog}: --config {argv[i + 1]}: unknown option '{key}'")
        defaults[dest] = value
        action.required = False
    p.set_defaults(**defaults)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _apply_flag_config(parser, argv)
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        try:
            return func(args)
        finally:
            if "correction.training.distributed" in sys.modules:  # a stage ran under torchrun
                sys.modules["correction.training.distributed"].shutdown()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
