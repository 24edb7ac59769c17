"""The one-pass chunk tasks: each reads its rows once, writes zarr, returns its summary."""

from __future__ import annotations

import functools
from functools import partial
from typing import Any

import dask
import numpy as np
from dask.base import tokenize

from .base import InputError
from .graph import _closure, _row_keys, _row_sources, _take_rows
from .numerics import _summarise, combine_moments, outputs, store_order
from .plan import IncrementPlan


def _chunk_task(
    store: str,
    names: list[str],
    level_axes: list[tuple[int, ...]],
    offset: int,
    train: tuple[int, int],
    w_units: float,
    layout: list[list[np.ndarray]],
    *chunks: np.ndarray,
) -> dict[str, Any]:
    """Gather, compute, check, summarise and write one chunk of samples (all variables).

    For each field, the inputs are (analysis at the valid time, forecast, state
    source); input ``i`` takes rows ``layout[i][m]`` of the next ``len(layout[i])``
    of ``chunks``. Taking the rows here, in the task that consumes them, keeps
    memory to the chunk's own input and output blocks. A chunk with a non-finite
    value is not written (the build then fails and discards the store).
    """
    inputs, pos = [], 0
    for local in layout:
        inputs.append(_take_rows(local, *chunks[pos : pos + len(local)]))
        pos += len(local)
    blocks: list[np.ndarray] = []
    for k in range(0, len(inputs), 3):
        blocks.extend(outputs(*inputs[k : k + 3], w_units))
    summary = _summarise(offset, train, level_axes, blocks)
    if not any(len(b) for b in summary["bad"]):
        for name, block in zip(names, blocks, strict=True):
            _zarr_array(store, name)[offset : offset + block.shape[0]] = block
    return summary


@functools.lru_cache(maxsize=64)
def _zarr_array(store: str, name: str) -> Any:
    """An array of a store being written (opened once per process)."""
    import zarr

    return zarr.open_array(store, path=name, mode="r+", zarr_format=3)


def _finalize(*summaries: dict[str, Any]) -> dict[str, Any]:
    """Join the chunk summaries in sample order."""
    digests = b"".join(s["digests"] for s in summaries)
    n_vars = len(summaries[0]["bad"]) if summaries else 0
    bad = [np.concatenate([s["bad"][v] for s in summaries]) for v in range(n_vars)]
    moments = []
    for v in range(n_vars):
        acc = (0, 0.0, 0.0)
        for s in summaries:
            if s["moments"][v] is not None:
                acc = combine_moments(acc, s["moments"][v])
        moments.append(acc)
    return {"digests": digests, "bad": bad, "moments": moments}


def _chunk_tasks(plan: IncrementPlan, store: str) -> list[Any]:
    """One dask task per chunk of samples: gathered, computed, written, summarised.

    Each is a ``Delayed`` over its own culled sub-graph, so running chunks one window
    at a time costs in proportion to the chunk, not to the whole input graph.
    """
    from dask.array.optimization import optimize
    from dask.delayed import Delayed

    ds = plan.dataset
    names = store_order(plan.fields)
    level_axes = []
    for name in names:
        var = ds[name]
        level_axes.append(tuple(var.dims.index(d) for d in plan.level_dims[var.attrs["field"]]))
    dsk: dict = {}
    sources = []  # (block keys, bounds, index) per field and role, store order
    for f in plan.fields:
        for role in ("analysis_valid", "forecast", "state"):
            arr, index = plan.rows[f][role]
            keys = _row_keys(arr)
            if keys[0] not in dsk:
                dsk.update(optimize(arr.__dask_graph__(), keys))
            sources.append((keys, np.cumsum((0, *arr.chunks[0])), index))
    n, cs = len(sources[0][2]), plan.chunk_samples
    w_units = plan.axis.to_units(plan.window)
    name = "increments-chunk-" + tokenize(store, plan.sources, n, cs)
    task_keys = []
    for j, start in enumerate(range(0, n, cs)):
        layout, refs = [], []
        for keys, bounds, index in sources:
            ks, local = _row_sources(bounds, index[start : start + cs])
            layout.append(local)
            refs.extend(keys[k] for k in ks)
        run = partial(
            _chunk_task, store, names, level_axes, start, plan.train_range, w_units, layout
        )
        dsk[(name, j)] = (run, *refs)
        task_keys.append((name, j))
    return [Delayed(k, _closure(dsk, k)) for k in task_keys]


def _stats(plan: IncrementPlan, moments: list[tuple]) -> dict[str, Any]:
    out: dict[str, Any] = {"fields": {}, "level_dims": {}, "reduced_dims": {}}
    names = store_order(plan.fields)
    count = plan.train_range[1] - plan.train_range[0]
    for name, (n, mean, m2) in zip(names, moments, strict=True):
        var = plan.dataset[name]
        f, role = var.attrs["field"], var.attrs["role"]
        std = np.sqrt(np.maximum(np.asarray(m2) / max(n, 1), 0.0))
        out["fields"].setdefault(f, {})[role] = {
            "mean": np.asarray(mean, dtype=np.float64).tolist(),
            "std": std.tolist(),
        }
        out["level_dims"][f] = list(plan.level_dims[f])
        out["reduced_dims"][f] = [d for d in var.dims if d not in plan.level_dims[f]]
    out["count"] = int(count)
    out["split"] = "train"
    return out


def _nonfinite_error(plan: IncrementPlan, bad: list[np.ndarray]) -> InputError:
    """Name the variable, the input and the time of the first non-finite sample."""
    names = store_order(plan.fields)
    first = min((int(b[0]), v) for v, b in enumerate(bad) if len(b))
    i, v = first
    f = plan.dataset[names[v]].attrs["field"]
    n_bad = len(np.unique(np.concatenate([b for b in bad if len(b)])))
    axis = plan.axis
    # look at the few input values of that sample (a tiny compute)
    parts = dask.compute({k: a[i] for k, a in plan.inputs[f].items()}, scheduler="sync")[0]
    t_init, t_valid = axis.fmt(plan.sample_init[i]), axis.fmt(plan.sample_valid[i])
    if not np.isfinite(parts["analysis_valid"]).all():
        where = f"analyses variable {f!r} at time {t_valid} (the valid time of the forecast "
        where += f"from {t_init})"
    elif not np.isfinite(parts["forecast"]).all():
        lead = axis.fmt_span(plan.window)
        where = f"forecasts variable {f!r} at init_time {t_init}, lead_time {lead}"
    elif not np.isfinite(parts["state"]).all():
        src = "analyses" if plan.dataset.attrs["state_source"] == "analysis" else "forecasts"
        where = f"{src} variable {f!r} at time {t_init} (the state of the sample)"
    else:
        where = f"the increment of {f!r} from {t_init} (overflow in float32)"
    return InputError(f"NaN or inf in {where}; {n_bad} sample(s) affected")
