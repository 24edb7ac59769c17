"""Writing outputs so that a reader never sees half of one, and opening zarr quietly.

Every stage that writes (``mecs synth``, ``mecs increments``, model versions,
emulators, training checkpoints, ``mecs forecast``) goes through this module:

- a **staging directory** beside the destination, named
  ``.<name>.partial-<host>-<pid>-<token>`` so that a rerun removes those of killed
  jobs on this host (:func:`remove_stale_partials`) and no reader ever opens one;
- a **commit** that renames it into place (:func:`commit_staging`; an existing
  output is moved aside first and removed after), or, for version directories,
  an exclusive rename that fails when the target exists (:func:`rename_exclusive`);
- for **fsspec URLs** (object storage cannot rename atomically) a staging prefix
  beside the destination and a commit whose last write is a marker file
  (:func:`remote_staging`, :func:`remote_commit`);
- **zarr v3** writes and reads with consolidated metadata, whose warnings are
  handled here once (:func:`zarr_warnings`).

Only the standard library is imported at module level; xarray, zarr and fsspec
load when a function needs them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """The destination holds data and overwriting was not asked for."""


def is_url(text: str | os.PathLike) -> bool:
    """An fsspec URL other than ``file://`` (those are plain local paths)."""
    text = os.fspath(text)
    return "://" in text and not text.startswith("file://")


def check_destination(out: str | os.PathLike, overwrite: bool) -> None:
    """Fail before any work when ``out`` is a non-empty directory or a file."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"output directory {out} is not empty; pass --overwrite to replace it"
            )


# ``.<name>.partial-<host>-<pid>-<token>``: the owner is in the name
_PARTIAL = ".{name}.partial-{host}-{pid}-{token}"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def new_staging_path(out: str | os.PathLike) -> Path:
    """A fresh hidden sibling of ``out`` (created, umask mode) naming this host and process."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    path = out.with_name(_PARTIAL.format(name=out.name, host=_host(), pid=os.getpid(), token=token))
    path.mkdir()
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Remove staging siblings of ``out`` left by killed jobs of this host.

    Only directories made by :func:`new_staging_path` whose process no longer runs
    are removed; a concurrent job's staging directory, or one from another host
    (a shared file system), is left alone.
    """
    out = Path(out).absolute()
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}.partial-{_host()}-"
    for p in out.parent.iterdir():
        if not (p.name.startswith(prefix) and p.is_dir()):
            continue
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``, moving an existing ``out`` aside first."""
    trash = None
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
    staging.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def commit_staging(staging: Path, out: str | os.PathLike, overwrite: bool = False) -> None:
    """Rename a finished staging directory to ``out`` (replacing it if ``overwrite``)."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    _replace(staging, out)


def rename_exclusive(staging: Path, target: Path) -> bool:
    """Rename ``staging`` to ``target`` only if ``target`` does not exist; False if it does.

    ``rename(2)`` silently replaces an *empty* directory, so an existing target is
    refused here first; a non-empty one makes the rename itself fail.
    """
    if target.exists():
        return False
    try:
        os.rename(staging, target)
    except OSError:
        return False
    return True


def discard(staging: str | os.PathLike) -> None:
    """Remove a staging directory (local path or fsspec URL), ignoring errors."""
    if is_url(staging):
        with contextlib.suppress(Exception):
            fs, root = url_to_fs(os.fspath(staging))
            fs.rm(root, recursive=True)
    else:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that replaces ``out`` only if the block succeeds."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    remove_stale_partials(out)
    staging = new_staging_path(out)
    try:
        yield staging
    except BaseException:
        discard(staging)
        raise
    _replace(staging, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_tree(directory: Path) -> None:
    """Give ``directory`` and everything in it the modes of fresh files under the umask.

    Some writers (safetensors) create files 0600; a published version read by a
    service running under another uid than the trainer must be readable, as a file
    made with ``open`` would be (0644 and 0755 under the usual umask 022).
    """
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_tree(directory: Path) -> None:
    """Flush every file of ``directory`` and the directory itself to disk."""
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small file by rename, so a reader sees the old or the new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- fsspec URLs ---------------------------------------------------------------------
def url_to_fs(path: str) -> tuple[Any, str]:
    """``(filesystem, root path)`` of an fsspec URL or local path."""
    import fsspec

    return fsspec.core.url_to_fs(path)


def remote_staging(out: str) -> str:
    """A staging URL beside ``out``; object stores cannot rename, the marker commits."""
    _, root = url_to_fs(out)
    parent, name = root.rstrip("/").rsplit("/", 1)
    protocol = out.split("://", 1)[0]
    return f"{protocol}://{parent}/.{name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def remote_commit(
    staging: str, out: str, files: Mapping[str, bytes], marker: tuple[str, bytes]
) -> None:
    """Write ``files`` into ``staging``, move it to ``out``, then write the marker last."""
    fs, root = url_to_fs(out)
    _, stage_root = url_to_fs(staging)
    for name, data in files.items():
        fs.pipe(f"{stage_root}/{name}", data)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.mv(stage_root, root, recursive=True)
    fs.pipe(f"{root}/{marker[0]}", marker[1])  # last: the store is complete


# -- zarr ----------------------------------------------------------------------------
@contextlib.contextmanager
def zarr_warnings() -> Iterator[None]:
    """Silence the warnings that consolidated metadata on zarr v3 raises by design.

    Consolidated metadata is a zarr v3 extension we rely on deliberately (one read
    opens a store); inputs from elsewhere may lack it, and xarray then warns that it
    fell back to reading each array's metadata.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*consolidated.*")
        # zarr-python stores "<U5" labels (the split) as its fixed_length_utf32 data type
        warnings.filterwarnings("ignore", message=".*Zarr V3 specification.*")
        yield


def write_zarr(ds: Any, path: str | os.PathLike, encoding: dict | None = None, compute=True):
    """Write a zarr v3 store with consolidated metadata.

    With ``compute=False`` the metadata and in-memory variables are written now and
    a ``dask.delayed`` object that writes the dask-backed variables is returned.
    """
    with zarr_warnings():
        return ds.to_zarr(
            path, mode="w-", zarr_format=3, consolidated=True, encoding=encoding, compute=compute
        )


def update_zarr_attrs(path: str | os.PathLike, attrs: dict) -> None:
    """Add or replace root attributes of a store and consolidate its metadata again."""
    import zarr

    with zarr_warnings():
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        group.attrs.update(attrs)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def open_zarr(path: str | os.PathLike, consolidated: bool | None = True, **kwargs: Any):
    """Open a zarr store lazily; ``consolidated=None`` also reads stores without it."""
    import xarray as xr

    if consolidated:
        kwargs.setdefault("zarr_format", 3)
    with zarr_warnings():
        return xr.open_zarr(os.fspath(path), consolidated=consolidated, **kwargs)


__all__ = [
    "OutputExistsError",
    "atomic_write_text",
    "check_destination",
    "commit_staging",
    "discard",
    "fsync_tree",
    "is_url",
    "new_staging_path",
    "open_zarr",
    "remote_commit",
    "remote_staging",
    "remove_stale_partials",
    "rename_exclusive",
    "staged_directory",
    "update_zarr_attrs",
    "url_to_fs",
    "write_zarr",
    "zarr_warnings",
]
