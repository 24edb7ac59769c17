"""Dask plumbing: the row gather, sub-graph closures, schedulers and windowed execution."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.core import flatten, get_dependencies
from dask.highlevelgraph import HighLevelGraph

from .base import INPUT_CHUNK_BYTES, LOCAL_WORKERS, InputError


def _take_rows(local: list[np.ndarray], *chunks: np.ndarray) -> np.ndarray:
    """Rows ``local[i]`` of ``chunks[i]``, concatenated."""
    return np.concatenate([np.take(c, li, axis=0) for c, li in zip(chunks, local, strict=True)])


def _row_sources(bounds: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which input chunks hold rows ``index`` (sorted), and the rows' local indices."""
    owner = np.searchsorted(bounds, index, side="right") - 1
    ks = np.unique(owner)
    return ks, [index[owner == k] - bounds[k] for k in ks]


def _row_keys(arr: da.Array) -> list[Any]:
    """Block keys of an array chunked along axis 0 only, in row order."""
    return list(flatten(arr.__dask_keys__()))


def gather(arr: da.Array, index: np.ndarray, chunk: int) -> da.Array:
    """``arr[index]`` along axis 0 for a sorted ``index``, in chunks of ``chunk`` rows.

    Each output chunk is one task over just the input chunks holding its rows (dask's
    general fancy indexing shuffles, which holds more as the input grows).
    """
    arr = arr.rechunk({i: -1 for i in range(1, arr.ndim)})  # whole grid per chunk
    bounds = np.cumsum((0, *arr.chunks[0]))
    keys = _row_keys(arr)
    name = "gather-" + tokenize(arr.name, index, chunk)
    tail = (0,) * (arr.ndim - 1)
    layer, sizes = {}, []
    for j, start in enumerate(range(0, len(index), chunk)):
        ks, local = _row_sources(bounds, index[start : start + chunk])
        layer[(name, j, *tail)] = (partial(_take_rows, local), *[keys[k] for k in ks])
        sizes.append(sum(len(li) for li in local))
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[arr])
    chunks = (tuple(sizes), *((n,) for n in arr.shape[1:]))
    return da.Array(graph, name, chunks, meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))


def _lazy(var: xr.DataArray, dim: str) -> da.Array:
    """A dask array for ``var``; numpy-backed or lazily indexed data gets chunked."""
    if isinstance(var.data, da.Array):
        return var.data
    per_step = var.dtype.itemsize * var.size / max(var.sizes[dim], 1)
    n = max(1, int(INPUT_CHUNK_BYTES // max(per_step, 1)))
    return var.chunk({dim: n}).data


def _closure(dsk: Mapping, key: Any) -> dict:
    """The sub-graph ``key`` needs."""
    out: dict = {}
    stack = [key]
    while stack:
        k = stack.pop()
        if k not in out:
            out[k] = dsk[k]
            stack.extend(get_dependencies(dsk, k))
    return out


LOCAL_SCHEDULERS = {
    "sync": "synchronous",
    "synchronous": "synchronous",
    "single-threaded": "synchronous",
    "threads": "threads",
    "threading": "threads",
    "processes": "processes",
}


@contextlib.contextmanager
def dask_scheduler(scheduler: str | None = None, n_workers: int = LOCAL_WORKERS) -> Iterator[Any]:
    """Yield a distributed ``Client`` (or None for dask's local schedulers).

    ``None``: whatever dask uses now (an active distributed client, else threads);
    ``"local"``: a new LocalCluster of ``n_workers`` single-threaded worker processes,
    closed at the end; ``"sync"``/``"threads"``/``"processes"``: dask's local
    schedulers; anything else: the address of a running dask scheduler.
    """
    if scheduler is None:
        client = None
        if "distributed" in sys.modules:
            from distributed import default_client

            with contextlib.suppress(ValueError):
                client = default_client()
        yield client
        return
    if scheduler in LOCAL_SCHEDULERS:
        with dask.config.set(scheduler=LOCAL_SCHEDULERS[scheduler]):
            yield None
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                # CRITICAL, not ERROR: a worker's heartbeat racing the scheduler's close
                # logs an ERROR with a traceback at every shutdown (a known distributed
                # race, harmless); a failing task still raises in this process
                silence_logs=logging.CRITICAL,
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout="10s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise InputError(f"cannot connect to the dask scheduler at {scheduler!r}: {err}") from None
    try:
        yield client
    finally:
        client.close()


def _parallelism(client: Any) -> int:
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    scheduler = dask.config.get("scheduler", None)
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _has_bad(summary: dict[str, Any]) -> bool:
    return any(len(b) for b in summary["bad"])


def run_chunks(
    tasks: list[Any], client: Any = None, progress: bool = False, window: int | None = None
) -> list[dict[str, Any]]:
    """Run the chunk tasks in sample order with at most ``window`` chunks in flight.

    Backpressure keeps memory to a few chunks whatever the input size (dask's
    ordering alone reads inputs far ahead of their use when neighbouring chunks
    share input chunks). On a distributed client a sliding window of futures;
    otherwise consecutive batches through dask's current local scheduler. Stops
    at the first chunk with a non-finite value.
    """
    from tqdm.auto import tqdm

    window = window or 2 * _parallelism(client)
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    bar = tqdm(
        total=len(tasks),
        desc="increments",
        unit="chunk",
        file=sys.stderr,
        disable=not progress,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    with bar:
        if client is None:
            for start in range(0, len(tasks), window):
                batch = dask.compute(*tasks[start : start + window])
                results[start : start + len(batch)] = batch
                bar.update(len(batch))
                if any(_has_bad(r) for r in batch):
                    break
            return [r for r in results if r is not None]
        from distributed import as_completed

        pending = iter(range(len(tasks)))
        index: dict[Any, int] = {}
        for i in range(min(window, len(tasks))):
            index[client.compute(tasks[next(pending)])] = i
        done = as_completed(list(index), loop=client.loop)
        for future in done:
            i = index.pop(future)
            results[i] = future.result()
            bar.update(1)
            if _has_bad(results[i]):
                client.cancel(list(index))
                break
            nxt = next(pending, None)
            if nxt is not None:
                new = client.compute(tasks[nxt])
                index[new] = nxt
                done.add(new)
    if any(_has_bad(r) for r in results if r is not None):
        return [r for r in results if r is not None]
    return results  # type: ignore[return-value]
