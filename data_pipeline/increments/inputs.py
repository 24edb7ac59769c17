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


def parse_renames(value: Any, what: str) -> dict[str, str]:
    """``"time=init_time,step=lead_time"`` (or a mapping) -> ``{"time": "init_time", ...}``."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        pairs = list(value.items())
    else:
        pairs = []
        for item in str(value).split(","):
            old, sep, new = item.partition("=")
            if not sep or not old.strip() or not new.strip():
                raise InputError(f"{what}: {item.strip()!r} is not NAME=NEW (e.g. step=lead_time)")
            pairs.append((old.strip(), new.strip()))
    out = {str(a): str(b) for a, b in pairs}
    if len(set(out.values())) != len(out):
        raise InputError(f"{what}: two names map to the same new name ({out})")
    return out


def _rename(ds: xr.Dataset, renames: dict[str, str], role: str) -> xr.Dataset:
    """The pipeline's names for another convention's (IFS ``time``/``step``, ...)."""
    if not renames:
        return ds
    names = set(ds.dims) | set(ds.variables)
    missing = [k for k in renames if k not in names]
    if missing:
        raise InputError(
            f"{role}: cannot rename {missing[0]!r}: no dimension or variable of that name "
            f"(dims {sorted(map(str, ds.dims))})"
        )
    clash = [v for k, v in renames.items() if v in names and v not in renames]
    if clash:
        raise InputError(f"{role}: cannot rename to {clash[0]!r}: the store already has it")
    return ds.rename(renames)


def open_input(
    source: Any, role: str, time_dim: str, renames: dict[str, str] | None = None
) -> tuple[xr.Dataset, str]:
    """Open analyses or forecasts lazily; return the dataset and its recorded source.

    ``renames`` maps the store's own names to the pipeline's (``--dims``).
    """
    renames = renames or {}
    if isinstance(source, xr.DataArray):
        source = source.to_dataset()
    if isinstance(source, xr.Dataset):
        return _rename(source, renames, role), IN_MEMORY
    # the time dimension as the files call it, for chunking before the rename
    time_dim = next((k for k, v in renames.items() if v == time_dim), time_dim)
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
    return _rename(ds, renames, role), recorded
