"""Recording what the service corrected, for live skill monitoring (``mecs monitor``).

Off by default. With ``record_dir`` set, a fraction ``record_fraction`` of the
answered requests (every ``1/fraction``-th, deterministically, so the sample is
spread evenly over time) is kept: each sample's state, the correction returned
(per the model's time unit, before any conversion to the caller's), the model
version and stage, the request's ``valid_time`` parameter and when it was served.
Samples are buffered per model version and written, ``record_file_samples`` at a
time, as netCDF files (the pipeline's store format)::

    <record_dir>/<model>/v<version>-<unix ms>-<seq>.nc

Each file is written to a hidden temporary name and renamed into place in a
worker thread, so a reader never sees half of one and the event loop never waits
on the disk. At most ``record_max_files`` files are kept per model: the oldest
are removed (rotation). The buffers are flushed at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .metrics import ServiceMetrics

log = logging.getLogger("mecs.service")


class _Buffer:
    def __init__(self) -> None:
        self.states: list[np.ndarray] = []
        self.corrections: list[np.ndarray] = []
        self.valid: list[str] = []
        self.ood: list[np.ndarray] = []
        self.served: list[float] = []
        self.n = 0


#: The one thread that writes record files in this process (started on first use).
#: netCDF-C and the HDF5 under it are not thread-safe: with the event loop's default
#: executor several files were written at once, and a process with several servers
#: (the test suite) crashed in HDF5 with a bus error.
_WRITER = ThreadPoolExecutor(1, thread_name_prefix="mecs-record")


class Recorder:
    """Samples answered requests into rotated netCDF files (see the module)."""

    def __init__(
        self,
        root: str | os.PathLike,
        fraction: float,
        file_samples: int,
        max_files: int,
        metrics: ServiceMetrics,
        executor: Executor | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fraction = float(fraction)
        self.file_samples = int(file_samples)
        self.max_files = int(max_files)
        self.metrics = metrics
        self.executor = executor or _WRITER
        self._credit = 0.0
        self._seq = 0
        self._buffers: dict[tuple[str, int], tuple[object, _Buffer]] = {}
        self._pending: set[asyncio.Future] = set()

    def offer(self, model, state: np.ndarray, correction: np.ndarray, valid_time, ood) -> None:
        """Record this request's samples if it is one of the sampled ones."""
        self._credit += self.fraction
        if self._credit < 1.0:
            return
        self._credit -= 1.0
        key = (model.name, model.version)
        entry = self._buffers.get(key)
        if entry is None:
            entry = self._buffers[key] = (model, _Buffer())
        buf = entry[1]
        n = state.shape[0]
        buf.states.append(np.array(state, dtype=np.float32))
        buf.corrections.append(np.array(correction, dtype=np.float32))
        buf.valid.extend([valid_time or ""] * n)
        buf.ood.append(np.asarray(ood, dtype=np.int8).reshape(n))
        buf.served.extend([time.time()] * n)
        buf.n += n
        self.metrics.recorded_samples.labels(model.name).inc(n)
        if buf.n >= self.file_samples:
            self._flush(key)

    def _flush(self, key) -> None:
        model, buf = self._buffers.pop(key)
        if not buf.n:
            return
        self._seq += 1
        job = (model.name, model.version, model.stage, model.corrector, buf, self._seq)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, self._write, *job)
        self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut) -> None:
        self._pending.discard(fut)
        err = fut.exception()
        if err is not None:
            log.error("could not write a record file: %s", err)

    def _write(self, name, version, stage, corrector, buf: _Buffer, seq: int) -> Path:
        import xarray as xr

        layout = corrector.layout
        states = np.concatenate(buf.states)
        corr = np.concatenate(buf.corrections)
        dims = ("sample", *layout.state_dims)
        ds = xr.Dataset(
            {
                "state": (dims, states, {"long_name": "state the service corrected"}),
                "correction": (
                    dims,
                    corr,
                    {"long_name": "correction returned (tendency, per the model's time unit)"},
                ),
                "valid_time": (
                    ("sample",),
                    np.array(buf.valid, dtype=object),
                    {"long_name": "the request's valid_time parameter ('' when not sent)"},
                ),
                "out_of_distribution": (
                    ("sample",),
                    np.concatenate(buf.ood),
                    {"long_name": "1: the input was flagged out of distribution"},
                ),
                "served_at": (("sample",), np.array(buf.served), {"units": "s since 1970-01-01"}),
            },
            attrs={
                "title": "mecs service record",
                "source": "mecs serve (record_dir)",
                "model": name,
                "model_version": int(version),
                "model_stage": stage,
                "layout": json.dumps(layout.to_dict()),
                "time_unit": corrector.time_unit,
            },
        )
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        stamp = int(time.time() * 1000)
        final = folder / f"v{version}-{stamp}-{seq:06d}.nc"
        tmp = folder / f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            ds.to_netcdf(tmp, engine="netcdf4")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self._rotate(folder)
        return final

    def _rotate(self, folder: Path) -> None:
        files = sorted(folder.glob("v*.nc"), key=lambda p: p.stat().st_mtime_ns)
        for old in files[: max(0, len(files) - self.max_files)]:
            old.unlink(missing_ok=True)

    async def close(self) -> None:
        """Write every partial buffer and wait for the writes (server shutdown)."""
        for key in list(self._buffers):
            self._flush(key)
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
