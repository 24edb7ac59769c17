"""Reading a finished store back: completion marker, statistics, verification."""

from __future__ import annotations

import json
import os
from typing import Any

import xarray as xr

from correction.storage import open_zarr, url_to_fs

from .base import MARKER, SAMPLE, STATS_FILE, IncompleteStoreError
from .numerics import content_hash, sample_digests, store_order


def _read_marker(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    fs, root = url_to_fs(text)
    if not fs.exists(root):
        raise FileNotFoundError(f"no increment store at {text}")
    marker = f"{root.rstrip('/')}/{MARKER}"
    if not fs.exists(marker):
        raise IncompleteStoreError(
            f"{text} is not a complete increment store (no {MARKER} marker): the job that "
            "wrote it did not finish; rebuild it"
        )
    return fs.cat(marker).decode().strip()


def open_increments(path: str | os.PathLike) -> xr.Dataset:
    """Open a complete increment store lazily (dask-backed)."""
    marker = _read_marker(path)
    ds = open_zarr(path)
    if ds.attrs.get("content_hash") != marker:
        raise IncompleteStoreError(
            f"{os.fspath(path)}: the completion marker does not match the store's content "
            "hash; the store was modified after it was written"
        )
    return ds


def verify_increments(path: str | os.PathLike) -> str:
    """Recompute a store's content hash from its data; raise if it differs from the marker."""
    ds = open_increments(path)
    names = store_order(json.loads(ds.attrs["fields"]))
    chunk = int(ds[names[0]].encoding.get("chunks", (ds.sizes[SAMPLE],))[0])
    parts = []
    for lo in range(0, ds.sizes[SAMPLE], chunk):
        window = slice(lo, lo + chunk)
        parts.append(sample_digests([ds[name][window].values for name in names]))
    digest = content_hash(ds.compute(), b"".join(parts))
    if digest != ds.attrs["content_hash"]:
        raise IncompleteStoreError(
            f"{os.fspath(path)}: the data do not match the recorded content hash "
            f"({digest} != {ds.attrs['content_hash']})"
        )
    return digest


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """The normalisation statistics (training split) of a complete increment store."""
    _read_marker(path)
    fs, root = url_to_fs(os.fspath(path))
    return json.loads(fs.cat(f"{root.rstrip('/')}/{STATS_FILE}").decode())
