"""``process:COMMAND``: an external host model, started once, stepped over ``mecs-step/1``.

The process is started on first use and kept for every later step (a forecast
model's start-up may cost seconds; a step, milliseconds). Its standard error is
drained by a thread into a short ring of lines, so a chatty host never blocks on
a full pipe and an error message can show what it said last. Every failure is a
:class:`HostProcessError` naming the step: the process exited (with its status),
did not answer within ``timeout_s`` (it is killed), or answered something that is
not the protocol, the wrong id, shape or datatype, or NaN/Inf. After a failure
the process is gone; nothing is retried, because a host that failed mid-run
cannot be trusted to be in the state the caller thinks.
"""

from __future__ import annotations

import collections
import os
import select
import shlex
import subprocess
import threading
import time
from typing import Any

import numpy as np

from ..stepproto import (
    DTYPES,
    MAX_HEADER,
    PROTOCOL,
    StepProtocolError,
    parse_header,
    tensor_spec,
    write_message,
)
from .base import BlackBoxHost


class HostProcessError(RuntimeError):
    """The host process failed; the message names the command, the step and the cause."""


class ProcessHost(BlackBoxHost):
    """A host model in another process (see :mod:`correction.stepproto`).

    A black box (no gradients). ``state_shape``, ``dt`` and ``name`` come from the
    process's hello message; a caller that knows what to expect passes
    ``state_shape`` and gets a clear error at start-up when the process disagrees.
    """

    def __init__(
        self,
        command: str | list[str],
        timeout_s: float = 60.0,
        state_shape: tuple[int, ...] | None = None,
        env: dict[str, str] | None = None,
        fields: list[str] | None = None,
    ) -> None:
        self.argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.argv:
            raise ValueError("process host: empty command")
        self.command = " ".join(self.argv)
        self.timeout_s = float(timeout_s)
        self.env = env
        # what each channel of the state is (``T[lev=0]``, ..., ``ps``), sent with every step
        self.fields = list(fields) if fields else None
        self.proc: subprocess.Popen | None = None
        self.steps = 0
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._buf = bytearray()
        hello = self._start()
        shape = tuple(int(s) for s in hello["state_shape"])
        if state_shape is not None and tuple(state_shape) != shape:
            self.close()
            raise HostProcessError(
                f"host process '{self.command}' has state shape {list(shape)}, but the "
                f"model expects {list(state_shape)}"
            )
        super().__init__(self._step_numpy, shape, float(hello["dt"]), str(hello.get("name")))
        self.time_unit = str(hello.get("time_unit", "model time unit"))
        self.dtype = DTYPES[hello.get("dtype", "FP64")]

    # -- the process -----------------------------------------------------------------
    def _start(self) -> dict[str, Any]:
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        except OSError as err:
            raise HostProcessError(f"cannot start host process '{self.command}': {err}") from None
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        hello = self._read_header("its hello message")
        if hello.get("protocol") != PROTOCOL:
            self._fail(f"said {hello.get('protocol')!r} in its hello, expected {PROTOCOL!r}")
        shape = hello.get("state_shape")
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) for s in shape):
            self._fail("gave no valid 'state_shape' in its hello")
        dt = hello.get("dt")
        if isinstance(dt, bool) or not isinstance(dt, int | float) or not dt > 0:
            self._fail(f"gave an invalid 'dt' in its hello: {dt!r}")
        if hello.get("dtype", "FP64") not in DTYPES:
            self._fail(f"gave an unknown dtype {hello.get('dtype')!r} in its hello")
        return hello

    def _drain(self, pipe) -> None:
        for raw in iter(pipe.readline, b""):
            self._stderr.append(raw.decode("utf-8", "replace").rstrip())

    def _where(self) -> str:
        return "at start-up" if self.steps == 0 else f"at step {self.steps}"

    def _fail(self, what: str) -> None:
        """Kill the process and raise, with its exit status and its last words."""
        status = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                status = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                status = None
            time.sleep(0.05)  # let the stderr thread take the last lines
        tail = "; its last output: " + " | ".join(self._stderr) if self._stderr else ""
        code = f" (exit status {status})" if status not in (None, 0, -9) else ""
        self.proc = None
        raise HostProcessError(f"host process '{self.command}' {what} {self._where()}{code}{tail}")

    def _read(self, n: int | None, what: str) -> bytes:
        """``n`` bytes (or one header line when ``n`` is None) within the timeout."""
        deadline = time.monotonic() + self.timeout_s
        fd = self.proc.stdout.fileno()
        while True:
            if n is None:
                end = self._buf.find(b"\n")
                if end >= 0:
                    out = bytes(self._buf[: end + 1])
                    del self._buf[: end + 1]
                    return out
                if len(self._buf) > MAX_HEADER:
                    self._fail(f"sent a header line longer than {MAX_HEADER} bytes for {what}")
            elif len(self._buf) >= n:
                out = bytes(self._buf[:n])
                del self._buf[:n]
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"did not answer within {self.timeout_s:g} s ({what}); killed it")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self._fail(f"exited before sending {what}")
            self._buf += chunk

    def _read_header(self, what: str) -> dict[str, Any]:
        line = self._read(None, what)
        try:
            return parse_header(line, f"host process '{self.command}' {what}")
        except StepProtocolError as err:
            self._fail(f"broke the protocol: {err}")
            raise  # pragma: no cover - _fail raises

    # -- stepping --------------------------------------------------------------------
    def _step_numpy(self, x: np.ndarray, steps: int = 1) -> np.ndarray:
        if self.proc is None:
            raise HostProcessError(
                f"host process '{self.command}' is not running (it failed earlier)"
            )
        x = np.ascontiguousarray(x, dtype=self.dtype)
        self.steps += 1
        request = {
            "op": "step",
            "id": self.steps,
            "steps": int(steps),
            "shape": list(x.shape),
            "datatype": "FP64" if self.dtype == np.float64 else "FP32",
        }
        if self.fields:
            request["fields"] = self.fields
        try:
            write_message(self.proc.stdin, request, x)
        except (BrokenPipeError, OSError):
            self._fail("stopped reading its input")
        header = self._read_header("its answer")
        if "error" in header:
            self._fail(f"refused the step: {header['error']}")
        if header.get("id") != self.steps:
            self._fail(f"answered id {header.get('id')!r} to request {self.steps}")
        try:
            shape, dtype = tensor_spec(header, "answer")
        except StepProtocolError as err:
            self._fail(f"broke the protocol: {err}")
        if shape != x.shape or dtype != self.dtype:
            self._fail(
                f"answered shape {list(shape)} {header.get('datatype')} for a state of shape "
                f"{list(x.shape)} {request['datatype']}"
            )
        raw = self._read(int(np.prod(shape)) * dtype.itemsize, "its answer's values")
        y = np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
        if not np.isfinite(y).all():
            bad = np.flatnonzero(~np.isfinite(y.reshape(y.shape[0], -1)).all(axis=1))
            self._fail(f"answered NaN or Inf (members {bad[:10].tolist()})")
        return y.astype(np.float64)

    def close(self) -> None:
        """Ask the process to exit (``close``), kill it if it does not."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            write_message(proc.stdin, {"op": "close"})
            proc.stdin.close()
            proc.wait(5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __enter__(self) -> ProcessHost:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten host must not outlive its caller
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
