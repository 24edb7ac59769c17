"""Writing stores so that a reader never sees half of one.

Everything a stage produces is first written into a hidden staging directory next
to its destination and renamed into place when complete. A killed job leaves only
a ``.*.partial-*`` directory behind, which no reader opens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
    trash = None
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
    staging.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_zarr(ds: xr.Dataset, path: str | Path, encoding: dict | None = None) -> None:
    """Write a zarr v3 store with consolidated metadata."""
    with warnings.catch_warnings():
        # consolidated metadata is a zarr v3 extension; we rely on it deliberately
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        ds.to_zarr(path, mode="w-", zarr_format=3, consolidated=True, encoding=encoding)


def open_zarr(path: str | Path, **kwargs) -> xr.Dataset:
    """Open a store written by :func:`write_zarr`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_zarr(path, zarr_format=3, consolidated=True, **kwargs)
