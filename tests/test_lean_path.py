"""The lean per-call path: cached request plans and answer headers, and timestep groups.

A plan is reused for every request with the same JSON header, so these tests check
that what a plan skips is what follows from the header alone: values are still
checked per call, flags still reach the answer, and groups batch as declared.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support import FakeCompute, make_batcher, service_settings

from service.app import create_app
from service.batching import Traffic
from service.client.client import timestep_group
from service.protocol import HEADER_LENGTH, decode_infer_response, encode_infer_request
from service.routers.checks import PLAN_CACHE_SIZE

RNG = np.random.default_rng(7)
INFER = "/v2/models/l96/infer"


@pytest.fixture
def client(l96_repository):
    with TestClient(create_app(service_settings(l96_repository, ood_threshold_std=6.0))) as c:
        yield c


def _post(client, x, **kw):
    body, headers = encode_infer_request({"state": x}, **kw)
    return client.post(INFER, content=body, headers=headers)


def _answer(r):
    header, arrays = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))
    return header, arrays.get("correction")


def _model(client):
    return client.app.state.mecs.repository.slots["l96"].default


def test_a_cached_plan_still_checks_every_call(client):
    x = RNG.normal(2.5, 3.6, (2, 36)).astype(np.float32)
    first = _post(client, x)
    assert first.status_code == 200
    assert len(_model(client).plans) == 1
    again = _post(client, x)
    np.testing.assert_array_equal(_answer(again)[1], _answer(first)[1])
    assert len(_model(client).plans) == 1  # the same header: the same plan
    # same header bytes, a NaN in the values: refused, naming the sample
    bad = x.copy()
    bad[1, 5] = np.nan
    r = _post(client, bad)
    assert r.status_code == 400 and "NaN or Inf (samples [1])" in r.json()["error"]
    # same header, a short payload: refused by length, not read past the end
    body, headers = encode_infer_request({"state": x})
    r = client.post(INFER, content=body[:-4], headers=headers)
    assert r.status_code == 400 and "only 284 bytes follow" in r.json()["error"]
    # same header, a state far out of distribution: the flag reaches the answer
    # (the answer header cached for clean calls is not reused)
    far = x.copy()
    far[0] = 1e4
    header, _ = _answer(_post(client, far))
    assert header["parameters"]["out_of_distribution"] is True
    assert header["parameters"]["out_of_distribution_samples"] == "0"
    assert header["parameters"]["capped_values"] >= 0
    header, _ = _answer(_post(client, x))
    assert header["parameters"]["out_of_distribution"] is False


def test_plans_are_bounded_and_per_header(client):
    x = RNG.normal(2.5, 3.6, (1, 36)).astype(np.float32)
    for i in range(PLAN_CACHE_SIZE + 20):  # every id makes a new header
        r = _post(client, x, request_id=f"call-{i}")
        assert r.status_code == 200 and _answer(r)[0]["id"] == f"call-{i}"
    assert len(_model(client).plans) == PLAN_CACHE_SIZE
    # a JSON request carries its values in the header: it is never cached
    before = dict(_model(client).plans)
    r = _post(client, x, binary=False)
    assert r.status_code == 200 and _model(client).plans.keys() == before.keys()
    # parameters are part of the header: a refused dt is refused on every call
    for _ in range(2):
        r = _post(client, x, parameters={"dt": -1.0})
        assert r.status_code == 400 and "'dt' must be a positive" in r.json()["error"]


def test_group_parameters_are_checked(client):
    x = RNG.normal(2.5, 3.6, (1, 36)).astype(np.float32)
    for params, message in [
        ({"group": "run"}, "'group_size' must be an integer"),
        ({"group_size": 4}, "parameter 'group' must be a string"),
        ({"group": "run", "group_size": 0}, "'group_size' must be an integer from 1"),
        ({"group": "", "group_size": 2}, "parameter 'group' must be a string"),
        ({"group": 3, "group_size": 2}, "parameter 'group' must be a string"),
    ]:
        r = _post(client, x, parameters=params)
        assert r.status_code == 400 and message in r.json()["error"], (params, r.text)
    r = _post(client, x, parameters={"group": "run", "group_size": 1})
    assert r.status_code == 200 and _answer(r)[0]["parameters"]["batch_size"] == 1


def test_a_group_leaves_when_its_last_member_arrives():
    async def scenario():
        compute, traffic = FakeCompute(), Traffic()
        # the delay bound of ungrouped calls is an hour and the group timeout too: only
        # the group's completion can release these (wait_for is a liveness guard)
        b = make_batcher(compute, traffic, max_delay_s=3600, group_timeout_s=3600)
        xs = [np.full((1, 3), i, np.float32) for i in range(4)]
        calls = []
        for x in xs:
            calls.append(asyncio.ensure_future(b.submit(x, None, None, ("run", 4))))
            for _ in range(20):  # each member arrives alone; nothing else is on its way
                await asyncio.sleep(0)
            if len(calls) < 4:
                assert not any(c.done() for c in calls)  # waiting for the rest
        out = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert compute.sizes == [4]
        assert [r.batch_size for r in out] == [4, 4, 4, 4]
        for x, r in zip(xs, out, strict=True):
            np.testing.assert_array_equal(r.correction, 2 * x)
        assert b.groups == {}  # nothing kept once the group has left
        # without a group, the same lone arrivals leave one by one
        singles = [await asyncio.wait_for(b.submit(x, None, None), 30) for x in xs]
        assert [r.batch_size for r in singles] == [1, 1, 1, 1]

    asyncio.run(scenario())


def test_a_group_larger_than_a_batch_and_a_late_member():
    async def scenario():
        compute, traffic = FakeCompute(), Traffic()
        b = make_batcher(compute, traffic, max_size=4, max_delay_s=3600, group_timeout_s=3600)
        xs = [np.full((1, 3), i, np.float32) for i in range(6)]
        calls = [asyncio.ensure_future(b.submit(x, None, None, ("big", 6))) for x in xs]
        out = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert sorted(compute.sizes) == [2, 4]  # two batches, no wait for a timeout
        assert sorted(r.batch_size for r in out) == [2, 2, 4, 4, 4, 4]
        # a member that never comes: the group leaves at its timeout, and the count
        # starts again, so the late one and the next step's three leave together
        compute.sizes.clear()
        short = make_batcher(compute, traffic, max_delay_s=3600, group_timeout_s=0.05)
        calls = [asyncio.ensure_future(short.submit(x, None, None, ("g", 4))) for x in xs[:3]]
        out = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert compute.sizes == [3]
        calls = [asyncio.ensure_future(short.submit(x, None, None, ("g", 4))) for x in xs[:4]]
        out = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert compute.sizes == [3, 4]

    asyncio.run(scenario())


def test_the_client_takes_its_group_from_the_run(monkeypatch):
    for var in ("MECS_GROUP", "MECS_GROUP_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert timestep_group(None, None) == (None, None)
    assert timestep_group("ens", 20) == ("ens", 20)
    monkeypatch.setenv("MECS_GROUP", "forecast-7")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "16")  # an MPI job of 16 ranks
    assert timestep_group(None, None) == ("forecast-7", 16)
    monkeypatch.setenv("MECS_GROUP_SIZE", "40")
    assert timestep_group(None, None) == ("forecast-7", 40)
    monkeypatch.setenv("MECS_GROUP_SIZE", "many")
    with pytest.raises(ValueError, match="not an integer"):
        timestep_group(None, None)
    monkeypatch.delenv("MECS_GROUP")
    with pytest.raises(ValueError, match="needs a group"):
        timestep_group(None, 3)


class _RecordingTransport:
    def __init__(self):
        self.calls: list[tuple[str, bytes]] = []
        self.closed = False

    def write(self, data):
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts):
        self.calls.append(("writelines", b"".join(parts)))

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default


def test_headers_and_body_leave_in_one_write():
    import asyncio

    from service.server import CoalescingTransport

    async def scenario():
        loop = asyncio.get_running_loop()
        raw = _RecordingTransport()
        t = CoalescingTransport(raw, loop)
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")  # same loop step: one writev with the held headers
        assert raw.calls == [("writelines", b"HTTP/1.1 200 OK\r\n\r\nbody")]
        t.write(b"alone")  # nothing follows: it goes out at the end of the step
        assert len(raw.calls) == 1
        await asyncio.sleep(0)
        assert raw.calls[-1] == ("write", b"alone")
        big = b"x" * (1 << 16)
        t.write(big)  # large writes are never held
        assert raw.calls[-1] == ("write", big)
        t.write(b"last")
        t.close()  # closing sends what is held first
        assert raw.calls[-1] == ("write", b"last") and raw.closed
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's
        await asyncio.sleep(0)
        assert len(raw.calls) == 4  # the scheduled flush finds nothing left to send

    asyncio.run(scenario())
