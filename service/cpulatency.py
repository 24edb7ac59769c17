"""A PM QoS CPU latency request: keep the node's CPUs out of slow idle states.

Between two calls of one caller, the service's CPU and the caller's have nothing to
do for a few hundred microseconds. An idle CPU halts; waking it costs its idle
state's exit latency, and on a virtual machine a halted virtual CPU is handed back
to the hypervisor, which has to schedule it again when the next packet arrives. On
the 2-core Firecracker VM these figures come from, that turned a 124 us socket
round trip into 43 us when CPUs were kept polling instead (``bench/clients.py``,
docs/service.md).

Linux's interface for this is ``/dev/cpu_dma_latency`` (the CPU latency QoS): a
process writes the largest wake-up latency it accepts, in microseconds, and the
request holds for as long as it keeps the file open. With 0, cpuidle picks only
states that exit at once: idle CPUs poll. The kernel drops the request when the
file is closed, so a crashed service leaves nothing behind. It is machine-wide
and costs CPU time (idle CPUs spin), so it is off by default
(``MECS_CPU_LATENCY_QOS_US``) and meant for nodes whose cores serve the forecast.
"""

from __future__ import annotations

import logging
import os
import struct

log = logging.getLogger("mecs.service")

#: the CPU latency QoS device (Documentation/power/pm_qos_interface.rst)
DEVICE = "/dev/cpu_dma_latency"


class CpuLatencyRequest:
    """One held request; :meth:`close` (or leaving the ``with`` block) releases it."""

    def __init__(self, latency_us: int, device: str = DEVICE) -> None:
        if latency_us < 0:
            raise ValueError(f"a CPU latency request must be >= 0 us, got {latency_us}")
        self.latency_us = latency_us
        self.device = device
        self.fd: int | None = None

    def open(self) -> bool:
        """Make the request; False (and a warning saying why) where the device refuses.

        Not being able to hold it is not fatal: the service answers the same, only
        with the slower wake-ups. The device needs root, or in a container the
        device passed in (docs/deploy.md).
        """
        if self.fd is not None:  # already held: one request, one file
            return True
        try:
            fd = os.open(self.device, os.O_WRONLY)
        except OSError as err:
            log.warning(
                "MECS_CPU_LATENCY_QOS_US=%d: cannot open %s (%s); idle CPUs may halt between calls",
                self.latency_us,
                self.device,
                err.strerror or err,
            )
            return False
        try:
            os.write(fd, struct.pack("=i", self.latency_us))
        except OSError as err:
            os.close(fd)
            log.warning("MECS_CPU_LATENCY_QOS_US: writing to %s failed (%s)", self.device, err)
            return False
        self.fd = fd
        log.info("holding a CPU latency request of %d us (%s)", self.latency_us, self.device)
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> CpuLatencyRequest:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def current_latency_us(device: str = DEVICE) -> int | None:
    """The latency in force now (the smallest request held), or None if unreadable."""
    try:
        with open(device, "rb") as f:
            return struct.unpack("=i", f.read(4))[0]
    except (OSError, struct.error):
        return None
