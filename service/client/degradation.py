"""What a forecast step gets when the service cannot answer: the degradation policy.

A forecast must not stop because the correction service blinked. ``correct``
applies, in this order: the circuit breaker (after ``failure_threshold``
consecutive failures, no call for ``cooldown_s``: the step degrades at once instead
of waiting a timeout), then the policy: ``raise``, ``zero`` (no correction) or
``last`` (the last correction again). Degraded steps are counted and reported to
the server with the next successful call.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np

from .transport import RequestRejected, ServiceError, ServiceUnavailable

Policy = Literal["raise", "zero", "last"]
POLICIES = ("raise", "zero", "last")


class Degradation:
    """The breaker and policy state of one client (mixed into ``CorrectionClient``)."""

    degrade: Policy
    failure_threshold: int
    cooldown_s: float
    last_result: Any

    def _init_degradation(self, degrade: str, failure_threshold: int, cooldown_s: float) -> None:
        if degrade not in POLICIES:
            raise ValueError(f"degrade must be one of {POLICIES}, got {degrade!r}")
        self.degrade = degrade  # type: ignore[assignment]
        self.failure_threshold, self.cooldown_s = failure_threshold, cooldown_s
        self.degraded_steps = 0
        self._unreported = 0
        self.failures = 0
        self.consecutive_failures = 0
        self._open_until = 0.0
        self.last_error: Exception | None = None

    def infer(self, state: np.ndarray, dt: float | None = None) -> Any:  # pragma: no cover
        raise NotImplementedError

    def apply(self, state: np.ndarray, dt: float) -> np.ndarray:
        """``state + dt * correction``, ``dt`` in the client's ``dt_unit`` (a degraded step
        adds what the policy gives: nothing under ``zero``)."""
        arr = np.asarray(state)
        return arr + dt * self.correct(arr, dt=dt)

    def correct(self, state: np.ndarray, dt: float | None = None) -> np.ndarray:
        """The correction for ``state``, or the degradation policy's answer on failure."""
        now = time.monotonic()
        if now < self._open_until:
            return self._degraded(
                state, ServiceUnavailable("circuit open after repeated failures; not calling")
            )
        try:
            result = self.infer(state, dt=dt)
        except (ServiceUnavailable, RequestRejected) as err:
            # a 4xx is the caller's bug and raises, except a 404 for a model that
            # answered before: it was unloaded, an outage like any other
            if isinstance(err, RequestRejected) and not (
                err.status == 404 and self.last_result is not None
            ):
                raise
            self.failures += 1
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failure_threshold:
                self._open_until = time.monotonic() + self.cooldown_s
            return self._degraded(state, err)
        self.consecutive_failures = 0
        return result.correction

    def _degraded(self, state: np.ndarray, err: ServiceError) -> np.ndarray:
        self.last_error = err
        if self.degrade == "raise":
            raise err
        self.degraded_steps += 1
        self._unreported += 1
        arr = np.asarray(state)
        last = self.last_result
        if self.degrade == "last" and last is not None and last.correction.shape == arr.shape:
            return last.correction.astype(arr.dtype, copy=True)
        return np.zeros_like(arr)
