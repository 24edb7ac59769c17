"""``mecs demo``: the whole chain on the embedded default."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from data_pipeline.qg import QG_PRESETS

    if args.preset in QG_PRESETS:
        from mecs.demo_qg import run_qg_demo

        return run_qg_demo(Path(args.out), args.preset, quick=args.quick, fresh=args.fresh)
    from mecs.demo import run_demo

    return run_demo(out=Path(args.out), preset=args.preset, quick=args.quick, fresh=args.fresh)


def register(sub: argparse._SubParsersAction) -> None:
    from data_pipeline.config import PRESETS
    from data_pipeline.qg import QG_PRESETS

    p = sub.add_parser("demo", help="run the whole chain on the embedded default")
    p.add_argument("--out", default="runs/demo", help="demo directory (stages reused)")
    p.add_argument("--preset", default="l96-2s", choices=sorted([*PRESETS, *QG_PRESETS]))
    p.add_argument("--quick", action="store_true", help="small version (the CI end-to-end run)")
    p.add_argument("--fresh", action="store_true", help="redo finished stages")
    p.set_defaults(func=run)
