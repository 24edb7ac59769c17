"""The CPU latency QoS request (``MECS_CPU_LATENCY_QOS_US``): held while serving, then gone.

What a user relies on: with the setting, the kernel's CPU latency limit is the asked
value for as long as the service runs and is back to what it was once it stops (the
request must not outlive the service); without it nothing is asked; a node where
the device cannot be opened still serves, with a warning that says why.
"""

from __future__ import annotations

import logging
import os
import struct

import numpy as np
import pytest

from service.cpulatency import DEVICE, CpuLatencyRequest, current_latency_us
from service.settings import ServiceSettings, SettingsError, load_settings


def test_the_request_writes_the_value_and_is_released(tmp_path):
    dev = tmp_path / "cpu_dma_latency"
    dev.write_bytes(b"")
    with CpuLatencyRequest(25, device=str(dev)) as req:
        assert req.held
        assert struct.unpack("=i", dev.read_bytes()) == (25,)
        fd = req.fd
        assert req.open() and req.fd == fd  # opened twice: still the one file
    assert not req.held
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the kernel drops a real request with its file
    with pytest.raises(ValueError, match=">= 0 us"):
        CpuLatencyRequest(-1)


def test_a_device_that_cannot_be_opened_is_a_warning_not_a_failure(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mecs.service"):
        req = CpuLatencyRequest(0, device=str(tmp_path / "missing"))
        assert req.open() is False
    assert not req.held
    assert "MECS_CPU_LATENCY_QOS_US=0: cannot open" in caplog.text
    req.close()  # nothing held: a no-op


def test_the_setting_is_unset_by_default_and_checked(tmp_path, monkeypatch):
    assert ServiceSettings().cpu_latency_qos_us is None
    monkeypatch.setenv("MECS_CPU_LATENCY_QOS_US", "")
    assert load_settings().cpu_latency_qos_us is None
    monkeypatch.setenv("MECS_CPU_LATENCY_QOS_US", "-5")
    with pytest.raises(SettingsError, match="cpu_latency_qos_us.*greater than or equal to 0"):
        load_settings()


@pytest.mark.skipif(
    not os.access(DEVICE, os.R_OK | os.W_OK), reason=f"{DEVICE} not writable (needs root)"
)
def test_a_server_holds_the_request_while_it_serves(start_server):
    from service.client import CorrectionClient

    before = current_latency_us()
    assert before is not None
    if before == 0:
        pytest.skip("another process holds a 0 us request (a benchmark?)")
    server = start_server(cpu_latency_qos_us=0)
    assert server.app.state.mecs.cpu_latency.held
    assert current_latency_us() == 0
    x = np.random.default_rng(3).normal(2.5, 3.6, (2, 36)).astype(np.float32)
    with CorrectionClient(server.url, "l96") as c:
        assert c.infer(x).correction.shape == (2, 36)
    server.stop()
    assert current_latency_us() == before
    plain = start_server()
    assert plain.app.state.mecs.cpu_latency is None and current_latency_us() == before
