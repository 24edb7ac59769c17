"""Per-chunk numerics: increments and targets, moments, digests and the content hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .base import HASH_VERSION, ROLES


def _moments(x: np.ndarray, level_axes: tuple[int, ...]) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) over every axis but ``level_axes``, in float64."""
    x = np.asarray(x, dtype=np.float64)
    x = np.moveaxis(x, level_axes, tuple(range(len(level_axes))))
    lshape = x.shape[: len(level_axes)]
    x = x.reshape(*lshape, -1)
    n = x.shape[-1]
    if n == 0:
        return 0, np.zeros(lshape), np.zeros(lshape)
    mean = x.mean(axis=-1)
    m2 = ((x - mean[..., None]) ** 2).sum(axis=-1)
    return n, mean, m2


def combine_moments(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s parallel combination of (count, mean, M2)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


def sample_digests(blocks: Sequence[np.ndarray]) -> bytes:
    """sha256 of each sample's little-endian float32 bytes across ``blocks``, joined."""
    n = blocks[0].shape[0]
    rows = np.concatenate(
        [np.ascontiguousarray(b, dtype="<f4").reshape(n, -1).view(np.uint8) for b in blocks],
        axis=1,
    )
    return b"".join(hashlib.sha256(row).digest() for row in rows)


def outputs(
    a_valid: np.ndarray, f_w: np.ndarray, s_in: np.ndarray, w_units: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(state, increment, target) as float32; the difference is taken in float64."""
    inc64 = np.asarray(a_valid, dtype=np.float64) - np.asarray(f_w, dtype=np.float64)
    return (
        np.asarray(s_in).astype(np.float32),
        inc64.astype(np.float32),
        (inc64 / w_units).astype(np.float32),
    )


def _role_block(a_valid, f_w, s_in, role: str, w_units: float) -> np.ndarray:
    return outputs(a_valid, f_w, s_in, w_units)[ROLES.index(role)]


def _summarise(
    offset: int, train: tuple[int, int], level_axes: list[tuple[int, ...]], blocks: list
) -> dict[str, Any]:
    """Per-sample digests, non-finite samples and training moments of one sample chunk.

    ``blocks`` are the output blocks in store order; ``level_axes`` one entry per block.
    """
    n = blocks[0].shape[0]
    bad, moments = [], []
    lo, hi = max(train[0] - offset, 0), min(train[1] - offset, n)
    for b, axes in zip(blocks, level_axes, strict=True):
        finite = np.isfinite(b).reshape(n, -1).all(axis=1)
        bad.append(offset + np.flatnonzero(~finite))
        moments.append(_moments(b[lo:hi], axes) if hi > lo else None)
    return {"digests": sample_digests(blocks), "bad": bad, "moments": moments}


def _hash_array(h: Any, name: str, values: np.ndarray) -> None:
    values = np.asarray(values)
    h.update(f"{name}\0{values.shape}\0".encode())
    if values.dtype.kind in "mM":  # resolution-independent: int64 nanoseconds
        unit = "datetime64[ns]" if values.dtype.kind == "M" else "timedelta64[ns]"
        values = values.astype(unit).view(np.int64)
        h.update(b"time-ns\0")
    if values.dtype.kind in "OUST":
        h.update(b"str\0" + "\0".join(str(v) for v in values.ravel()).encode())
    else:
        h.update(values.dtype.str.encode() + b"\0")
        h.update(np.ascontiguousarray(values).tobytes())


def store_order(fields: Sequence[str]) -> list[str]:
    """Data variables in store order: state, increment, target of each field."""
    return [f"{role}_{f}" for f in fields for role in ROLES]


def content_hash(ds: xr.Dataset, digests: bytes) -> str:
    """sha256 over coordinates, variable headers and the per-sample digests.

    Each sample's digest is the sha256 of its float32 bytes (little-endian) across
    every data variable in store order (:func:`store_order`), so the hash does not
    depend on chunking or on the order in which chunks were computed.
    """
    h = hashlib.sha256(HASH_VERSION)
    for name in sorted(ds.coords):
        _hash_array(h, str(name), ds.coords[name].values)
    for name in store_order(json.loads(ds.attrs["fields"])):
        var = ds[name]
        h.update(f"{name}\0{var.dims}\0{var.shape}\0{var.dtype.str}\0".encode())
    h.update(digests)
    return h.hexdigest()
