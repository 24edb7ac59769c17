"""Opening analyses and forecasts lazily: Datasets, paths, globs and fsspec URLs."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import xarray as xr

from correction.storage import is_url, open_zarr

from .base import IN_MEMORY, INPUT_CHUNK_BYTES, InputError


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _looks_zarr(text: str) -> bool:
    stripped = text.rstrip("/")
    if stripped.endswith(".zarr"):
        return True
    p = Path(stripped)
    return (
        not is_url(text)
        and p.is_dir()
        and any((p / name).exists() for name in ("zarr.json", ".zgroup", ".zmetadata"))
    )


def _step_chunks(ds: xr.Dataset, dim: str) -> int:
    """Steps along ``dim`` per chunk so that one chunk of any variable is ~64 MiB."""
    per_step = max(
        (
            v.dtype.itemsize * v.size / max(v.sizes[dim], 1)
            for v in ds.data_vars.values()
            if dim in v.dims
        ),
        default=1,
    )
    return max(1, int(INPUT_CHUNK_BYTES // max(per_step, 1)))


def open_input(source: Any, role: str, time_dim: str) -> tuple[xr.Dataset, str]:
    """Open analyses or forecasts lazily; return the dataset and its recorded source."""
    if isinstance(source, xr.DataArray):
        source = source.to_dataset()
    if isinstance(source, xr.Dataset):
        return source, IN_MEMORY
    text = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    recorded = text if is_url(text) else os.path.abspath(text)
    try:
        if _has_glob(text) and not is_url(text):
            paths = sorted(glob.glob(text))
            if not paths:
                raise InputError(f"{role}: no file matches {text!r}")
            if all(_looks_zarr(p) for p in paths):
                ds = xr.combine_by_coords(
                    [open_zarr(p, consolidated=None, chunks={}) for p in paths],
                    combine_attrs="override",
                )
            else:
                with xr.open_dataset(paths[0]) as first:
                    n = _step_chunks(first, time_dim) if time_dim in first.dims else -1
                ds = xr.open_mfdataset(
                    paths, combine="by_coords", chunks={time_dim: n}, combine_attrs="override"
                )
        elif _looks_zarr(text):
            ds = open_zarr(text, consolidated=None, chunks={})
        else:
            if is_url(text):
                import fsspec

                ds = xr.open_dataset(fsspec.open(text, mode="rb").open(), chunks={})
            else:
                ds = xr.open_dataset(text)  # lazy backend arrays; chunked below
    except InputError:
        raise
    except (OSError, ValueError, ImportError, KeyError, TypeError) as err:
        raise InputError(f"cannot open {role} {text!r}: {err}") from None
    return ds, recorded
