"""``mecs demo``: the whole chain on the embedded default."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from mecs.demo import run_demo

    return run_demo(out=Path(args.out), preset=args.preset, quick=args.quick, fresh=args.fresh)


def register(sub: argparse._SubParsersAction) -> None:
    from data_pipeline.config import PRESETS

    p = sub.add_parser("demo", help="run the whole chain on the embedded default")
    p.add_argument("--out", default="runs/demo", help="demo directory (stages reused)")
    p.add_argument("--preset", default="l96-2s", choices=sorted(PRESETS))
    p.add_argument("--quick", action="store_true", help="small version (the CI end-to-end run)")
    p.add_argument("--fresh", action="store_true", help="redo finished stages")
    p.set_defaults(func=run)
