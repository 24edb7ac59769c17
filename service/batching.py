"""Micro-batching: concurrent requests for one model version share a forward pass.

Independent callers stepping together (MPI ranks of one forecast, ensemble members
run as separate jobs) each send one small request per timestep. A forward pass
costs nearly the same for 1 or 64 samples, so gathering them pays, as long as a
lone caller does not wait for companions that never come.

The dispatch rule, per model version:

- a batch leaves as soon as it holds ``batch_max_size`` samples;
- or as soon as no other infer request for the model is *on its way* to the queue
  (its headers have arrived, its body is being read or parsed): the service counts
  those with a :class:`Ticket` taken by the ASGI middleware, so a lone caller never
  waits and callers that arrive together leave together;
- or when the oldest request has waited ``batch_max_delay_ms`` (the bound).

Timestep groups change the rule for callers that say they step together: a request
with ``group`` and ``group_size`` parameters (ensemble members or MPI ranks of one
run, each sending its state for the same step) waits for its group instead of for
"no one else on the way". The queue is released the moment the group's
``group_size``-th request arrives (everything queued leaves, in batches of at most
``batch_max_size``), or when its oldest request has waited ``batch_group_timeout_ms``.
Arrivals are counted per group, so a group larger than ``batch_max_size`` leaves in
several batches without waiting for the timeout, and after a timeout the count
starts again, so a late member joins the next step's batch.

Requests are never split across batches (one request larger than the batch size
runs alone). Small batches run on the event loop (a thread hop costs more than a
small forward); batches above ``inline_forward_max_values`` values run on a single
worker thread so the loop keeps answering while a big state is corrected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from correction.guardrails import Guarded

from .errors import ServiceError

ComputeFn = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray, np.ndarray]]


class Traffic:
    """Infer requests of one model name that are on their way to a batch queue."""

    def __init__(self) -> None:
        self.approaching = 0
        self.batchers: set[Batcher] = set()

    def enter(self) -> Ticket:
        self.approaching += 1
        return Ticket(self)

    def poke(self) -> None:
        for b in list(self.batchers):
            b.wake()


class Ticket:
    """Held by one request from its headers until it is queued or answered."""

    __slots__ = ("traffic", "open")

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.open = True

    def arrived(self) -> None:
        """The request is now in a queue (the queue re-checks itself)."""
        if self.open:
            self.open = False
            self.traffic.approaching -= 1

    def close(self) -> None:
        """The request ended without reaching a queue: batches may stop waiting for it."""
        if self.open:
            self.open = False
            self.traffic.approaching -= 1
            self.traffic.poke()


@dataclass
class BatchResult:
    correction: np.ndarray
    out_of_distribution: np.ndarray
    capped: np.ndarray
    batch_size: int
    forward_s: float = 0.0
    #: the forward showed every value finite (None: not checked there)
    finite: bool | None = None
    #: the correction is the request's own ``out`` buffer, already filled
    into: bool = False


class _Item:
    __slots__ = ("state", "forcings", "future", "t", "group", "out", "bounds")

    def __init__(self, state, forcings, future, t, group=None, out=None, bounds=None):
        self.state, self.forcings, self.future, self.t = state, forcings, future, t
        self.group = group
        self.out, self.bounds = out, bounds


class _Group:
    """Arrivals of one timestep group since its last release."""

    __slots__ = ("arrived", "size", "queued")

    def __init__(self, size: int) -> None:
        self.arrived = 0
        self.size = size
        self.queued = 0


#: timestep groups remembered per queue; past it, groups with nothing queued are dropped
MAX_GROUPS = 4096


class Batcher:
    """The queue of one model version; see the module docstring for the rule."""

    def __init__(
        self,
        compute: ComputeFn,
        traffic: Traffic,
        executor: Executor,
        max_size: int,
        max_delay_s: float,
        max_queue_samples: int,
        inline_max_values: int,
        observe: Callable[[int, int, float, list[float]], None] | None = None,
        group_timeout_s: float = 0.05,
    ) -> None:
        self.compute = compute
        self.traffic = traffic
        self.executor = executor
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.max_queue_samples = max_queue_samples
        self.inline_max_values = inline_max_values
        self.observe = observe
        self.group_timeout_s = group_timeout_s
        self.groups: dict[str, _Group] = {}
        self.grouped = 0  # queued requests that belong to a group
        self.flush = False  # a group is complete: release everything queued
        self.items: deque[_Item] = deque()
        self.samples = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> None:
        """Start being poked by the model's traffic (call on the event loop thread)."""
        self.traffic.batchers.add(self)

    def retire(self) -> None:
        """Stop being poked once unloaded; queued requests still finish."""
        self.traffic.batchers.discard(self)

    async def submit(
        self,
        state: np.ndarray,
        forcings: np.ndarray | None = None,
        ticket: Ticket | None = None,
        group: tuple[str, int] | None = None,
        out: np.ndarray | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> BatchResult:
        """Queue ``state`` (``[b, *shape]`` in the model dtype); resolve with its slice.

        ``group`` is ``(name, size)`` for a request of a timestep group. ``out``: a
        buffer for the correction (a shared-memory region), filled when the request
        runs as a batch of its own; ``bounds``: the state's min and max, known from
        the input check. Both go to the compute function only when given.
        """
        n = state.shape[0]
        if ticket is not None:
            ticket.arrived()
        if self.samples and self.samples + n > self.max_queue_samples:
            raise ServiceError(
                503,
                f"server busy: {self.samples} samples already queued for this model",
                headers={"Retry-After": "1"},
            )
        loop = self._loop = asyncio.get_running_loop()
        if self.max_size <= 1:  # micro-batching off: every request is its own batch
            item = _Item(state, forcings, None, time.perf_counter(), None, out, bounds)
            if state.size <= self.inline_max_values:
                return self._run_now([item])
            res, dt = await loop.run_in_executor(self.executor, self._timed_compute, [item])
            return self._deliver([item], res, dt, n)
        future = loop.create_future()
        key = None
        if group is not None:
            key, size = group
            g = self.groups.get(key)
            if g is None:
                if len(self.groups) >= MAX_GROUPS:
                    self._forget_idle_groups()
                g = self.groups[key] = _Group(size)
            g.size = size
            g.arrived += 1
            g.queued += 1
            self.grouped += 1
            if g.arrived >= g.size:  # the whole group is here (or has been sent already)
                g.arrived = 0
                self.flush = True
        self.items.append(_Item(state, forcings, future, time.perf_counter(), key, out, bounds))
        self.samples += n
        self.wake()
        return await future

    def _forget_idle_groups(self) -> None:
        for key in [k for k, g in self.groups.items() if not g.queued]:
            del self.groups[key]

    def wake(self) -> None:
        """Re-check the queue after the tasks already runnable have run."""
        if not self._scheduled and self.items and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._check)

    def _on_timer(self) -> None:
        self._timer = None
        self._check()

    def _check(self) -> None:
        self._scheduled = False
        while self.items:
            now = time.perf_counter()
            first = self.items[0]
            waited = now - first.t
            bound = self.max_delay_s if first.group is None else self.group_timeout_s
            timed_out = waited >= bound
            if not (
                self.flush
                or self.samples >= self.max_size
                or timed_out
                or (self.traffic.approaching <= 0 and len(self.items) > self.grouped)
            ):
                if self._timer is None and self._loop is not None:
                    self._timer = self._loop.call_later(bound - waited, self._on_timer)
                return
            self._dispatch(self._take(timed_out and not self.flush))
        self.flush = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take(self, timed_out: bool = False) -> list[_Item]:
        batch = [self.items.popleft()]
        total = batch[0].state.shape[0]
        while self.items and total + self.items[0].state.shape[0] <= self.max_size:
            item = self.items.popleft()
            batch.append(item)
            total += item.state.shape[0]
        self.samples -= total
        if self.grouped:
            for it in batch:
                if it.group is not None:
                    self.grouped -= 1
                    g = self.groups.get(it.group)
                    if g is None:
                        continue
                    g.queued -= 1
                    if timed_out:  # a member is late: count this group's next step afresh
                        g.arrived = 0
                    if not g.queued and not g.arrived:
                        del self.groups[it.group]
        return batch

    def _dispatch(self, batch: list[_Item]) -> None:
        batch = [it for it in batch if not it.future.done()]  # caller gone: skip its work
        if not batch:
            return
        values = sum(it.state.size for it in batch)
        if values <= self.inline_max_values:
            self._run_now(batch)
        else:
            self._run_in_thread(batch)

    def _timed_compute(self, batch: list[_Item]) -> tuple[Any, float]:
        """The batch stacked and computed: ``out`` and ``bounds`` go to the compute
        function when the batch is one request that has them (bounds also when every
        request of a larger batch has them)."""
        first = batch[0]
        if len(batch) == 1:
            state, forcings, out, bounds = first.state, first.forcings, first.out, first.bounds
        else:
            state = np.concatenate([it.state for it in batch])
            forcings = None
            if first.forcings is not None:
                forcings = np.concatenate([it.forcings for it in batch])
            out = None
            bounds = None
            if all(it.bounds is not None for it in batch):
                bounds = (min(it.bounds[0] for it in batch), max(it.bounds[1] for it in batch))
        t = time.perf_counter()
        if out is None and bounds is None:
            res = self.compute(state, forcings)
        else:
            res = self.compute(state, forcings, out, bounds)
        return res, time.perf_counter() - t

    def _run_now(self, batch: list[_Item]) -> BatchResult | None:
        try:
            res, dt = self._timed_compute(batch)
        except Exception as err:  # every waiting request learns it, none is lost
            if batch[0].future is None:
                raise
            self._fail(batch, err)
            return None
        return self._deliver(batch, res, dt, sum(it.state.shape[0] for it in batch))

    def _run_in_thread(self, batch: list[_Item]) -> None:
        """The batch's forward on the executor. The worker hands its result straight to
        the loop: one wake-up, then the waiting requests, with no task or concurrent
        future in between (each is one more turn of a loop that has just woken up cold,
        ~0.1 ms after a long forward, docs/service.md)."""
        loop = self._loop

        def work() -> None:
            try:
                res, dt = self._timed_compute(batch)
            except BaseException as err:  # every waiting request learns it, none is lost
                deliver, args = self._fail, (batch, err)
            else:
                deliver, args = (
                    self._settle,
                    (batch, res, dt, sum(it.state.shape[0] for it in batch)),
                )
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(deliver, *args)

        try:
            self.executor.submit(work)
        except RuntimeError as err:  # the executor is shut down
            self._fail(batch, err)

    def _settle(self, batch: list[_Item], res, dt: float, total: int) -> None:
        """``_deliver`` on the loop; if that fails (a malformed result), the waiting
        requests get the error instead of waiting forever."""
        try:
            self._deliver(batch, res, dt, total)
        except Exception as err:
            self._fail(batch, err)

    @staticmethod
    def _fail(batch: list[_Item], err: BaseException) -> None:
        for it in batch:
            if not it.future.done():
                it.future.set_exception(err)

    def _deliver(self, batch, res, dt, total) -> BatchResult | None:
        corr, ood, capped, finite, into = Guarded(*res)  # a plain 3-tuple: the defaults
        now = time.perf_counter()
        if self.observe is not None:
            self.observe(total, len(batch), dt, [now - it.t for it in batch])
        if batch[0].future is None:  # unbatched fast path: no future, answer directly
            return BatchResult(corr, ood, capped, total, dt, finite, into)
        if len(batch) == 1:  # the whole answer is this request's: no slicing
            it = batch[0]
            if not it.future.done():
                it.future.set_result(BatchResult(corr, ood, capped, total, dt, finite, into))
            return None
        offset = 0
        for it in batch:
            n = it.state.shape[0]
            if not it.future.done():
                sl = slice(offset, offset + n)
                it.future.set_result(BatchResult(corr[sl], ood[sl], capped[sl], total, dt, finite))
            offset += n
        return None
