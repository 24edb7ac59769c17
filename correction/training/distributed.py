"""Training under ``torchrun``: one process group, DistributedDataParallel, rank 0 writes.

``mecs pretrain``, ``mecs emulator`` and ``mecs finetune`` call :func:`context`;
outside ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) it is a single
process and every helper here is the identity, so one code path serves both.
Under ``torchrun --nproc-per-node N`` (and multi-node, with torchrun's usual
rendezvous settings) it joins the process group the launcher describes: NCCL when
the stage runs on a GPU, gloo on CPU.

What agrees across ranks, and why:

- parameters start equal (the same seed, and DDP broadcasts rank 0's at wrap time);
- every rank reads only its own shard of the data (the stage decides how: chunks of
  the increment store, windows or ensemble members, emulator states);
- losses that decide something (validation, early stopping, the learning-rate
  schedule) are all-reduced, so every rank takes the same decision;
- only rank 0 writes checkpoints and publishes; the others wait at a barrier and
  learn the result from a JSON broadcast (no pickle between ranks either).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank, world size and device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this rank writes (checkpoints, artifacts, messages)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> slice:
        """This rank's share of ``n`` items taken round-robin: ``items[shard]``."""
        return slice(self.rank, n, self.world)

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks of a few numbers (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def min(self, value: int) -> int:
        """The smallest ``value`` over ranks (e.g. steps every rank can take)."""
        if not self.active:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def share(self, n: int) -> float:
        """``world * n / (n summed over ranks)``: the factor that makes DDP's average
        of per-rank mean losses the mean over every rank's samples (1 on one rank)."""
        if not self.active:
            return 1.0
        return self.world * n / max(self.sum(n)[0], 1.0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_json(self, value: Any = None) -> Any:
        """Rank 0's JSON-serialisable ``value`` on every rank."""
        if not self.active:
            return value
        dev = self._comm_device
        data = json.dumps(value).encode() if self.main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
        dist.broadcast(size, 0)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
        if self.main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel when there are several ranks."""
        if not self.active:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # the buffers are normalisation constants: nothing to synchronise per step
        # (newer torch names the option forward_sync_buffers, older broadcast_buffers)
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        return DistributedDataParallel(module, device_ids=ids, **{key: False})

    @property
    def _comm_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo CPU ones
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


_CONTEXT: Distributed | None = None


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (this rank's GPU) or ``auto`` (a GPU when there is one)."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for and no GPU is visible")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def context(device: str = "cpu") -> Distributed:
    """The job's :class:`Distributed`, joining torchrun's process group on first use.

    The backend follows the first stage's device (NCCL for a GPU, gloo for CPU);
    the group is kept for the life of the process (:func:`shutdown` ends it).
    """
    global _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    dev = pick_device(device, local)
    if world <= 1:
        return Distributed(0, 1, 0, dev)
    if _CONTEXT is None:
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            timeout = float(os.environ.get("MECS_DIST_TIMEOUT_S", "1800"))
            dist.init_process_group(
                "nccl" if dev.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=timeout),
            )
        _CONTEXT = Distributed(rank, world, local, dev)
    if dev.type == "cuda" and dist.get_backend() != "nccl":
        raise ValueError("this job's process group is gloo (CPU); a GPU stage cannot join it")
    if dev.type == "cpu" and dist.get_backend() == "nccl":
        raise ValueError("this job's process group is NCCL (GPU); a CPU stage cannot join it")
    return Distributed(rank, world, local, dev)


def shutdown() -> None:
    """Leave the process group (the CLI calls this when a command ends)."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


class Objective(torch.nn.Module):
    """One training loss as a module, so DDP sees one forward per backward.

    Unrolled fine-tuning calls the network many times per loss; wrapping the whole
    loss (``fn(*args)``) rather than the network keeps DDP's gradient reduction to
    one pass per optimiser step, whatever the loss does inside.
    """

    def __init__(self, model: torch.nn.Module, fn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> torch.Tensor:
        return self.fn(*args)


__all__ = ["Distributed", "Objective", "context", "pick_device", "shutdown"]
