"""``mecs pretrain``: offline training on an increment store -> model version."""

from __future__ import annotations

import argparse
from pathlib import Path

from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    from correction.artifacts import ArtifactError, check_name
    from correction.training.pretrain import PretrainConfig, pretrain
    from data_pipeline.config import ConfigError

    from ._common import report, settings_with_flags

    try:
        check_name(args.name)
        flags = ("seed", "max_epochs", "network", "batch_size", "lr", "sampling")
        cfg = PretrainConfig.from_dict(settings_with_flags(args, flags))
        if not Path(args.data).exists():
            raise ValueError(f"increment store {args.data} does not exist")
    except (ArtifactError, ConfigError, ValueError) as err:
        raise UsageError(f"mecs pretrain: {err}") from None
    result = pretrain(
        args.data,
        args.repository,
        args.name,
        cfg,
        progress=not args.no_progress,
        stage=args.stage,
    )
    if result.resumed_from is not None:
        report(f"pretrain: resumed from the checkpoint after epoch {result.resumed_from}")
    report(
        f"pretrain: best validation loss {result.best_val_loss:.4f} at epoch "
        f"{result.best_epoch} of {result.epochs_run} ({result.wall_time:.1f} s)"
    )
    report(f"pretrain: published {result.version.path.resolve()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="offline training on an increment store")
    p.add_argument("--data", required=True, help="increment store (from mecs increments)")
    p.add_argument("--repository", required=True, help="model repository directory")
    p.add_argument("--name", required=True, help="model name (a directory in the repository)")
    p.add_argument("--config", help="JSON or TOML file of pretrain settings")
    p.add_argument("--network", default=None, help="network name (stencil-cnn, column-mlp)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--sampling",
        choices=("uniform", "sift"),
        default=None,
        help="uniform (default), or sift: backpropagate on the highest early-exit losses "
        "of a pool (sift_pool, sift_floor in --config)",
    )
    p.add_argument(
        "--stage",
        choices=("candidate", "production"),
        default=None,
        help="the new version's stage (default: a candidate once the model is gated, see "
        "mecs promote; the newest is served on an ungated one)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
