"""Busy polling: after a request, the event loop polls its sockets for a while instead of sleeping.

Why: a server that blocks in ``epoll_wait`` while its caller computes the next step
lets its core go idle, and on the 2-core machines measured here code that runs
right after such a wait is several times slower than the same code run back to
back (``bench/cold_calls.py``: the l96 forward 29 us back to back, 89 us after a
300 us sleep, 48 us after a 300 us busy wait; the app's whole infer path 178, 345
and 220 us). Forecast callers send their next request within a fraction of a
millisecond of the last answer, so keeping the loop busy over that gap buys back
most of the difference.

How: a callback that reschedules itself with ``call_soon`` makes every turn of the
loop a poll with a zero timeout (asyncio and uvloop both poll without blocking
while callbacks are ready), so sockets are still read and every other task still
runs. Each turn yields the core (``sched_yield``), so a caller or another process
on the same core runs first. Under load the loop never idles and the window costs
nothing; an idle server spins for at most ``window_s`` after its last request.
Linux's own ``SO_BUSY_POLL`` does not help here: it polls a network device queue,
and loopback has none.
"""

from __future__ import annotations

import asyncio
import os
import time


class BusyPoll:
    """Keep the running event loop polling for ``window_s`` after each :meth:`touch`."""

    __slots__ = ("window_s", "until", "running", "turns", "_loop", "_yield")

    def __init__(self, window_s: float, yield_core: bool = True) -> None:
        if window_s < 0:
            raise ValueError(f"busy-poll window must be >= 0 s, got {window_s}")
        self.window_s = window_s
        self.until = 0.0
        self.running = False
        #: loop turns spent polling since start (exported for tests and diagnostics)
        self.turns = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._yield = os.sched_yield if yield_core and hasattr(os, "sched_yield") else None

    def touch(self) -> None:
        """A request ended: poll for the next one until ``window_s`` from now.

        Call on the event loop's thread (the middleware does, as each request ends).
        """
        if not self.window_s:
            return
        self.until = time.perf_counter() + self.window_s
        if not self.running:
            self.running = True
            self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        if time.perf_counter() >= self.until or self._loop.is_closed():
            self.running = False
            return
        self.turns += 1
        if self._yield is not None:
            self._yield()
        self._loop.call_soon(self._turn)
