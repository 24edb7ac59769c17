"""System shared-memory regions: tensors that never cross the socket.

A caller on the same host as the server (a forecast model's process next to its
correction service) creates a POSIX shared-memory object (``/dev/shm/<key>``),
registers a window of it under a region name (``POST
/v2/systemsharedmemory/region/<name>/register``, the inference scope), and then
sends infer requests whose inputs and outputs name ``shared_memory_region``,
``shared_memory_offset`` and ``shared_memory_byte_size`` instead of carrying bytes.
The server reads the state from the region and writes the correction into it; the
HTTP body holds the JSON header alone. This is Triton's system shared-memory
extension, with two additions:

- **ownership**: a region belongs to the key that registered it. Other keys can
  neither see, use, nor unregister it; they get 404 as for a name never
  registered (no probing of other callers' names);
- **bounds**: every reference is checked against its region, and the region
  against the object's size at each use (``fstat``), so a caller that shrinks its
  object is refused instead of crashing the server with ``SIGBUS``. (A shrink that
  lands between that check and the read is the one case left; see docs/service.md.)

Callers that die without unregistering: Python's ``multiprocessing`` resource
tracker unlinks a dead process's objects, and a region whose object is gone (or
replaced under the same key) is dropped at its next use and by the sweep every
registration and status call runs; a region unused for ``shared_memory_idle_s`` is
dropped too. Nothing is pickled: only bytes of the caller's choosing are read.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ServiceError

log = logging.getLogger("mecs.service")

_KEY = re.compile(r"^/?[A-Za-z0-9_.-]{1,200}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass
class Region:
    """One registered window of a shared-memory object."""

    name: str
    key: str
    offset: int
    byte_size: int
    owner: str
    fd: int
    inode: tuple[int, int]
    mapping: mmap.mmap
    view: memoryview
    last_used: float = field(default_factory=time.monotonic)

    def status(self) -> dict:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


class SharedMemoryRegistry:
    """The registered regions of one server, by owner and name."""

    def __init__(
        self,
        enabled: bool,
        root: Path,
        max_regions: int,
        max_bytes: int,
        idle_s: float,
    ) -> None:
        self.enabled = enabled
        self.root = Path(root)
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.regions: dict[tuple[str, str], Region] = {}
        self.mapped = 0
        self._closing: list[Region] = []  # still referenced by a request in flight

    def require_enabled(self) -> None:
        if not self.enabled:
            raise ServiceError(
                404,
                "shared memory is not enabled on this server (MECS_SHARED_MEMORY=true turns it on)",
            )

    def register(self, owner: str, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Map ``byte_size`` bytes at ``offset`` of object ``key`` as region ``name``."""
        self.require_enabled()
        self.sweep()
        if not _NAME.match(name):
            raise ServiceError(
                400, f"region name {name!r} must be 1-128 letters, digits, '.', '_' or '-'"
            )
        if not isinstance(key, str) or not _KEY.match(key) or key.strip("/") in (".", ".."):
            raise ServiceError(
                400,
                f"key {key!r} must name a shared-memory object: an optional '/' then 1-200 "
                "letters, digits, '.', '_' or '-'",
            )
        for what, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ServiceError(400, f"'{what}' must be an integer >= 0, got {value!r}")
        if byte_size == 0:
            raise ServiceError(400, "'byte_size' must be at least 1")
        if (owner, name) in self.regions:
            raise ServiceError(409, f"region '{name}' is already registered; unregister it first")
        if len(self.regions) >= self.max_regions:
            raise ServiceError(
                409,
                f"{len(self.regions)} shared-memory regions are registered, the most this "
                "server keeps (MECS_MAX_SHARED_MEMORY_REGIONS); unregister some",
            )
        if self.mapped + byte_size > self.max_bytes:
            raise ServiceError(
                413,
                f"region '{name}' of {byte_size} bytes would take the mapped shared memory "
                f"past {self.max_bytes} bytes (MECS_MAX_SHARED_MEMORY_BYTES)",
            )
        path = self.root / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ELOOP):
                raise ServiceError(
                    400, f"no shared-memory object '{key}' on the server's host"
                ) from None
            raise ServiceError(
                400, f"shared-memory object '{key}' cannot be opened: {err.strerror}"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ServiceError(400, f"'{key}' is not a shared-memory object")
            if offset + byte_size > st.st_size:
                raise ServiceError(
                    400,
                    f"region '{name}': offset {offset} + byte_size {byte_size} passes the end "
                    f"of '{key}' ({st.st_size} bytes)",
                )
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapping = mmap.mmap(fd, offset + byte_size - start, offset=start)
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(mapping)[offset - start :]
        region = Region(
            name, key, offset, byte_size, owner, fd, (st.st_dev, st.st_ino), mapping, view
        )
        self.regions[(owner, name)] = region
        self.mapped += byte_size
        log.info("shared-memory region '%s' registered (%s, %d bytes)", name, key, byte_size)
        return region

    def unregister(self, owner: str, name: str | None = None) -> list[str]:
        """Drop ``name`` (all of ``owner``'s regions when None); the names dropped."""
        self.require_enabled()
        if name is not None:
            if (owner, name) not in self.regions:
                raise ServiceError(404, f"no shared-memory region '{name}'")
            keys = [(owner, name)]
        else:
            keys = [k for k in self.regions if k[0] == owner]
        for k in keys:
            self._drop(k, "unregistered")
        return [k[1] for k in keys]

    def status(self, owner: str, name: str | None = None) -> list[dict]:
        self.require_enabled()
        self.sweep()
        if name is not None:
            region = self.regions.get((owner, name))
            if region is None:
                raise ServiceError(404, f"no shared-memory region '{name}'")
            return [region.status()]
        return [r.status() for (o, _), r in sorted(self.regions.items()) if o == owner]

    def resolver(self, owner: str) -> Callable:
        """``view(spec, writable)``: the bytes a tensor reference names, checked."""

        def view(spec, writable: bool) -> memoryview:
            return self.view(owner, spec.region, spec.region_offset, spec.size, spec.name)

        return view

    def view(self, owner: str, name: str, offset: int, size: int, tensor: str) -> memoryview:
        """``size`` bytes at ``offset`` of ``owner``'s region ``name``."""
        if not self.enabled:
            raise ServiceError(
                400, f"'{tensor}' refers to shared memory, which this server does not enable"
            )
        region = self.regions.get((owner, name))
        if region is None:
            raise ServiceError(400, f"'{tensor}': no shared-memory region '{name}' is registered")
        if offset + size > region.byte_size:
            raise ServiceError(
                400,
                f"'{tensor}': bytes {offset} to {offset + size} pass the end of region "
                f"'{name}' ({region.byte_size} bytes)",
            )
        try:
            st = os.fstat(region.fd)
            alive = os.stat(self.root / region.key.lstrip("/"), follow_symlinks=False)
        except OSError:
            alive = None
        if alive is None or (alive.st_dev, alive.st_ino) != region.inode:
            self._drop((owner, name), "its object is gone")
            raise ServiceError(
                400, f"'{tensor}': shared-memory object '{region.key}' of region '{name}' is gone"
            )
        if st.st_size < region.offset + region.byte_size:  # reading it now would SIGBUS
            self._drop((owner, name), "its object shrank")
            raise ServiceError(
                400,
                f"'{tensor}': shared-memory object '{region.key}' shrank below region "
                f"'{name}'; the region is dropped",
            )
        region.last_used = time.monotonic()
        return region.view[offset : offset + size]

    def sweep(self) -> None:
        """Drop regions whose object is gone or replaced, or that sat unused too long."""
        now = time.monotonic()
        for k, region in list(self.regions.items()):
            try:
                st = os.stat(self.root / region.key.lstrip("/"), follow_symlinks=False)
                gone = (st.st_dev, st.st_ino) != region.inode
            except OSError:
                gone = True
            if gone:
                self._drop(k, "its object is gone")
            elif now - region.last_used > self.idle_s:
                self._drop(k, f"unused for {self.idle_s:g} s")
        self._close_pending()

    def close(self) -> None:
        for k in list(self.regions):
            self._drop(k, "the server stops")
        self._close_pending()

    def _drop(self, k: tuple[str, str], why: str) -> None:
        region = self.regions.pop(k, None)
        if region is None:
            return
        self.mapped -= region.byte_size
        log.info("shared-memory region '%s' dropped: %s", region.name, why)
        self._closing.append(region)
        self._close_pending()

    def _close_pending(self) -> None:
        left = []
        for region in self._closing:
            try:
                region.view.release()
                region.mapping.close()
            except BufferError:  # a request in flight still reads it: close it later
                left.append(region)
                continue
            os.close(region.fd)
        self._closing = left
