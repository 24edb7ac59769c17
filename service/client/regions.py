"""The shared-memory calls of :class:`~service.client.CorrectionClient`.

A mixin, kept beside :mod:`service.client.shm` (the regions themselves), for a
caller on the server's host whose server runs with ``MECS_SHARED_MEMORY=true``:
register a region, infer with the state and the correction in it, unregister.
It uses the client's ``_send``, ``_get_json``, ``_encoded`` header cache, group
and ``dt_unit``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import numpy as np

from .result import InferResult
from .shm import SharedMemoryRegion, region_request
from .transport import NotTheProtocol


class RegionCalls:
    """Register, use and drop shared-memory regions (Triton's system shared memory)."""

    def register_region(self, name: str, key: str, offset: int, byte_size: int) -> dict:
        """Register ``byte_size`` bytes at ``offset`` of shared-memory object ``key``."""
        body = json.dumps({"key": key, "offset": offset, "byte_size": byte_size}).encode()
        path = f"/v2/systemsharedmemory/region/{quote(name, safe='')}/register"
        _, _, data = self._send(
            "POST", path, body, {"Content-Type": "application/json"}, idempotent=False
        )
        return json.loads(data)

    def unregister_region(self, name: str | None = None) -> dict:
        """Drop one region of this client's key (all of them when ``name`` is None)."""
        path = (
            f"/v2/systemsharedmemory/region/{quote(name, safe='')}/unregister"
            if name is not None
            else "/v2/systemsharedmemory/unregister"
        )
        _, _, data = self._send("POST", path, b"", idempotent=False)
        return json.loads(data)

    def region_status(self, name: str | None = None) -> list[dict]:
        path = (
            f"/v2/systemsharedmemory/region/{quote(name, safe='')}/status"
            if name is not None
            else "/v2/systemsharedmemory/status"
        )
        return self._get_json(path)

    def infer_in_region(
        self,
        region: SharedMemoryRegion,
        shape: tuple[int, ...],
        dtype: Any = np.float32,
        state_offset: int = 0,
        output_offset: int | None = None,
        dt: float | None = None,
        dt_unit: str | None = None,
    ) -> InferResult:
        """An infer call whose state is in ``region`` and whose correction is put there.

        The state is ``shape`` (``[batch, *state_shape]``) at ``state_offset``; the
        correction comes back at ``output_offset`` (default: right after the state)
        and :attr:`InferResult.correction` is a view of it, valid until the next call.
        """
        dtype = np.dtype(dtype)
        datatype = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64"}.get(dtype)
        if datatype is None:
            raise TypeError(f"the state must be float32 or float64, got {dtype}")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if output_offset is None:
            output_offset = state_offset + nbytes
        out = region.array(shape, dtype, output_offset)
        region.array(shape, dtype, state_offset)  # checks that the state fits too
        params: dict[str, Any] = {}
        if dt is not None:
            params["dt"] = float(dt)
        unit = dt_unit or self.dt_unit
        if unit is not None:
            params["dt_unit"] = unit
        if self.group is not None:
            params["group"], params["group_size"] = self.group, self.group_size
        key = ("region", region.name, tuple(shape), datatype, state_offset, output_offset)
        key += tuple(params.items())
        cached = self._encoded
        if cached is not None and cached[0] == key:
            body = cached[1]
        else:
            body = region_request(
                region.name, shape, datatype, nbytes, state_offset, output_offset, params
            )
            self._encoded = (key, body, {"Content-Type": "application/json"})
        self.calls += 1
        _, h, data = self._send(
            "POST", self._infer_path, [body], {"Content-Type": "application/json"}
        )
        try:
            header = json.loads(data)
            p = header.get("parameters") or {}
            flags = [False] * shape[0]
            for i in filter(None, str(p.get("out_of_distribution_samples", "")).split(",")):
                flags[int(i)] = True
            result = InferResult(
                correction=out,
                model_name=str(header["model_name"]),
                model_version=int(header["model_version"]),
                out_of_distribution=flags,
                capped_values=int(p.get("capped_values", 0)),
                batch_size=int(p.get("batch_size", shape[0])),
                parameters=p,
                id=header.get("id"),
                server_timing=h.get("server-timing", ""),
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            self._conn.close()
            raise NotTheProtocol(
                f"POST {self._infer_path}: a 200 answer that is not an infer response "
                f"({type(err).__name__}: {err})"
            ) from None
        self.last_result = result
        return result
