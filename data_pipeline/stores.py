"""Writing stores so that a reader never sees half of one.

Everything a stage produces is first written into a hidden staging directory next
to its destination and renamed into place when complete. A killed job leaves only
a ``.*.partial-*`` directory behind, which no reader opens.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import xarray as xr


class OutputExistsError(FileExistsError):
    """The destination holds data and overwriting was not asked for."""


def check_destination(out: Path, overwrite: bool) -> None:
    """Fail before any work when ``out`` is a non-empty directory or a file."""
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"output directory {out} is not empty; pass --overwrite to replace it"
            )


@contextlib.contextmanager
def staged_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that replaces ``out`` only if the block succeeds."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, out)


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``, moving an existing ``out`` aside first."""
    trash = None
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
    staging.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_zarr(
    ds: xr.Dataset, path: str | Path, encoding: dict | None = None, compute: bool = True
):
    """Write a zarr v3 store with consolidated metadata.

    With ``compute=False`` the metadata and in-memory variables are written now and
    a ``dask.delayed`` object that writes the dask-backed variables is returned.
    """
    with warnings.catch_warnings():
        # consolidated metadata is a zarr v3 extension; we rely on it deliberately
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return ds.to_zarr(
            path, mode="w-", zarr_format=3, consolidated=True, encoding=encoding, compute=compute
        )


def update_zarr_attrs(path: str | Path, attrs: dict) -> None:
    """Add or replace root attributes of a store and consolidate its metadata again."""
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        group.attrs.update(attrs)
        zarr.consolidate_metadata(str(path), zarr_format=3)


# Staging directories that name their owner, so a rerun can remove those of a dead job:
# ``.<name>.partial-<host>-<pid>-<token>``.
_PARTIAL = ".{name}.partial-{host}-{pid}-{token}"


def new_staging_path(out: str | Path) -> Path:
    """A fresh hidden sibling of ``out`` (created) that names this host and process."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_") or "host"
    path = out.with_name(
        _PARTIAL.format(name=out.name, host=host, pid=os.getpid(), token=secrets.token_hex(4))
    )
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


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Remove staging siblings of ``out`` left by killed jobs of this host.

    Only directories made by :func:`new_staging_path` whose process no longer runs
    are removed; a concurrent job's staging directory, or one from another host
    (a shared file system), is left alone.
    """
    out = Path(out).absolute()
    host = socket.gethostname().replace("-", "_") or "host"
    removed = []
    if not out.parent.is_dir():
        return removed
    prefix = f".{out.name}.partial-{host}-"
    for p in out.parent.iterdir():
        if not (p.name.startswith(prefix) and p.is_dir()):
            continue
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def commit_staging(staging: Path, out: str | Path, overwrite: bool = False) -> None:
    """Rename a finished staging directory to ``out`` (replacing it if ``overwrite``)."""
    out = Path(out).absolute()
    check_destination(out, overwrite)
    _replace(staging, out)


def open_zarr(path: str | Path, **kwargs) -> xr.Dataset:
    """Open a store written by :func:`write_zarr`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_zarr(path, zarr_format=3, consolidated=True, **kwargs)
