"""``build_increments``: plan, write into staging, verify, commit."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask.array as da

from correction.storage import (
    check_destination,
    commit_staging,
    discard,
    is_url,
    new_staging_path,
    remote_commit,
    remote_staging,
    remove_stale_partials,
    update_zarr_attrs,
    write_zarr,
    zarr_warnings,
)

from .base import DEFAULT_SPLIT, LOCAL_WORKERS, MARKER, SAMPLE, SPLIT_NAMES, STATS_FILE
from .graph import dask_scheduler, run_chunks
from .numerics import content_hash
from .plan import plan_increments
from .remote import check_remote_destination
from .writer import _chunk_tasks, _finalize, _nonfinite_error, _stats


@dataclass(frozen=True)
class IncrementReport:
    """What a build wrote, for the command line, tests and logs."""

    path: str
    n_samples: int
    n_candidates: int
    n_skipped_missing_analysis: int
    n_outside_analysis_period: int
    n_dropped_in_gaps: int
    splits: dict[str, Any]
    content_hash: str
    window: float
    window_units: str
    input_bytes: int
    wall_time: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        counts = ", ".join(
            f"{name} {self.splits[name]['n_samples']}"
            for name in SPLIT_NAMES
            if name in self.splits
        )
        lines = [
            f"samples {self.n_samples} ({counts}) from {self.n_candidates} forecasts; "
            f"window {self.window:g} {self.window_units}",
            f"skipped {self.n_skipped_missing_analysis} with a missing analysis "
            f"({self.n_outside_analysis_period} of them outside the analysis period); "
            f"dropped {self.n_dropped_in_gaps} in the gaps between splits",
        ]
        blocks = [
            f"{name} [{self.splits[name]['start']}, {self.splits[name]['end']}]"
            for name in SPLIT_NAMES
            if name in self.splits
        ]
        gap = self.splits.get("gap")
        lines.append("splits: " + ", ".join(blocks) + (f" (gap {gap})" if gap is not None else ""))
        lines.append(f"content hash {self.content_hash}")
        return "\n".join(lines)


def build_increments(
    analyses: Any,
    forecasts: Any,
    window: Any,
    out: str | os.PathLike,
    variables: Sequence[str] | str | None = None,
    split: Any = DEFAULT_SPLIT,
    chunk_samples: int | None = None,
    scheduler: str | None = None,
    missing: str = "skip",
    *,
    gap: Any = None,
    state: str = "analysis",
    tolerance: Any = None,
    level_dims: Sequence[str] | str | None = None,
    analysis_dims: dict[str, str] | str | None = None,
    forecast_dims: dict[str, str] | str | None = None,
    overwrite: bool = False,
    n_workers: int = LOCAL_WORKERS,
    progress: bool = False,
) -> IncrementReport:
    """Build an increment store at ``out`` from analyses and forecasts.

    ``analyses``/``forecasts``: ``xr.Dataset`` objects, or paths, globs or URLs that
    xarray opens. ``window``: a number in the data's time units, or a duration such
    as ``"6h"`` when times are datetime64. ``split``: fractions ``"0.7:0.15:0.15"``
    or time ranges ``"train=0:700,val=710:850,test=860:1000"`` (ends inclusive).
    ``scheduler``: see :func:`dask_scheduler` (``None`` = dask's current scheduler).
    ``missing="error"`` makes a missing analysis inside the analysis period an error.
    ``forecast_dims``/``analysis_dims`` rename a store's names to the pipeline's
    (``"time=init_time,step=lead_time"`` for IFS-style forecasts).
    Raises :class:`InputError` before anything is written when inputs do not fit, and
    :class:`~correction.storage.OutputExistsError` when ``out`` holds data.
    """
    t_start = time.perf_counter()
    out_text = os.fspath(out)
    remote = is_url(out_text)
    if remote:
        check_remote_destination(out_text, overwrite)
    else:
        check_destination(Path(out_text).absolute(), overwrite)
    plan = plan_increments(
        analyses,
        forecasts,
        window,
        variables=variables,
        split=split,
        gap=gap,
        chunk_samples=chunk_samples,
        missing=missing,
        state=state,
        tolerance=tolerance,
        level_dims=level_dims,
        analysis_dims=analysis_dims,
        forecast_dims=forecast_dims,
    )
    ds = plan.dataset
    cs = plan.chunk_samples
    encoding = {name: {"chunks": (cs, *var.shape[1:])} for name, var in ds.data_vars.items()}
    with dask_scheduler(scheduler, n_workers) as client, zarr_warnings():
        if remote:
            staging = store = remote_staging(out_text)
        else:
            remove_stale_partials(out_text)
            staging = new_staging_path(out_text)
            store = str(staging)
        try:
            # metadata and coordinates now (the data variables as empty placeholders);
            # the data by one task per chunk
            template = ds.copy()
            for name, var in ds.data_vars.items():
                template[name] = var.copy(
                    data=da.empty(var.shape, chunks=var.data.chunks, dtype=var.dtype)
                )
            write_zarr(template, store, encoding=encoding, compute=False)
            summary = _finalize(*run_chunks(_chunk_tasks(plan, store), client, progress))
            if any(len(b) for b in summary["bad"]):
                raise _nonfinite_error(plan, summary["bad"])
            digest = content_hash(ds, summary["digests"])
            stats = _stats(plan, summary["moments"])
            update_zarr_attrs(store, {"content_hash": digest})
            stats_text = json.dumps(stats, indent=1) + "\n"
            if remote:
                marker = (MARKER, (digest + "\n").encode())
                remote_commit(store, out_text, {STATS_FILE: stats_text.encode()}, marker)
            else:
                (staging / STATS_FILE).write_text(stats_text)
                (staging / MARKER).write_text(digest + "\n")
                commit_staging(staging, out_text, overwrite)
        except BaseException:
            discard(staging)
            raise
    path = out_text if remote else str(Path(out_text).absolute())
    return IncrementReport(
        path=path,
        n_samples=int(ds.sizes[SAMPLE]),
        n_candidates=plan.n_candidates,
        n_skipped_missing_analysis=plan.n_skipped_missing_analysis,
        n_outside_analysis_period=plan.n_outside_analysis_period,
        n_dropped_in_gaps=plan.n_dropped_in_gaps,
        splits=plan.splits,
        content_hash=digest,
        window=float(ds.attrs["window"]),
        window_units=str(ds.attrs["window_units"]),
        input_bytes=plan.input_bytes,
        wall_time=time.perf_counter() - t_start,
    )
