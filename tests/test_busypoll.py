"""Busy polling (``MECS_BUSY_POLL_US``): the loop keeps polling after a request, then stops.

What a user relies on: with the window on, the server answers exactly as without
it, other work on the loop keeps running while it polls, and an idle server stops
polling once the window has passed (it does not burn a core forever).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.busypoll import BusyPoll


def test_polling_runs_other_tasks_and_stops_after_the_window():
    async def main():
        poll = BusyPoll(0.02)
        poll.touch()
        assert poll.running
        ran = []

        async def other():
            await asyncio.sleep(0.001)
            ran.append(True)

        await asyncio.wait_for(other(), 5)  # the loop still runs timers and tasks
        assert ran and poll.running and poll.turns > 0
        deadline = time.perf_counter() + 5
        while poll.running and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        assert not poll.running, "still polling long after the window"
        turns = poll.turns
        await asyncio.sleep(0.03)
        assert poll.turns == turns  # idle: no more turns
        poll.touch()  # a new request starts a new window
        assert poll.running

    asyncio.run(main())


def test_a_zero_window_never_polls_and_a_negative_one_is_refused():
    async def main():
        poll = BusyPoll(0.0)
        poll.touch()
        await asyncio.sleep(0.005)
        assert not poll.running and poll.turns == 0

    asyncio.run(main())
    with pytest.raises(ValueError, match="busy-poll window"):
        BusyPoll(-1e-6)


def test_server_with_busy_polling_answers_as_without_and_goes_idle(start_server):
    from service.client import CorrectionClient

    plain = start_server()
    polling = start_server(busy_poll_us=20_000)
    x = np.random.default_rng(3).normal(2.5, 3.6, (4, 36)).astype(np.float32)
    with (
        CorrectionClient(plain.url, "l96") as a,
        CorrectionClient(polling.url, "l96") as b,
    ):
        want = a.infer(x).correction
        for _ in range(20):
            np.testing.assert_array_equal(b.infer(x).correction, want)
    poll = polling.app.front.busy_poll
    assert poll.window_s == pytest.approx(0.02) and poll.turns > 0
    deadline = time.monotonic() + 10
    while poll.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not poll.running, "the server kept polling after its callers went quiet"
    assert plain.app.front.busy_poll.turns == 0  # off by default
