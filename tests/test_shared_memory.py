"""The system shared-memory extension over a real server: results, ownership, bounds, crashes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import service_settings

from service.client import CorrectionClient, RequestRejected, SharedMemoryRegion
from service.server import ServerThread

RNG = np.random.default_rng(3)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shm_server(l96_repository):
    settings = service_settings(
        l96_repository,
        shared_memory=True,
        inference_keys=["alice", "bob"],
        admin_keys=["adm"],
    )
    with ServerThread(settings) as server:
        yield server


def states(n=3):
    return RNG.normal(2.5, 3.6, (n, 36)).astype(np.float32)


def test_infer_through_shared_memory_equals_the_binary_body(shm_server):
    with CorrectionClient(shm_server.url, "l96", api_key="alice") as c:
        x = states(5)
        expected = c.infer(x)
        with SharedMemoryRegion(c, "run", 2 * x.nbytes) as region:
            assert c.region_status() == [
                {"name": "run", "key": region.key, "offset": 0, "byte_size": 2 * x.nbytes}
            ]
            region.array(x.shape)[...] = x
            for _ in range(3):  # the second and third reuse the server's plan of the header
                got = c.infer_in_region(region, x.shape)
                np.testing.assert_array_equal(got.correction, expected.correction)
            # the correction was written into the region, after the state, which is untouched
            np.testing.assert_array_equal(region.array(x.shape, offset=x.nbytes), got.correction)
            np.testing.assert_array_equal(region.array(x.shape), x)
            assert got.batch_size == 5 and got.model_version == 1
            assert set(got.server_timing_ms) == {"read", "decode", "queue", "forward", "total"}
            # the state changes in place between steps; the answer follows it
            region.array(x.shape)[...] = x[::-1]
            np.testing.assert_array_equal(
                c.infer_in_region(region, x.shape).correction, expected.correction[::-1]
            )
        assert c.region_status() == []
        assert not Path("/dev/shm", region.key.lstrip("/")).exists()


def test_repeated_region_answers_are_the_same_and_follow_a_stage_change(shm_server):
    """A forecast repeats its region call every step: the answer's header is built once
    per plan and batch size, and a promotion (a new stage) still shows in the next one."""
    with CorrectionClient(shm_server.url, "l96", api_key="alice") as c:
        x = states(4)
        with SharedMemoryRegion(c, "run", 2 * x.nbytes) as region:
            region.array(x.shape)[...] = x
            answers = [c.infer_in_region(region, x.shape) for _ in range(3)]
            assert {a.parameters["model_stage"] for a in answers} == {"production"}
            assert all(a.parameters == answers[0].parameters for a in answers)
            model = shm_server.app.state.mecs.repository.slots["l96"].default
            model.set_stage("retired")
            after = c.infer_in_region(region, x.shape)
            assert after.parameters["model_stage"] == "retired"
            np.testing.assert_array_equal(after.correction, answers[0].correction)
            model.set_stage("production")


def test_regions_belong_to_the_key_that_registered_them(shm_server):
    alice = CorrectionClient(shm_server.url, "l96", api_key="alice")
    bob = CorrectionClient(shm_server.url, "l96", api_key="bob")
    x = states(2)
    with alice, bob, SharedMemoryRegion(alice, "mine", 2 * x.nbytes) as region:
        region.array(x.shape)[...] = x
        assert bob.region_status() == []
        with pytest.raises(RequestRejected, match="404.*no shared-memory region 'mine'"):
            bob.region_status("mine")
        with pytest.raises(RequestRejected, match="400.*no shared-memory region 'mine'"):
            bob.infer_in_region(region, x.shape)
        with pytest.raises(RequestRejected, match="404"):
            bob.unregister_region("mine")
        # bob may use the same name for his own region
        with SharedMemoryRegion(bob, "mine", 2 * x.nbytes) as other:
            other.array(x.shape)[...] = 0.0
            assert bob.region_status()[0]["key"] == other.key
            np.testing.assert_array_equal(
                alice.infer_in_region(region, x.shape).correction, alice.infer(x).correction
            )
        assert [r["name"] for r in alice.region_status()] == ["mine"]
    with CorrectionClient(shm_server.url, "l96") as anonymous, pytest.raises(RequestRejected):
        anonymous.region_status()  # 401: the extension needs the inference scope


def _shm_file(size: int) -> tuple[str, Path]:
    key = f"mecs_test_{os.getpid()}_{time.monotonic_ns()}"
    path = Path("/dev/shm") / key
    with open(path, "wb") as fh:
        fh.truncate(size)
    return "/" + key, path


def test_bounds_and_bad_keys_are_refused(shm_server, tmp_path):
    key, path = _shm_file(1024)
    try:
        with CorrectionClient(shm_server.url, "l96", api_key="alice") as c:
            for args, message in [
                (("r", "/no_such_object", 0, 64), "no shared-memory object"),
                (("r", key, 1000, 64), "passes the end"),
                (("r", "/../etc/passwd", 0, 64), "must name a shared-memory object"),
                (("r", key, 0, 0), "at least 1"),
                (("bad/name", key, 0, 64), "404|region name"),
            ]:
                with pytest.raises(RequestRejected, match=message):
                    c.register_region(*args)
            link = Path("/dev/shm") / (key[1:] + "_link")
            link.symlink_to(path)
            try:
                with pytest.raises(RequestRejected, match="no shared-memory object"):
                    c.register_region("r", "/" + link.name, 0, 64)
            finally:
                link.unlink()
            c.register_region("r", key, 0, 1024)
            with pytest.raises(RequestRejected, match="409.*already registered"):
                c.register_region("r", key, 0, 1024)

            class View:  # a region object as the client sees it, for the request only
                name = "r"

                def array(self, shape, dtype=np.float32, offset=0):
                    return np.zeros(shape, dtype)

            # 4 x 36 FP32 = 576 bytes: the state fits, the correction after it does not
            with pytest.raises(RequestRejected, match="pass the end of region 'r'"):
                c.infer_in_region(View(), (4, 36))
            # the object shrinks under the region: refused and dropped, the server lives
            os.truncate(path, 100)
            with pytest.raises(RequestRejected, match="shrank"):
                c.infer_in_region(View(), (1, 36))
            assert c.region_status() == []
            assert c.live()
    finally:
        path.unlink(missing_ok=True)


_CRASHING_CALLER = """
import os, sys
import numpy as np
sys.path[:0] = [sys.argv[2]]
from service.client import CorrectionClient, SharedMemoryRegion
c = CorrectionClient(sys.argv[1], "l96", api_key="alice")
region = SharedMemoryRegion(c, "crashed", 2 * 36 * 4)
region.array((1, 36))[...] = 1.0
c.infer_in_region(region, (1, 36))
print(region.key, flush=True)
os._exit(9)  # dies without unregistering or unlinking
"""


def test_a_caller_that_dies_leaves_no_region_behind(shm_server):
    out = subprocess.run(
        [sys.executable, "-c", _CRASHING_CALLER, shm_server.url, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    key = out.stdout.strip()
    assert key.startswith("/mecs_"), out.stderr
    with CorrectionClient(shm_server.url, "l96", api_key="alice") as c:
        deadline = time.monotonic() + 20  # the resource tracker unlinks the dead's objects
        while Path("/dev/shm", key[1:]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path("/dev/shm", key[1:]).exists()
        assert c.region_status() == []  # the sweep dropped the region whose object is gone


def test_idle_regions_expire_and_the_extension_is_off_by_default(l96_repository):
    key, path = _shm_file(4096)
    try:
        settings = service_settings(l96_repository, shared_memory=True, shared_memory_idle_s=0.2)
        with ServerThread(settings) as server, CorrectionClient(server.url, "l96") as c:
            c.register_region("idle", key, 0, 4096)
            time.sleep(0.5)
            assert c.region_status() == []
            assert "system_shared_memory" in c.server_metadata()["extensions"]
        plain = service_settings(l96_repository)
        with ServerThread(plain) as server, CorrectionClient(server.url, "l96") as c:
            with pytest.raises(RequestRejected, match="404.*not enabled"):
                c.register_region("r", key, 0, 4096)
            assert "system_shared_memory" not in c.server_metadata()["extensions"]
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("cap_std", [10.0, 0.05])
def test_the_forward_writes_into_the_region_and_an_output_over_the_state_is_safe(
    l96_repository, cap_std
):
    """A batch of its own is corrected straight into the caller's region (ONNX Runtime's
    I/O binding, the cap clipping there); the answer equals the binary body's, also
    when the output is asked for over the state itself and when values are capped."""
    settings = service_settings(
        l96_repository, shared_memory=True, correction_cap_std=cap_std, batch_max_size=4
    )
    x = states(6)  # above batch_max_size: a batch of its own, so written in place
    with ServerThread(settings) as server, CorrectionClient(server.url, "l96") as c:
        expected = c.infer(x)
        assert (expected.capped_values > 0) == (cap_std < 1)
        with SharedMemoryRegion(c, "run", 2 * x.nbytes) as region:
            region.array(x.shape)[...] = x
            got = c.infer_in_region(region, x.shape)
            np.testing.assert_array_equal(got.correction, expected.correction)
            assert got.capped_values == expected.capped_values
            np.testing.assert_array_equal(region.array(x.shape), x)  # the state untouched
            # the correction over the state: computed aside, then copied in
            got = c.infer_in_region(region, x.shape, output_offset=0)
            np.testing.assert_array_equal(region.array(x.shape), expected.correction)
