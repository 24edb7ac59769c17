"""The increment pipeline: alignment, store contract, laziness, safety, the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_archive, open_store, write_store

from correction.storage import OutputExistsError, open_zarr
from data_pipeline.increments import (
    MARKER,
    IncompleteStoreError,
    InputError,
    TimeAxis,
    align,
    assign_splits,
    build_increments,
    combine_moments,
    open_increments,
    parse_split,
    plan_increments,
    read_stats,
    verify_increments,
)
from mecs.cli import main

HERE = Path(__file__).parent


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _l96(tiny_synth):
    return tiny_synth / "analyses.zarr", tiny_synth / "forecasts_archive.zarr"


@pytest.fixture(scope="module")
def archive_nc(tmp_path_factory):
    """The archive as netCDF: analyses one file per day (a glob), forecasts one file."""
    root = tmp_path_factory.mktemp("archive")
    ana, fc = make_archive(n_times=16)
    days = ana["time"].dt.floor("D").values
    for day in np.unique(days):
        stamp = str(day)[:10].replace("-", "")
        ana.sel(time=days == day).to_netcdf(root / f"ana_{stamp}.nc")
    fc.to_netcdf(root / "forecasts.nc")
    return root


def _nothing_written(tmp_path: Path, keep=()) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# ----------------------------------------------------------------------------- l96 store


@pytest.fixture(scope="module")
def l96_store(tiny_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("inc") / "l96.zarr"
    ana, fc = _l96(tiny_synth)
    report = build_increments(ana, fc, 0.05, out, chunk_samples=32, scheduler="sync")
    return out, report


def test_l96_store_contract(l96_store, tiny_synth):
    out, report = l96_store
    ds = open_increments(out)
    assert isinstance(ds["state_X"].data, dask.array.Array)  # lazy
    assert set(ds.data_vars) == {"state_X", "increment_X", "target_X"}
    for role in ("state", "increment", "target"):
        var = ds[f"{role}_X"]
        assert var.dims == ("sample", "k") and var.dtype == np.float32
        assert var.attrs["role"] == role and var.attrs["field"] == "X"
        assert var.encoding["chunks"] == (32, 36)
    assert ds["state_X"].attrs["units"] == "1"
    assert ds["target_X"].attrs["units"] == "1 per model time unit"
    attrs = ds.attrs
    assert json.loads(attrs["fields"]) == ["X"]
    assert attrs["window"] == 0.05 and attrs["state_source"] == "analysis"
    sources = json.loads(attrs["sources"])
    assert sources["analyses"] == str((tiny_synth / "analyses.zarr").absolute())
    assert attrs["content_hash"] == (out / MARKER).read_text().strip() == report.content_hash
    assert attrs["n_samples"] == ds.sizes["sample"] == report.n_samples
    assert report.n_samples + report.n_skipped_missing_analysis + report.n_dropped_in_gaps == (
        report.n_candidates
    )
    # the last forecast's valid time lies past the last analysis: skipped, counted
    assert report.n_skipped_missing_analysis == report.n_outside_analysis_period == 1
    assert ds["init_time"].dtype == np.float64 and ds["valid_time"].dtype == np.float64
    assert set(np.asarray(ds["split"].values).astype(str)) == {"train", "val", "test"}
    assert "k" in ds.coords and ds["k"].values[0] == 1

    # values: increment = analysis(t + W) - forecast(t, W); target = increment / W
    ana = open_zarr(tiny_synth / "analyses.zarr")["X"]
    fc = open_zarr(tiny_synth / "forecasts_archive.zarr")["X"]
    init, valid = ds["init_time"].values, ds["valid_time"].values
    np.testing.assert_allclose(valid - init, 0.05, atol=1e-9)
    a_valid = ana.sel(time=valid).values.astype(np.float64)
    f_w = fc.sel(init_time=init).isel(lead_time=1).values.astype(np.float64)
    np.testing.assert_array_equal(ds["increment_X"].values, (a_valid - f_w).astype(np.float32))
    np.testing.assert_array_equal(ds["state_X"].values, ana.sel(time=init).values)
    np.testing.assert_allclose(ds["target_X"].values, (a_valid - f_w) / 0.05, rtol=1e-6)

    # statistics over the training split, reduced over sample and k
    stats = read_stats(out)
    train = np.asarray(ds["split"].values).astype(str) == "train"
    assert stats["count"] == train.sum() and stats["split"] == "train"
    assert stats["level_dims"] == {"X": []}
    for role in ("state", "increment", "target"):
        x = ds[f"{role}_X"].values[train].astype(np.float64)
        s = stats["fields"]["X"][role]
        assert isinstance(s["mean"], float)
        assert s["mean"] == pytest.approx(x.mean(), rel=1e-10, abs=1e-12)
        assert s["std"] == pytest.approx(x.std(), rel=1e-10)
    assert verify_increments(out) == report.content_hash


def test_splits_are_separated_blocks(l96_store):
    out, report = l96_store
    ds = open_increments(out)
    split = np.asarray(ds["split"].values).astype(str)
    init = ds["init_time"].values
    order = ["train", "val", "test"]
    gap = json.loads(ds.attrs["splits"])["gap"]
    assert gap == "0.1195"  # max(window, 1 % of the 11.95 range)
    for a, b in zip(order, order[1:], strict=False):
        assert init[split == a].max() + float(gap) <= init[split == b].min() + 1e-9
    assert report.n_dropped_in_gaps > 0


def test_numpy_and_dask_inputs_give_identical_stores(tiny_synth, tmp_path):
    ana_path, fc_path = _l96(tiny_synth)
    ana, fc = open_zarr(ana_path), open_zarr(fc_path)
    eager = (ana.load(), fc.load())
    lazy = (ana.chunk({"time": 37}), fc.chunk({"init_time": 23, "lead_time": 2}))
    assert isinstance(lazy[1]["X"].data, dask.array.Array)
    assert not isinstance(eager[1]["X"].data, dask.array.Array)
    r1 = build_increments(*eager, 0.05, tmp_path / "np.zarr", chunk_samples=50, scheduler="sync")
    r2 = build_increments(
        *lazy, 0.05, tmp_path / "dask.zarr", chunk_samples=50, scheduler="threads"
    )
    assert r1.content_hash == r2.content_hash
    assert _tree_digest(tmp_path / "np.zarr") == _tree_digest(tmp_path / "dask.zarr")
    # the content hash does not depend on chunking; the layout does
    r3 = build_increments(*lazy, 0.05, tmp_path / "c7.zarr", chunk_samples=7, scheduler="sync")
    assert r3.content_hash == r1.content_hash
    assert read_stats(tmp_path / "c7.zarr")["fields"]["X"]["target"]["std"] == pytest.approx(
        read_stats(tmp_path / "np.zarr")["fields"]["X"]["target"]["std"], rel=1e-12
    )


class CountingScheduler:
    """Like xarray's ``raise_if_dask_computes``: fail on more than ``max_computes``."""

    def __init__(self, max_computes: int) -> None:
        self.max_computes, self.count = max_computes, 0

    def __call__(self, dsk, keys, **kwargs):
        self.count += 1
        if self.count > self.max_computes:
            raise RuntimeError(f"dask computed {self.count} times, at most {self.max_computes}")
        return dask.get(dsk, keys, **kwargs)


class WriteGuard(CountingScheduler):
    """Fail if dask computes anything before the store's metadata is staged."""

    def __init__(self, root: Path) -> None:
        super().__init__(max_computes=10**6)
        self.root = root

    def __call__(self, dsk, keys, **kwargs):
        if not any(self.root.glob(".*.partial-*/zarr.json")):
            raise RuntimeError("dask computed before the write began")
        return super().__call__(dsk, keys, **kwargs)


def test_every_backend_and_store_format_gives_the_same_store(tmp_path, backend, store_format):
    """numpy- or dask-backed inputs, from zarr or netCDF: one store, and no early compute."""
    ana, fc = make_archive(n_times=16)
    fields = ["T", "q", "ps"]  # a zarr store lists its variables sorted: fix the order
    kw = {"variables": fields, "chunk_samples": 3}
    ref = build_increments(ana, fc, "6h", tmp_path / "ref.zarr", scheduler="sync", **kw)
    a = open_store(write_store(ana, tmp_path / "ana", store_format), store_format, backend)
    f = open_store(write_store(fc, tmp_path / "fc", store_format), store_format, backend)
    is_dask = isinstance(a["T"].data, dask.array.Array)
    assert is_dask == (backend == "dask")
    with dask.config.set(scheduler=CountingScheduler(max_computes=0)):
        plan = plan_increments(a, f, "6h", **kw)  # metadata only
    assert plan.dataset.sizes["sample"] == ref.n_samples
    out = tmp_path / "out.zarr"
    report = build_increments(a, f, "6h", out, scheduler="sync", **kw)
    assert report.content_hash == ref.content_hash
    ds = open_increments(out)
    assert np.issubdtype(ds["init_time"].dtype, np.datetime64)
    assert ds["target_T"].attrs["units"] == "K per hour"
    np.testing.assert_allclose(ds["target_T"].values, 0.1, atol=2e-3)


def test_inputs_are_read_only_by_the_write(tiny_synth, tmp_path):
    """Validation and the graph read no data; the data are read by the write alone."""
    ana, fc = _l96(tiny_synth)
    with dask.config.set(scheduler=CountingScheduler(max_computes=0)):
        plan = plan_increments(ana, fc, 0.05)
        with pytest.raises(RuntimeError, match="computed 1 times"):
            plan.dataset["increment_X"].values  # noqa: B018 (an eager read trips the guard)
    guard = WriteGuard(tmp_path)
    with dask.config.set(scheduler=guard):
        report = build_increments(ana, fc, 0.05, tmp_path / "s.zarr", chunk_samples=64)
    assert 1 <= guard.count <= math.ceil(report.n_samples / 64)  # batches of chunks
    with dask.config.set(scheduler=WriteGuard(tmp_path / "nowhere")), pytest.raises(RuntimeError):
        dask.array.ones(3).sum().compute()  # the guard itself works


def test_distributed_local_cluster(tiny_synth, tmp_path, l96_store):
    """Two worker processes through --scheduler ADDRESS give the same store."""
    from distributed import LocalCluster

    ana, fc = _l96(tiny_synth)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    ) as cluster:
        report = build_increments(
            ana,
            fc,
            0.05,
            tmp_path / "d.zarr",
            chunk_samples=32,
            scheduler=cluster.scheduler_address,
            progress=True,
        )
    assert report.content_hash == l96_store[1].content_hash
    assert _tree_digest(tmp_path / "d.zarr") == _tree_digest(l96_store[0])


def test_kill_and_rerun(tiny_synth, tmp_path, l96_store):
    ana, fc = _l96(tiny_synth)
    out, flag = tmp_path / "k.zarr", tmp_path / "started"
    job = [sys.executable, str(HERE / "increments_job.py"), str(ana), str(fc), str(out), "32"]
    proc = subprocess.Popen([*job, str(flag), "0.5"])
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".k.zarr.partial-")]
        assert len(partial) == 1 and any(partial[0].rglob("c/*"))  # chunks were written
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        open_increments(out)
    # a reader pointed at the partial store refuses it
    with pytest.raises(IncompleteStoreError):
        open_increments(partial[0])
    subprocess.run(job, check=True, timeout=120)
    assert _tree_digest(out) == _tree_digest(l96_store[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.zarr", "started"]  # stale removed


def test_state_from_lead_zero_forecast(tiny_synth, tmp_path, l96_store):
    ana, fc = _l96(tiny_synth)
    build_increments(
        ana, fc, 0.05, tmp_path / "f.zarr", chunk_samples=32, scheduler="sync", state="forecast"
    )
    a, b = open_increments(tmp_path / "f.zarr"), open_increments(l96_store[0])
    assert a.attrs["state_source"] == "forecast-lead-0"
    # the synthetic archive's lead 0 is the analysis itself
    np.testing.assert_array_equal(a["state_X"].values, b["state_X"].values)


# ----------------------------------------------------------------------------- archives


def test_netcdf_archive_with_levels_and_datetimes(archive_nc, tmp_path):
    ana, fc = str(archive_nc / "ana_*.nc"), str(archive_nc / "forecasts.nc")
    report = build_increments(
        ana,
        fc,
        "6h",
        tmp_path / "a.zarr",
        split="0.5:0.25:0.25",
        scheduler="threads",
        chunk_samples=2,
    )
    ds = open_increments(tmp_path / "a.zarr")
    assert json.loads(ds.attrs["fields"]) == ["T", "q", "ps"]
    assert ds["state_T"].dims == ("sample", "isobaric", "lat", "lon")
    assert ds["state_ps"].dims == ("sample", "lat", "lon")
    assert ds["target_T"].attrs["units"] == "K per hour"
    assert ds["increment_q"].attrs["units"] == "kg kg-1"
    assert (ds.attrs["window"], ds.attrs["window_iso"], ds.attrs["window_units"]) == (
        6.0,
        "PT6H",
        "hours",
    )
    assert np.issubdtype(ds["init_time"].dtype, np.datetime64)
    np.testing.assert_array_equal(
        ds["valid_time"].values - ds["init_time"].values, np.timedelta64(6, "h")
    )
    # forecasts drift by -0.1 K per hour and by +2 Pa per hour
    np.testing.assert_allclose(ds["target_T"].values, 0.1, atol=2e-3)
    np.testing.assert_allclose(ds["target_ps"].values, -2.0, atol=2e-2)
    stats = read_stats(tmp_path / "a.zarr")
    assert stats["level_dims"] == {"T": ["isobaric"], "q": ["isobaric"], "ps": []}
    assert np.shape(stats["fields"]["T"]["state"]["mean"]) == (3,)
    assert isinstance(stats["fields"]["ps"]["target"]["std"], float)
    t = ds["state_T"].values[np.asarray(ds["split"].values).astype(str) == "train"]
    np.testing.assert_allclose(
        stats["fields"]["T"]["state"]["mean"], t.mean(axis=(0, 2, 3)), rtol=1e-6
    )
    splits = json.loads(ds.attrs["splits"])
    assert splits["train"]["start"] == "2021-01-01T00:00:00"
    # init times every 12 h over 3.5 days (16 analyses): the last forecast's valid time
    # is the last analysis, so nothing is missing
    assert report.n_candidates == 8 and report.n_skipped_missing_analysis == 0


def test_time_range_splits_with_dates(archive_nc, tmp_path):
    ana, fc = str(archive_nc / "ana_*.nc"), str(archive_nc / "forecasts.nc")
    spec = "train=2021-01-01:2021-01-02T12:00,val=2021-01-03T00:00:2021-01-03T00:00"
    report = build_increments(
        ana, fc, "6h", tmp_path / "r.zarr", split=spec, variables="ps", scheduler="sync"
    )
    assert report.splits["train"]["n_samples"] == 4 and report.splits["val"]["n_samples"] == 1
    assert report.n_dropped_in_gaps == 3 and "test" not in report.splits


# ----------------------------------------------------------------------------- bad inputs


def _bad_inputs(case):
    ana, fc = make_archive(n_times=12)
    if case == "grid size":
        fc = fc.isel(lat=slice(0, 3))
    elif case == "grid coordinate":
        fc = fc.assign_coords(lat=fc["lat"] + 1.0)
    elif case == "lead":
        fc = fc.isel(lead_time=[0, 2])
    elif case == "non-monotonic":
        ana = ana.isel(time=[0, 2, 1, *range(3, 12)])
    elif case == "duplicate":
        ana = ana.assign_coords(
            time=np.concatenate([ana["time"].values[:3], ana["time"].values[2:-1]])
        )
    elif case == "nan":
        ana["q"][7, 1, 2, 3] = np.nan
    elif case == "forecast nan":
        fc["T"][2, 1, 0, 0] = np.nan
    elif case == "units":
        fc["T"].attrs["units"] = "degC"
    elif case == "missing variable":
        fc = fc.drop_vars("q")
    elif case == "time kinds":
        ana = ana.assign_coords(time=np.arange(12.0) * 6)
    return ana, fc


@pytest.mark.parametrize(
    "case, message",
    [
        ("grid size", r"variable 'T': grid dim 'lat' has size 4 in the analyses and 3"),
        ("grid coordinate", r"variable 'T': coordinate 'lat' differs"),
        ("lead", r"no lead_time equal to the window 6h"),
        ("non-monotonic", r"analyses' time is not monotonic increasing: 2021-01-01T06:00:00"),
        ("duplicate", r"analyses' time has duplicate times: 2021-01-01T12:00:00"),
        ("nan", r"NaN or inf in analyses variable 'q' at time 2021-01-02T18:00:00"),
        ("forecast nan", r"NaN or inf in forecasts variable 'T' at init_time 2021-01-02T00:00"),
        ("units", r"variable 'T': units differ: analyses in 'K', forecasts in 'degC'"),
        ("missing variable", r"variable 'q' is not in the forecasts"),
        ("time kinds", r"both must be numeric or both datetime64"),
    ],
)
def test_bad_inputs_are_rejected_before_any_write(tmp_path, case, message):
    ana, fc = _bad_inputs(case)
    with pytest.raises(InputError, match=message):
        build_increments(ana, fc, "6h", tmp_path / "bad.zarr", scheduler="sync")
    _nothing_written(tmp_path)


def test_missing_analyses_skip_or_error(tmp_path):
    ana, fc = make_archive(n_times=16)
    holed = ana.drop_isel(time=[5, 9])  # valid times of two forecasts (and a state)
    report = build_increments(holed, fc, "6h", tmp_path / "s.zarr", scheduler="sync", split="1")
    assert report.n_skipped_missing_analysis == 2 and report.n_outside_analysis_period == 0
    assert report.n_samples == 6 and report.n_dropped_in_gaps == 0
    with pytest.raises(InputError, match=r"2 forecast\(s\) have no analysis .* 2021-01-02T06:00"):
        build_increments(holed, fc, "6h", tmp_path / "e.zarr", missing="error")
    _nothing_written(tmp_path, keep=["s.zarr"])


@pytest.mark.parametrize(
    "window, message",
    [(6, "has no unit"), ("6 parsecs", "not a duration"), ("-6h", "must be positive")],
)
def test_bad_window(tmp_path, window, message):
    ana, fc = make_archive(n_times=8)
    with pytest.raises(InputError, match=message):
        build_increments(ana, fc, window, tmp_path / "w.zarr")
    _nothing_written(tmp_path)


def test_existing_output_is_kept(tmp_path, tiny_synth):
    ana, fc = _l96(tiny_synth)
    out = tmp_path / "o.zarr"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExistsError):
        build_increments(ana, fc, 0.05, out)
    assert [p.name for p in tmp_path.iterdir()] == ["o.zarr"]


def test_incomplete_store_is_refused(l96_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(l96_store[0], copy)
    (copy / MARKER).unlink()
    with pytest.raises(IncompleteStoreError, match="not a complete increment store"):
        open_increments(copy)
    with pytest.raises(IncompleteStoreError):
        read_stats(copy)
    (copy / MARKER).write_text("0" * 64 + "\n")
    with pytest.raises(IncompleteStoreError, match="does not match"):
        open_increments(copy)


def test_fsspec_urls(tiny_synth, l96_store):
    """Inputs and output through fsspec URLs (here the in-memory file system)."""
    ana, fc = _l96(tiny_synth)
    for path in (ana, fc):
        open_zarr(path).to_zarr(
            f"memory://increments-in/{path.name}", zarr_format=3, consolidated=True
        )
    ana, fc = (
        "memory://increments-in/analyses.zarr",
        "memory://increments-in/forecasts_archive.zarr",
    )
    url = "memory://increments-test/l96.zarr"
    report = build_increments(ana, fc, 0.05, url, chunk_samples=64, scheduler="sync")
    assert report.content_hash == l96_store[1].content_hash  # the same data, wherever it lies
    ds = open_increments(url)
    assert json.loads(ds.attrs["sources"])["analyses"] == ana
    assert ds.attrs["content_hash"] == report.content_hash
    assert read_stats(url)["count"] > 0
    # object stores cannot rename: a store whose marker never came is rebuilt on rerun
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.rm("/increments-test/l96.zarr/.mecs-complete")
    with pytest.raises(IncompleteStoreError):
        open_increments(url)
    again = build_increments(ana, fc, 0.05, url, chunk_samples=64, scheduler="sync")
    assert again.content_hash == report.content_hash and open_increments(url).sizes["sample"]
    with pytest.raises(OutputExistsError):
        build_increments(ana, fc, 0.05, url, chunk_samples=64, scheduler="sync")
    fs.rm("/increments-test", recursive=True)
    fs.rm("/increments-in", recursive=True)


# ----------------------------------------------------------------------------- properties


@st.composite
def time_grids(draw):
    """Analysis times on a random integer grid with holes; forecasts at random times."""
    step = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(3, 40))
    full = np.arange(n) * step + draw(st.integers(-5, 5))
    keep = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    ana = full[keep] if keep.sum() >= 1 else full[:1]
    init = np.unique(
        np.array(draw(st.lists(st.integers(-10, n * step + 10), min_size=1, max_size=30)))
    )
    window = step * draw(st.integers(1, 3))
    return ana.astype(float), init.astype(float), float(window)


@settings(max_examples=150, deadline=None)
@given(time_grids(), st.booleans(), st.floats(0, 0.4))
def test_alignment_property(grids, with_state, jitter):
    ana, init, window = grids
    ana_j = ana + jitter * 0.1  # matches within the tolerance
    al = align(ana_j, init, window, tol=0.05, state_from_analysis=with_state)
    have = set(ana.tolist())
    assert len(al.init_index) + len(al.skipped) == len(init)
    assert np.all(np.diff(al.init_index) > 0)
    for i, v in zip(al.init_index, al.valid_index, strict=True):
        assert abs(ana_j[v] - (init[i] + window)) <= 0.05
    if with_state:
        for i, s in zip(al.init_index, al.state_index, strict=True):
            assert ana[s] == init[i]
    for i, out in zip(al.skipped, al.outside, strict=True):
        needed = [init[i] + window] + ([init[i]] if with_state else [])
        assert any(t not in have for t in needed)
        beyond = any(t < ana.min() or t > ana.max() for t in needed)
        assert out == beyond


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 500), min_size=2, max_size=60, unique=True),
    st.sampled_from(["0.7:0.15:0.15", "0.6:0.2:0.2", "0.8:0.2", "0.5:0.1:0.1"]),
    st.floats(0, 20),
)
def test_split_blocks_property(times, spec, gap):
    init = np.sort(np.array(times, dtype=float))
    plan = assign_splits(init, spec, TimeAxis("numeric"), window=1.0, gap=gap)
    labels = plan.labels
    order = [n for n in ("train", "val", "test") if n in plan.record]
    seen = [lab for lab in labels if lab]
    # contiguous blocks in time order, never interleaved
    runs = [lab for i, lab in enumerate(seen) if i == 0 or seen[i - 1] != lab]
    assert runs == [n for n in order if n in runs]
    for a, b in zip(order, order[1:], strict=False):
        ta, tb = init[labels == a], init[labels == b]
        if len(ta) and len(tb):
            assert tb.min() - ta.max() >= gap - 1e-9
    assert labels[0] == "train" or not (labels == "train").any()  # train starts at t0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(time_grids(), st.integers(1, 5))
def test_build_matches_brute_force(grids, chunk):
    """End to end on random time grids with gaps: every sample is what it should be."""
    ana_t, init_t, window = grids
    rng = np.random.default_rng(len(ana_t) * 1000 + len(init_t))
    ana = xr.Dataset(
        {"u": (("time", "x"), rng.standard_normal((len(ana_t), 3)))},
        coords={"time": ana_t, "x": [0, 1, 2]},
    )
    leads = np.array([0.0, window, 2 * window])
    fc = xr.Dataset(
        {"u": (("init_time", "lead_time", "x"), rng.standard_normal((len(init_t), 3, 3)))},
        coords={"init_time": init_t, "lead_time": leads, "x": [0, 1, 2]},
    )
    expected = {}
    have = {t: i for i, t in enumerate(ana_t)}
    for i, t in enumerate(init_t):
        if t + window in have and t in have:
            inc = ana["u"].values[have[t + window]] - fc["u"].values[i, 1]
            expected[t] = (ana["u"].values[have[t]], inc)
    if not expected:
        with pytest.raises(InputError, match="no forecast has the analyses"):
            plan_increments(ana, fc, window)
        return
    ds = plan_increments(ana, fc, window, split="1", chunk_samples=chunk).dataset.compute()
    assert ds.sizes["sample"] == len(expected)
    for j, t in enumerate(ds["init_time"].values):
        state, inc = expected[t]
        np.testing.assert_array_equal(ds["state_u"].values[j], state.astype(np.float32))
        np.testing.assert_array_equal(ds["increment_u"].values[j], inc.astype(np.float32))
        np.testing.assert_allclose(ds["target_u"].values[j], inc / window, rtol=1e-6)


def test_moments_are_numerically_stable():
    from data_pipeline.increments.numerics import _moments

    rng = np.random.default_rng(0)
    x = 1e8 + rng.standard_normal(10_000)  # a large offset: naive sums lose every digit
    parts = [_moments(c, ()) for c in np.array_split(x, 37)]
    acc = (0, 0.0, 0.0)
    for p in parts:
        acc = combine_moments(acc, p)
    n, mean, m2 = acc
    assert n == x.size
    assert mean == pytest.approx(x.mean(), rel=1e-15)
    assert np.sqrt(m2 / n) == pytest.approx(x.std(), rel=1e-9)


def test_parse_split_forms():
    assert parse_split("0.7:0.15:0.15") == ("fractions", (0.7, 0.15, 0.15))
    assert parse_split(None) == ("fractions", (0.7, 0.15, 0.15))
    assert parse_split("train=0:700,val=710:850")[1] == {"train": "0:700", "val": "710:850"}
    for bad, message in [
        ("0.7:0.5", "add up"),
        ("bogus=1:2", "NAME=START:END"),
        ("a:b", "neither fractions"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_split(bad)
    with pytest.raises(InputError, match="overlap"):
        assign_splits(np.arange(10.0), "train=0:5,val=5:9", TimeAxis("numeric"), 1.0)


# ----------------------------------------------------------------------------- CLI


def test_cli_builds_and_reports(tiny_synth, tmp_path, capsys, l96_store):
    ana, fc = _l96(tiny_synth)
    out = tmp_path / "cli.zarr"
    code = main(
        [
            "increments",
            "--analyses",
            str(ana),
            "--forecasts",
            str(fc),
            "--window",
            "0.05",
            "--out",
            str(out),
            "--chunk-samples",
            "32",
            "--scheduler",
            "sync",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0
    assert str(out.absolute()) in printed.out and "samples" in printed.out
    assert l96_store[1].content_hash in printed.out
    assert _tree_digest(out) == _tree_digest(l96_store[0])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--window", "0.07"], "no lead_time equal to the window 0.07"),
        (["--window", "6h"], "is not a number"),
        (["--window", "0.05", "--variables", "Y"], "variable 'Y' is not in the analyses"),
        (["--window", "0.05", "--split", "0.9:0.9"], "add up to 1.8"),
        (["--window", "0.05", "--chunk-samples", "0"], "must be at least 1"),
    ],
)
def test_cli_bad_inputs(tiny_synth, tmp_path, capsys, extra, message):
    ana, fc = _l96(tiny_synth)
    out = tmp_path / "bad.zarr"
    code = main(
        [
            "increments",
            "--analyses",
            str(ana),
            "--forecasts",
            str(fc),
            "--out",
            str(out),
            "--scheduler",
            "sync",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    _nothing_written(tmp_path)


def test_cli_missing_input_file(tmp_path, capsys):
    code = main(
        [
            "increments",
            "--analyses",
            str(tmp_path / "none.nc"),
            "--forecasts",
            str(tmp_path / "none.zarr"),
            "--window",
            "1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot open analyses" in err and "\n" not in err
    _nothing_written(tmp_path)


def test_import_is_light():
    code = (
        "import sys, data_pipeline; "
        "assert 'dask' not in sys.modules and 'xarray' not in sys.modules; "
        "assert callable(data_pipeline.build_increments)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.slow
def test_cli_default_local_cluster(tiny_synth, tmp_path):
    """The console script's default: its own LocalCluster, a progress bar on stderr."""
    ana, fc = _l96(tiny_synth)
    out = tmp_path / "lc.zarr"
    env = {**os.environ, "TERM": "dumb"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mecs",
            "increments",
            "--analyses",
            str(ana),
            "--forecasts",
            str(fc),
            "--window",
            "0.05",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Completed" in proc.stderr or "%" in proc.stderr
    verify_increments(out)


def test_ifs_style_names_are_mapped_and_bare_windows_refused(tmp_path, capsys):
    """Forecasts with IFS's ``time``/``step`` names; ``--window 6`` on datetime data."""
    ana, fc = make_archive()
    ifs = fc.rename({"init_time": "time", "lead_time": "step"})
    a = write_store(ana, tmp_path / "ana", "netcdf")
    f = write_store(ifs, tmp_path / "fc", "netcdf")
    base = ["increments", "--analyses", str(a), "--forecasts", str(f), "--scheduler", "sync"]
    code = main([*base, "--window", "6h", "--out", str(tmp_path / "no.zarr")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--dims time=init_time,step=lead_time" in err and "\n" not in err, err
    code = main(
        [
            *base,
            "--window",
            "6",
            "--dims",
            "time=init_time,step=lead_time",
            "--out",
            str(tmp_path / "bare.zarr"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'6' has no unit" in err and "'6h'" in err, err
    code = main(
        [
            *base,
            "--window",
            "6h",
            "--dims",
            "time=init_time,stp=lead_time",
            "--out",
            str(tmp_path / "typo.zarr"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot rename 'stp'" in err, err
    out = tmp_path / "ok.zarr"
    code = main(
        [
            *base,
            "--window",
            "6h",
            "--dims",
            "time=init_time,step=lead_time",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    ref = tmp_path / "ref.zarr"
    g = write_store(fc, tmp_path / "fc_std", "netcdf")
    main(
        [
            "increments",
            "--analyses",
            str(a),
            "--forecasts",
            str(g),
            "--scheduler",
            "sync",
            "--window",
            "6h",
            "--out",
            str(ref),
            "--no-progress",
        ]
    )
    assert open_zarr(out).attrs["content_hash"] == open_zarr(ref).attrs["content_hash"]


def test_every_stage_takes_a_config_file_of_its_options(tmp_path, capsys):
    """``--config`` gives options (a required one too); the command line wins; typos are named."""
    ana, fc = make_archive()
    a = write_store(ana, tmp_path / "ana", "netcdf")
    f = write_store(
        fc.rename({"init_time": "time", "lead_time": "step"}), tmp_path / "fc", "netcdf"
    )
    cfg = tmp_path / "inc.toml"
    cfg.write_text('window = "6h"\ndims = "time=init_time,step=lead_time"\nscheduler = "sync"\n')
    out = tmp_path / "o.zarr"
    code = main(
        [
            "increments",
            "--config",
            str(cfg),
            "--analyses",
            str(a),
            "--forecasts",
            str(f),
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert open_zarr(out).attrs["window_iso"] == "PT6H"
    code = main(
        [
            "increments",
            "--config",
            str(cfg),
            "--window",
            "12h",
            "--analyses",
            str(a),
            "--forecasts",
            str(f),
            "--out",
            str(tmp_path / "o12.zarr"),
            "--no-progress",
        ]
    )
    assert code == 0 and open_zarr(tmp_path / "o12.zarr").attrs["window_iso"] == "PT12H"
    cfg.write_text('windoe = "6h"\n')
    code = main(
        [
            "increments",
            "--config",
            str(cfg),
            "--analyses",
            str(a),
            "--forecasts",
            str(f),
            "--out",
            str(tmp_path / "x.zarr"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown option 'windoe'" in err and "\n" not in err, err
    for command in ("verify", "evaluate", "forecast", "serve", "demo"):  # all accept both
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "--config" in text and "--no-progress" in text, command
