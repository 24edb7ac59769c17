"""Resumable training checkpoints without pickle.

Tensors (model, best model) go to safetensors; the optimizer and scheduler state
dicts go through ``torch.save`` and are read back with ``weights_only=True``; the
rest (epoch, history, early-stopping state) is JSON. A checkpoint directory is
replaced by rename, so a kill during the write leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from correction.storage import fsync_tree, new_staging_path, remove_stale_partials


def save_checkpoint(
    directory: Path,
    tensors: dict[str, dict[str, torch.Tensor]],
    states: dict[str, Any],
    progress: dict[str, Any],
) -> None:
    """Write ``tensors`` (named state dicts), torch ``states`` and JSON ``progress``."""
    remove_stale_partials(directory)
    tmp = new_staging_path(directory)
    for key, sd in tensors.items():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in sd.items()},
            str(tmp / f"{key}.safetensors"),
        )
    torch.save(states, tmp / "states.pt")
    (tmp / "progress.json").write_text(json.dumps(progress, indent=1))
    fsync_tree(tmp)
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    directory: Path, tensor_keys: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]] | None:
    """The checkpoint in ``directory`` (or its ``.old`` twin after a kill), else None."""
    for d in (directory, directory.with_name(directory.name + ".old")):
        if (d / "progress.json").is_file():
            tensors = {k: load_file(str(d / f"{k}.safetensors")) for k in tensor_keys}
            states = torch.load(d / "states.pt", weights_only=True)
            progress = json.loads((d / "progress.json").read_text())
            return tensors, states, progress
    return None
