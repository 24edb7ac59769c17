"""Shadow mode: the newest candidate runs on live requests, and only its distance is kept.

With ``shadow`` on, every request answered by a model's production version is also
offered to that model's newest candidate (loaded beside it, never answered to a
caller that did not name it). The candidate's correction is computed after the
answer has been sent, in the same batch queues, and compared with production's:
per field, the RMS difference in units of the training targets' standard
deviation (the model's ``out_std``), observed into the histogram
``mecs_shadow_difference{model, candidate, field}``. An operator sees how far a
candidate would move the forecasts before it is promoted.

Shadow work never delays or fails a caller: at most ``shadow_max_in_flight``
requests are shadowed at once (the others are counted as skipped), and a failure
of the candidate is counted, not raised.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from correction.layout import field_slices

from .metrics import ServiceMetrics

log = logging.getLogger("mecs.service")


def field_differences(layout, out_std: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    """Per field, the RMS of ``(a - b) / out_std`` (channel-wise std) over the batch."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    std = np.asarray(out_std, np.float64)
    if len(layout.fields) > 1 and std.size == diff.shape[1]:  # one std per channel
        std = std.reshape((1, -1) + (1,) * (diff.ndim - 2))
    diff = diff / np.where(std > 0, std, 1.0)
    out = {}
    for f, sl in field_slices(layout):
        part = diff if sl is None else diff[:, sl]
        out[f] = float(np.sqrt(np.mean(part * part)))
    return out


class Shadow:
    """Runs candidates beside production on live requests (see the module)."""

    def __init__(self, metrics: ServiceMetrics, max_in_flight: int) -> None:
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def offer(self, candidate, x: np.ndarray, f: np.ndarray | None, production_corr) -> None:
        """Shadow one answered request on ``candidate`` (the caller's answer is final)."""
        if self.in_flight >= self.max_in_flight:
            self.metrics.shadow_requests.labels(candidate.name, "skipped").inc()
            return
        self.in_flight += 1
        # the request's arrays may live in its body or a caller's shared-memory region
        x, corr = np.array(x), np.array(production_corr)
        f = None if f is None else np.array(f)
        task = asyncio.get_running_loop().create_task(self._run(candidate, x, f, corr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, candidate, x, f, corr) -> None:
        try:
            res = await candidate.correct(x, f)
            diffs = field_differences(
                candidate.corrector.layout, candidate.corrector.out_std, res.correction, corr
            )
            for field, value in diffs.items():
                self.metrics.shadow_difference.labels(
                    candidate.name, candidate.version_str, field
                ).observe(value)
            self.metrics.shadow_requests.labels(candidate.name, "ok").inc()
        except Exception as err:  # the candidate's trouble is reported, never the caller's
            self.metrics.shadow_requests.labels(candidate.name, "failed").inc()
            log.warning(
                "shadow run of model '%s' v%s failed: %s",
                candidate.name,
                candidate.version_str,
                err,
            )
        finally:
            self.in_flight -= 1

    async def drain(self) -> None:
        """Wait for the shadow runs in flight (server shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
