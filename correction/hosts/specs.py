"""Host specs: the one string that says which host model a stage steps, recorded in artifacts.

- ``torch:NAME`` (or a bare ``NAME``): a registered in-process torch host
  (:data:`correction.hosts.HOSTS`), differentiable;
- ``python:MODULE:CALLABLE``: ``CALLABLE(states: np.ndarray) -> np.ndarray`` steps a
  batch ``[members, *state_shape]`` by one host step; a black box. Its state shape
  comes from the correction model (or ``state_shape=``) and ``dt`` must be given;
- ``process:COMMAND``: an external program speaking ``mecs-step/1``
  (:mod:`correction.stepproto`), started once and kept; a black box;
- ``archive:STORE``: no live host, only a forecast archive. Stages that need host
  steps refuse it, naming the adapters that would do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .base import BlackBoxHost, HostModel

KINDS = ("torch", "python", "process", "archive")


class HostSpecError(ValueError):
    """A host spec that cannot be used; the message names the spec and the fix."""


@dataclass(frozen=True)
class HostSpec:
    """A parsed spec: ``kind`` and its ``target`` (name, module:callable, command, store)."""

    kind: str
    target: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    @property
    def live(self) -> bool:
        """Whether it steps states (everything but ``archive:``)."""
        return self.kind != "archive"


def parse_host_spec(spec: str) -> HostSpec:
    """``"process:./model --fast"`` -> ``HostSpec("process", "./model --fast")``."""
    from . import HOSTS

    text = str(spec).strip()
    kind, sep, target = text.partition(":")
    if not sep:  # a bare registered name, as before specs existed
        kind, target = "torch", text
    if kind not in KINDS:
        raise HostSpecError(
            f"host spec {text!r}: unknown kind {kind!r}; use torch:NAME, "
            "python:MODULE:CALLABLE, process:COMMAND or archive:STORE"
        )
    target = target.strip()
    if not target:
        raise HostSpecError(f"host spec {text!r}: nothing after '{kind}:'")
    if kind == "torch" and target not in HOSTS:
        raise HostSpecError(
            f"host spec {text!r}: no registered torch host {target!r} (known: {sorted(HOSTS)})"
        )
    if kind == "python" and target.count(":") != 1:
        raise HostSpecError(f"host spec {text!r}: write python:MODULE:CALLABLE")
    return HostSpec(kind, target)


def make_host_from_spec(
    spec: str | HostSpec,
    params: dict[str, Any] | None = None,
    state_shape: tuple[int, ...] | None = None,
    dt: float | None = None,
    timeout_s: float = 60.0,
    fields: list[str] | None = None,
) -> HostModel:
    """Build the host a spec names.

    ``params`` go to a torch host's constructor; ``state_shape`` (from the
    correction model) is checked against what the host says; ``dt`` is required
    for ``python:`` hosts (a callable cannot say its own time step); ``fields`` (the
    layout's channel names) is sent to a ``process:`` host with every step.
    """
    from . import make_host
    from .process import ProcessHost

    s = spec if isinstance(spec, HostSpec) else parse_host_spec(spec)
    params = dict(params or {})
    if s.kind == "torch":
        try:
            host = make_host(s.target, **params)
        except TypeError as err:
            raise HostSpecError(f"host {s}: {err}") from None
        if state_shape is not None and tuple(host.state_shape) != tuple(state_shape):
            raise HostSpecError(
                f"host {s} has state shape {list(host.state_shape)}, the model expects "
                f"{list(state_shape)}"
            )
        return host
    if params:
        raise HostSpecError(
            f"host {s}: parameters {sorted(params)} are for torch hosts; a {s.kind} host "
            "takes its settings in its own command or module"
        )
    if s.kind == "python":
        module, _, name = s.target.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise HostSpecError(f"host {s}: cannot import {s.target}: {err}") from None
        if not callable(fn):
            raise HostSpecError(f"host {s}: {s.target} is not callable")
        if state_shape is None or dt is None:
            raise HostSpecError(
                f"host {s}: a python host needs the state shape (from the model) and dt (--host-dt)"
            )
        return BlackBoxHost(fn, tuple(state_shape), float(dt), name=str(s))
    if s.kind == "process":
        return ProcessHost(s.target, timeout_s=timeout_s, state_shape=state_shape, fields=fields)
    raise HostSpecError(
        f"host {s} is a forecast archive, not a live model: this stage steps the host, "
        "so give torch:NAME, python:MODULE:CALLABLE or process:COMMAND"
    )


def close_host(host: Any) -> None:
    """Stop a host that holds a process (a no-op for the others)."""
    close = getattr(host, "close", None)
    if callable(close):
        close()
