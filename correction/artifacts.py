"""Model artifacts: ``<repository>/<name>/<version>/{weights.safetensors,config.json}``.

The layout mirrors Triton's model repository. Weights are safetensors (no pickle,
ever); ``config.json`` carries everything needed to rebuild the model in one call:
network name and parameters, the input/output layout, the normalisation
statistics, training provenance and metrics, the parent version and the package
version, plus the weights' sha256 so that a corrupted or truncated file is caught
on load rather than served.

Publishing writes into a hidden temporary directory inside ``<name>/`` and renames
it to the next free version number, so a reader (the service's poller) never sees
half a model.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .layout import ModelLayout
from .networks import CorrectionModel
from .storage import (
    discard,
    fsync_tree,
    new_staging_path,
    remove_stale_partials,
    rename_exclusive,
)
from .version import __version__

FORMAT = "mecs-model/1"
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(RuntimeError):
    """A model version is missing, incomplete or corrupted; the message says which."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path


def check_name(name: str) -> str:
    """Model names become directory names: letters, digits, '.', '_' and '-' only."""
    if not _NAME_RE.match(name) or name in {".", ".."}:
        raise ArtifactError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (max 128)"
        )
    return name


def list_versions(repository: str | Path, name: str) -> list[int]:
    """Complete versions of ``name`` in ascending order (hidden temp dirs ignored)."""
    root = Path(repository) / check_name(name)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / CONFIG).is_file()
    )


def list_models(repository: str | Path) -> list[str]:
    root = Path(repository)
    if not root.is_dir():
        return []
    names = (p.name for p in root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))
    return sorted(n for n in names if list_versions(root, n))


def resolve(repository: str | Path, name: str, version: int | None = None) -> ModelVersion:
    """The requested version, or the newest when ``version`` is None."""
    versions = list_versions(repository, name)
    if not versions:
        raise ArtifactError(f"model '{name}' has no versions in repository {repository}")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ArtifactError(f"model '{name}' has no version {version} (have {versions})")
    return ModelVersion(name, version, Path(repository) / name / str(version))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_config(
    model: CorrectionModel,
    layout: ModelLayout,
    network_params: dict[str, Any],
    kind: str = "correction",
    **sections: Any,
) -> dict[str, Any]:
    """The config.json body for ``model``; extra sections (training, metrics...) pass through."""
    return {
        "format": FORMAT,
        "kind": kind,
        "network": {
            "name": model.network_name,
            "params": network_params,
            "n_forcings": model.n_forcings,
        },
        "layout": layout.to_dict(),
        "normalisation": {
            k: getattr(model, k).tolist() for k in ("in_mean", "in_std", "out_mean", "out_std")
        },
        "package_version": __version__,
        **sections,
    }


def _write_weights(directory: Path, model: torch.nn.Module) -> str:
    """Save the model's state dict as safetensors in ``directory``; return its sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
    return _sha256(directory / WEIGHTS)


def publish(
    repository: str | Path,
    name: str,
    model: torch.nn.Module,
    config: dict[str, Any],
    version: int | None = None,
) -> ModelVersion:
    """Write a new version atomically and return it.

    ``version`` None takes the next free number. Two concurrent publishers never
    overwrite each other: the final rename fails for the loser, which retries with
    the next number.
    """
    root = Path(repository) / check_name(name)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(root / "version")
    tmp = new_staging_path(root / "version")
    try:
        body = dict(config)
        body.update(
            name=name,
            weights_sha256=_write_weights(tmp, model),
            published_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        for attempt in range(100):
            v = (
                version
                if version is not None
                else (max(list_versions(repository, name), default=0) + 1 + attempt)
            )
            body["version"] = v
            (tmp / CONFIG).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
            fsync_tree(tmp)
            if rename_exclusive(tmp, root / str(v)):  # atomic; refused if the target exists
                return ModelVersion(name, v, root / str(v))
            if version is not None:
                raise ArtifactError(f"model '{name}' version {v} already exists")
        raise ArtifactError(f"could not find a free version number for model '{name}'")
    finally:
        if tmp.exists():
            discard(tmp)


def save(path: str | Path, model: torch.nn.Module, config: dict[str, Any]) -> Path:
    """Write one artifact directory at ``path`` atomically (for emulators and the like)."""
    path = Path(path)
    if path.exists():
        raise ArtifactError(f"{path} already exists")
    remove_stale_partials(path)
    tmp = new_staging_path(path)
    try:
        body = dict(config, weights_sha256=_write_weights(tmp, model))
        (tmp / CONFIG).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
        fsync_tree(tmp)
        if not rename_exclusive(tmp, path):
            raise ArtifactError(f"{path} already exists")
    finally:
        if tmp.exists():
            discard(tmp)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no {CONFIG}; not a model version directory") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path / CONFIG} is not valid JSON: {err}") from None
    if config.get("format") != FORMAT:
        raise ArtifactError(f"{path / CONFIG}: format {config.get('format')!r}, expected {FORMAT}")
    return config


def build_model(config: dict[str, Any]) -> CorrectionModel:
    """An untrained model with the architecture and layout ``config`` describes."""
    layout = ModelLayout.from_dict(config["layout"])
    net = config["network"]
    out_channels = int(config.get("out_channels", layout.channels))
    return CorrectionModel(
        net["name"],
        net["params"],
        layout.channels,
        out_channels,
        len(layout.horizontal_dims),
        net.get("n_forcings", 0),
    )


def load(path: str | Path) -> tuple[CorrectionModel, dict[str, Any]]:
    """Rebuild a model version from its directory, verifying the weights."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path}: {WEIGHTS} is missing")
    digest = _sha256(weights)
    if digest != config.get("weights_sha256"):
        raise ArtifactError(
            f"{weights}: checksum mismatch (file is corrupted or truncated; "
            f"expected sha256 {config.get('weights_sha256')}, got {digest})"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{weights}: cannot read safetensors file: {err}") from None
    model = build_model(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"{weights}: weights do not match the architecture: {err}") from None
    model.eval()
    return model, config
