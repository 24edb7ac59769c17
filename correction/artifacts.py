"""Model artifacts: ``<repository>/<name>/<version>/{weights.safetensors,config.json}``.

The layout mirrors Triton's model repository. Weights are safetensors (no pickle,
ever); ``config.json`` carries everything needed to rebuild the model in one call:
network name and parameters, the input/output layout, the normalisation
statistics, training provenance and metrics, the parent version and the package
version, plus two sha256 digests checked on load: of the weights file, and of the
config itself with the weights digest (``config_sha256``), so that a corrupted or
truncated file, or an edited normalisation or layout, is refused rather than served.

Only what ``publish`` makes is a version: a directory named by an ASCII integer
without leading zeros (``1``, ``2``, ...; not ``01``, not other scripts' digits),
not a symbolic link, holding regular files. A symlink could make a directory
outside the repository the served default; it is skipped.

Publishing writes into a hidden temporary directory inside ``<name>/`` and renames
it to the next free version number, so a reader (the service's poller) never sees
half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from .layout import ModelLayout
from .networks import CorrectionModel
from .storage import (
    discard,
    fsync_tree,
    new_staging_path,
    remove_stale_partials,
    rename_exclusive,
    share_tree,
)
from .version import __version__

log = logging.getLogger("mecs.artifacts")

FORMAT = "mecs-model/1"
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", re.ASCII)
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$", re.ASCII)


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


def is_version_name(text: str) -> bool:
    """``"3"`` is a version; ``"03"``, ``"0"``, ``"\u0663"`` (Arabic-Indic three) are not."""
    return bool(_VERSION_RE.match(text))


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def list_versions(repository: str | Path, name: str) -> list[int]:
    """Complete versions of ``name`` in ascending order (hidden temp dirs ignored)."""
    root = Path(repository) / check_name(name)
    if not _real_dir(root):
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if is_version_name(p.name) and _real_dir(p) and (p / CONFIG).is_file()
    )


def list_models(repository: str | Path) -> list[str]:
    root = Path(repository)
    if not root.is_dir():
        return []
    names = (p.name for p in root.iterdir() if _real_dir(p) and _NAME_RE.match(p.name))
    return sorted(n for n in names if list_versions(root, n))


def fingerprint(path: str | Path) -> tuple:
    """Names, sizes and modification times of a version's files: changes when it does.

    The service retries a version that failed to load once this changes (a version
    copied by hand, config first and weights later, is complete on a later scan).
    """
    path = Path(path)
    try:
        return tuple(
            sorted(
                (p.name, st.st_size, st.st_mtime_ns) for p in path.iterdir() for st in [p.lstat()]
            )
        )
    except OSError:
        return ()


def resolve(repository: str | Path, name: str, version: int | None = None) -> ModelVersion:
    """The requested version, or the served one (production; the newest of an ungated
    model, see :mod:`correction.stages`) when ``version`` is None."""
    from . import stages

    versions = list_versions(repository, name)
    if not versions:
        raise ArtifactError(f"model '{name}' has no versions in repository {repository}")
    if version is None:
        try:
            version = stages.read(repository, name).production(versions)
        except stages.StageError as err:
            raise ArtifactError(str(err)) from None
        if version is None:
            raise ArtifactError(
                f"model '{name}' has no production version (only candidates {versions}); "
                "promote one with mecs promote or name a version"
            )
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


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of everything in ``config`` but this digest: canonical JSON, sorted keys.

    The config holds the weights' own digest, so this one covers what a version
    computes: network, layout, normalisation and weights.
    """
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_config(directory: Path, body: dict[str, Any]) -> None:
    body["config_sha256"] = config_digest(body)
    (directory / CONFIG).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _write_weights(directory: Path, model: torch.nn.Module) -> str:
    """Save the model's state dict as safetensors in ``directory``; return its sha256."""
    save_file(_tensors(model), str(directory / WEIGHTS), metadata={"format": FORMAT})
    return _sha256(directory / WEIGHTS)


def weights_digest(model: torch.nn.Module) -> str:
    """The ``weights_sha256`` that publishing ``model`` would record (same bytes)."""
    return hashlib.sha256(safetensors_bytes(_tensors(model), {"format": FORMAT})).hexdigest()


def find_published(
    repository: str | Path, name: str, weights_sha256: str, run_key: str
) -> ModelVersion | None:
    """A version of ``name`` holding these weights from the run ``run_key``, if any.

    A training job killed after publishing and before cleaning up its checkpoint
    finds its own version here when it is run again, instead of publishing a copy.
    """
    for v in reversed(list_versions(repository, name)):
        path = Path(repository) / name / str(v)
        try:
            config = read_config(path)
        except ArtifactError:
            continue
        if (
            config.get("weights_sha256") == weights_sha256
            and (config.get("training") or {}).get("run_key") == run_key
        ):
            return ModelVersion(name, v, path)
    return None


def publish(
    repository: str | Path,
    name: str,
    model: torch.nn.Module,
    config: dict[str, Any],
    version: int | None = None,
    stage: str | None = None,
) -> ModelVersion:
    """Write a new version atomically and return it.

    ``version`` None takes the next free number. Two concurrent publishers never
    overwrite each other: the final rename fails for the loser, which retries with
    the next number. ``stage`` (``candidate`` or ``production``) records the new
    version's stage (:mod:`correction.stages`); None records it as a candidate on a
    gated model and leaves an ungated one ungated (its newest version is served).
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
        for _attempt in range(100):
            # the next number after what is on disk now: a publisher that lost a race
            # takes the one after the winner's, so racing publishers leave no gaps
            v = version if version is not None else max(_numbers_in(root), default=0) + 1
            body["version"] = v
            _write_config(tmp, body)
            share_tree(tmp)
            fsync_tree(tmp)
            if rename_exclusive(tmp, root / str(v)):  # atomic; refused if the target exists
                _record_stage(repository, name, v, stage)
                return ModelVersion(name, v, root / str(v))
            if version is not None:
                raise ArtifactError(f"model '{name}' version {v} already exists")
        raise ArtifactError(f"could not find a free version number for model '{name}'")
    finally:
        if tmp.exists():
            discard(tmp)


def _record_stage(repository: str | Path, name: str, version: int, stage: str | None) -> None:
    from . import stages

    if stage is None and not stages.read(repository, name).gated:
        return  # ungated: served as the newest, as before stages existed
    stages.register_new(repository, name, version, stage or stages.CANDIDATE)


def _numbers_in(root: Path) -> list[int]:
    """Every version number taken in ``root``, complete or not (a rename target)."""
    return [int(p.name) for p in root.iterdir() if is_version_name(p.name)]


def save(path: str | Path, model: torch.nn.Module, config: dict[str, Any]) -> Path:
    """Write one artifact directory at ``path`` atomically (for emulators and the like)."""
    path = Path(path)
    if path.exists():
        raise ArtifactError(f"{path} already exists")
    remove_stale_partials(path)
    tmp = new_staging_path(path)
    try:
        body = dict(config, weights_sha256=_write_weights(tmp, model))
        _write_config(tmp, body)
        share_tree(tmp)
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
    for f in (path / CONFIG, weights):
        if f.is_symlink():
            raise ArtifactError(f"{f} is a symbolic link; a model version holds regular files only")
    if not weights.is_file():
        raise ArtifactError(f"{path}: {WEIGHTS} is missing")
    want = config.get("config_sha256")
    if want is None:
        log.warning(
            "%s: no config_sha256 (published before mecs checked its configs); the "
            "weights are verified, the config is not",
            path / CONFIG,
        )
    elif config_digest(config) != want:
        raise ArtifactError(
            f"{path / CONFIG}: config checksum mismatch (the file was edited or damaged "
            "after publishing; normalisation, layout or network may differ from what was "
            "trained); publish a new version instead of editing one"
        )
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
