"""Shared-memory transport for a caller on the server's host.

The state is written straight into a POSIX shared-memory object that the server
has mapped too; an infer call then carries only its JSON header, and the server
writes the correction into the same object. For a 4 MB state this takes the
body's copies through the socket off both sides (``bench/service.py``).

    with SharedMemoryRegion(client, "run-42", state_bytes * 2) as region:
        state = region.array(shape, np.float32)           # the model's state lives here
        ...                                               # step the model, in place
        result = client.infer_in_region(region, shape, np.float32)
        state += dt * result.correction                   # a view of the region

The object is a file under ``/dev/shm`` (POSIX shared memory on Linux), created
for this process alone (mode 0600) and handed to :mod:`multiprocessing`'s resource
tracker, which unlinks it if this process dies without closing it; the server
notices and drops the region. Needs a server started with ``MECS_SHARED_MEMORY=true``.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import secrets
from multiprocessing import resource_tracker
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .client import CorrectionClient


class SharedMemoryRegion:
    """A shared-memory object of this process, registered with the client's server."""

    def __init__(
        self, client: CorrectionClient, name: str, byte_size: int, root: str = "/dev/shm"
    ) -> None:
        if byte_size < 1:
            raise ValueError("byte_size must be at least 1")
        self.client = client
        self.name = name
        self.byte_size = int(byte_size)
        self.key = f"/mecs_{secrets.token_hex(8)}"
        self.path = os.path.join(root, self.key[1:])
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.byte_size)
            self.mapping = mmap.mmap(fd, self.byte_size)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)  # the mapping keeps the memory
        resource_tracker.register(self.key, "shared_memory")  # unlinked if we die
        self.closed = False
        try:
            client.register_region(name, self.key, 0, self.byte_size)
        except BaseException:
            self.closed = True
            self._release()
            raise

    @property
    def buffer(self) -> memoryview:
        return memoryview(self.mapping)

    def array(self, shape: tuple[int, ...], dtype: Any = np.float32, offset: int = 0) -> np.ndarray:
        """A numpy view of ``shape`` at byte ``offset`` of the region (no copy)."""
        dtype = np.dtype(dtype).newbyteorder("<")
        count = int(np.prod(shape))
        if offset < 0 or offset + count * dtype.itemsize > self.byte_size:
            raise ValueError(
                f"{list(shape)} {dtype.name} at offset {offset} does not fit the region's "
                f"{self.byte_size} bytes"
            )
        return np.frombuffer(self.mapping, dtype, count, offset).reshape(shape)

    def close(self) -> None:
        """Unregister (when the server still answers), then unlink the object."""
        if self.closed:
            return
        self.closed = True
        try:
            self.client.unregister_region(self.name)
        finally:
            self._release()

    def _release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        resource_tracker.unregister(self.key, "shared_memory")
        with contextlib.suppress(BufferError):  # arrays of it still alive keep the mapping
            self.mapping.close()

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def region_request(
    region: str,
    shape: tuple[int, ...],
    datatype: str,
    nbytes: int,
    state_offset: int,
    output_offset: int,
    parameters: dict[str, Any],
) -> bytes:
    """The JSON body of an infer call whose state and correction live in ``region``."""
    header: dict[str, Any] = {}
    if parameters:
        header["parameters"] = parameters
    where = {"shared_memory_region": region, "shared_memory_byte_size": nbytes}
    header["inputs"] = [
        {
            "name": "state",
            "datatype": datatype,
            "shape": list(shape),
            "parameters": {**where, "shared_memory_offset": state_offset},
        }
    ]
    header["outputs"] = [
        {"name": "correction", "parameters": {**where, "shared_memory_offset": output_offset}}
    ]
    return json.dumps(header, separators=(",", ":")).encode()
