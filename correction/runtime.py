"""Inference runtimes for a correction network: ONNX Runtime, TorchScript, eager torch.

A per-timestep correction network is small, so its cost is per-operator dispatch,
not arithmetic. Measured on a 2-core machine for the l96 stencil network (1 x 36
state): ~13 us per call in ONNX Runtime, ~75 us as a frozen TorchScript trace and
~150 us eagerly; for a 4 MB batch, 0.10 s against 0.63 s for TorchScript (ONNX
Runtime's convolution and fused GELU kernels). The service runs the fastest one
that can be built.

Every runtime works on numpy arrays in the network's layout (``[B, C, *H]``, plus
``[B, n_forcings]`` forcings) and is checked against the eager model on probe
batches of two sizes when it is built. One that cannot be built (package missing,
an operator the exporter does not know, a dtype the kernels lack) or that
disagrees beyond float tolerance is dropped with a log line and the next one in
:data:`RUNTIMES` is tried, down to eager torch, which is the reference. So a
faster runtime never changes an answer, it only arrives sooner.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .networks import CorrectionModel

log = logging.getLogger("mecs.runtime")

RUNTIMES = ("onnxruntime", "torchscript", "eager")
"""Fastest first; :func:`build_runtime` falls back along this order."""

# torch's ONNX exporter and tracer keep process-wide state, and warnings filters are
# process-wide too: builds (versions loading in worker threads) take turns
_BUILD_LOCK = threading.Lock()


def model_dtype(model: CorrectionModel) -> np.dtype:
    """The numpy dtype a model's runtimes take and return (that of its buffers)."""
    return np.dtype(str(model.in_mean.dtype).removeprefix("torch."))


class RuntimeCheckError(RuntimeError):
    """A runtime's answer differs from the eager model's on a probe batch."""


class EagerRuntime:
    """The network itself under ``torch.inference_mode`` (the reference)."""

    name = "eager"

    def __init__(self, model: CorrectionModel) -> None:
        self.model = model.eval()

    def _run(self, x: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        return self.model(x, f)

    def __call__(self, x: np.ndarray, forcings: np.ndarray | None = None) -> np.ndarray:
        f = None if forcings is None else torch.from_numpy(forcings)
        with torch.inference_mode():
            return self._run(torch.from_numpy(x), f).numpy()


class TorchScriptRuntime(EagerRuntime):
    """A frozen trace, optimised for inference (constant folding, op fusion)."""

    name = "torchscript"

    def __init__(self, model: CorrectionModel, example: tuple[torch.Tensor, ...]) -> None:
        super().__init__(model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)
            self.net = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def _run(self, x: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        return self.net(x) if f is None else self.net(x, f)


class OnnxRuntime:
    """The network exported to ONNX (in memory) and run by an ONNX Runtime session.

    ``threads`` is the session's intra-op thread count (0: ONNX Runtime's default);
    with 1, ``run`` executes on the calling thread, without a pool to wake.
    ``arena``: ONNX Runtime's CPU memory arena. It makes large batches about twice
    as fast (a 4 MB l96 state: 55 against 129 ms) but keeps the peak memory of the
    largest batch for the session's life (~0.5 GB after one 4 MB state), so it is
    for steady workloads of large states, not for a service that may see one.
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: CorrectionModel,
        example: tuple[torch.Tensor, ...],
        threads: int = 1,
        arena: bool = False,
    ) -> None:
        import onnxruntime as ort  # optional at import time: fall back when missing

        names = ["state", "forcings"][: len(example)]
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                example,
                buf,
                input_names=names,
                output_names=["correction"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "correction"]},
                dynamo=False,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(int(threads), 0)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no start-up chatter in the service log
        options.enable_cpu_mem_arena = bool(arena)  # small calls cost the same either way
        # a pool (threads != 1) must not busy-wait between calls: the event loop and
        # other processes share these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            buf.getvalue(), options, providers=["CPUExecutionProvider"]
        )
        self.onnx_bytes = len(buf.getvalue())

    def __call__(self, x: np.ndarray, forcings: np.ndarray | None = None) -> np.ndarray:
        feed = {"state": x} if forcings is None else {"state": x, "forcings": forcings}
        return self.session.run(None, feed)[0]

    def run_into(self, x: np.ndarray, forcings: np.ndarray | None, out: np.ndarray) -> None:
        """The correction written straight into ``out`` (contiguous, ``x``'s shape and
        dtype) through ONNX Runtime's I/O binding: no output array, no copy. For a
        4 MB state in a caller's shared-memory region this saves a 4 MB copy per call."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("state", x)
        if forcings is not None:
            binding.bind_cpu_input("forcings", forcings)
        binding.bind_output("correction", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(binding)


def _probes(
    model: CorrectionModel, packed_shape: Sequence[int], n_forcings: int
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Two batches (1 and 5 samples) drawn around the training input statistics."""
    gen = np.random.default_rng(0)
    dtype = model_dtype(model)
    mean = model.in_mean.double().numpy().reshape(1, -1, *([1] * (len(packed_shape) - 1)))
    std = model.in_std.double().numpy().reshape(mean.shape)
    out = []
    for b in (1, 5):
        x = (mean + std * gen.standard_normal((b, *packed_shape))).astype(dtype)
        f = gen.standard_normal((b, n_forcings)).astype(dtype) if n_forcings else None
        out.append((x, f))
    return out


def _check(runtime, reference: EagerRuntime, probes, rtol: float, atol: float) -> None:
    """Compare in units of the training targets' std, so small physical values count."""
    model = reference.model
    for x, f in probes:
        want, got = reference(x, f), runtime(x, f)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise RuntimeCheckError(
                f"answer of shape {got.shape} {got.dtype}, eager gives {want.shape} {want.dtype}"
            )
        scale = model.out_std.double().numpy().reshape(1, -1, *([1] * (want.ndim - 2)))
        got_n, want_n = got / scale, want / scale
        if not np.allclose(got_n, want_n, rtol=rtol, atol=atol):
            err = float(np.max(np.abs(got_n - want_n)))
            raise RuntimeCheckError(
                f"differs from eager by up to {err:.3g} target stds on a probe batch"
            )


def build_runtime(
    model: CorrectionModel,
    packed_shape: Sequence[int],
    preferred: str = "onnxruntime",
    threads: int = 1,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    label: str = "model",
    arena: bool = False,
):
    """The fastest runtime at or after ``preferred`` in :data:`RUNTIMES` that passes the check.

    The check compares with eager torch in units of the training targets' std
    (``rtol``, ``atol``). ``packed_shape`` is the network's per-sample input shape
    ``(C, *H)``. The returned callable maps ``[B, C, *H]`` (and ``[B, n_forcings]``)
    numpy arrays in the model's dtype to the network's output; its ``name`` says
    which runtime it is. ``threads`` and ``arena`` are :class:`OnnxRuntime`'s.
    """
    if preferred not in RUNTIMES:
        raise ValueError(f"unknown runtime {preferred!r}; choose one of {RUNTIMES}")
    model = model.eval()
    reference = EagerRuntime(model)
    probes = _probes(model, packed_shape, int(model.n_forcings))
    x0, f0 = probes[0]
    example = tuple(torch.from_numpy(a) for a in (x0, f0) if a is not None)
    for name in RUNTIMES[RUNTIMES.index(preferred) :]:
        if name == "eager":
            return reference
        try:
            with _BUILD_LOCK:
                if name == "onnxruntime":
                    runtime = OnnxRuntime(model, example, threads, arena)
                else:
                    runtime = TorchScriptRuntime(model, example)
            _check(runtime, reference, probes, rtol, atol)
            return runtime
        except Exception as err:  # any failure: the next runtime, never a wrong answer
            log.warning(
                "%s: runtime %s not used (%s: %s)",
                label,
                name,
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
    return reference


__all__ = [
    "RUNTIMES",
    "EagerRuntime",
    "OnnxRuntime",
    "RuntimeCheckError",
    "TorchScriptRuntime",
    "build_runtime",
    "model_dtype",
]
