"""The fine-tuning modes as registered strategies, chosen by name.

Every mode compares the corrected trajectory with the *analyses* at the following
analysis times (never the truth, unknown in operations). A strategy says where the
forward values and the gradients come from - a :class:`~correction.rollout.Gradient`
policy of the one rollout - and which loss it minimises (List et al. 2024, Holl et
al. 2022, Frezat et al. 2023):

=============== ============================ =====================================
mode            forward values               gradients through time
=============== ============================ =====================================
one-step        -- (a priori increments)     --
unrolled        real host + correction       none (stopped at each step's input)
emulator        emulator + correction        emulator
hybrid          real host + correction       emulator Jacobian (straight-through)
differentiable  real host + correction       real host (torch hosts only)
sip             real host + correction       Gauss-Newton step through emulator,
                                             then L2 proxy loss on the outputs
=============== ============================ =====================================

Every mode but ``differentiable`` calls the host as a black box, forward only. A new
mode is a subclass with ``@register``; its name is what artifacts record.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from correction.corrections import Correction
from correction.hosts import HostModel
from correction.rollout import Gradient, rollout

from ..settings import MODES

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy to :data:`STRATEGIES` under its ``name``."""
    if cls.name in STRATEGIES:
        raise ValueError(f"fine-tuning mode {cls.name!r} is registered twice")
    if cls.name not in MODES:
        raise ValueError(f"fine-tuning mode {cls.name!r} is not in the settings' MODES")
    STRATEGIES[cls.name] = cls
    return cls


class Strategy:
    """One fine-tuning mode: steps the corrected model and defines the loss.

    ``correction`` is the trainable network, ``host`` the host called forward only,
    ``steps`` host steps per analysis interval; ``emulator`` and ``torch_host`` are
    required by the modes that say so.
    """

    name: ClassVar[str]
    gradient: ClassVar[Gradient] = Gradient.NONE
    needs_emulator: ClassVar[bool] = False
    needs_torch_host: ClassVar[bool] = False

    def __init__(
        self,
        correction: Correction,
        host: HostModel,
        steps: int,
        emulator: HostModel | None = None,
        torch_host: HostModel | None = None,
        sip_damping: float = 0.1,
    ) -> None:
        if self.needs_emulator and emulator is None:
            raise ValueError(f"mode {self.name!r} needs an emulator (--emulator PATH)")
        if self.needs_torch_host and (torch_host is None or not torch_host.differentiable):
            raise ValueError(f"mode {self.name!r} needs a host written in torch")
        self.correction, self.host, self.steps = correction, host, steps
        self.emulator, self.torch_host = emulator, torch_host
        self.sip_damping = sip_damping
        self.dt = float(host.dt)

    def per_channel(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values`` (one per channel: field and level) laid out as one state, ``[1, *state]``.

        Losses divide each channel by its own scale, so a field in Pa does not drown
        one in K. A single-channel state (Lorenz-96) gets one scale everywhere, as
        before channels were told apart.
        """
        layout = getattr(self.correction, "layout", None)
        values = torch.as_tensor(values, dtype=like.dtype).reshape(-1)
        if layout is None or values.numel() == 1:
            return values.reshape(1, *([1] * (like.ndim - 1))).expand(1, *like.shape[1:])
        h = layout.horizontal_shape
        packed = values.reshape(1, -1, *([1] * len(h))).expand(1, values.numel(), *h)
        return layout.unpack(packed.contiguous())

    def interval(self, x: torch.Tensor, gradient: Gradient | None = None) -> torch.Tensor:
        """One analysis interval (``steps`` host steps) under this mode's gradients."""
        gradient = self.gradient if gradient is None else gradient
        host = self.torch_host if gradient is Gradient.FULL else self.host
        return rollout(host, self.correction, x, self.steps, gradient, surrogate=self.emulator)

    def a_posteriori(
        self,
        a: torch.Tensor,
        starts: np.ndarray,
        n: int,
        clim_var: float,
        gradient: Gradient | None = None,
    ) -> torch.Tensor:
        """Mean squared distance to the next ``n`` analyses, in climatological variances.

        ``clim_var`` is one variance per channel (or one for all): each field and
        level is measured against its own climatology.
        """
        x = a[starts]
        scale = self.per_channel(torch.as_tensor(clim_var, dtype=a.dtype), x)
        loss = torch.zeros((), dtype=a.dtype)
        for k in range(1, n + 1):
            x = self.interval(x, gradient)
            loss = loss + torch.mean((x - a[starts + k]) ** 2 / scale)
        return loss / n

    def loss(
        self,
        a: torch.Tensor,
        starts: np.ndarray,
        n: int,
        out_std: torch.Tensor,
        clim_var: float,
    ) -> torch.Tensor:
        """The loss this mode minimises on the windows starting at ``starts``."""
        return self.a_posteriori(a, starts, n, clim_var)

    def validation_loss(
        self, a: torch.Tensor, starts: np.ndarray, n: int, clim_var: float
    ) -> float:
        """The a posteriori loss with the real host's values: the same for every mode."""
        with torch.no_grad():
            return float(self.a_posteriori(a, starts, n, clim_var, Gradient.NONE))


@register
class OneStep(Strategy):
    """A priori: the correction fitted to one-interval increments, no unrolling."""

    name = "one-step"

    def loss(self, a, starts, n, out_std, clim_var):
        x = a[starts]
        fc = rollout(self.host, None, x, self.steps)
        target = (a[starts + 1] - fc) / (self.steps * self.dt)
        pred = self.correction.tendency(x)
        return torch.mean(((pred - target) / self.per_channel(out_std, pred)) ** 2)


@register
class Unrolled(Strategy):
    """The real host unrolled with the correction; gradients stop at each step."""

    name = "unrolled"
    gradient = Gradient.TRUNCATED


@register
class EmulatorMode(Strategy):
    """Forward and backward through the emulator (Frezat et al. 2023)."""

    name = "emulator"
    gradient = Gradient.SURROGATE
    needs_emulator = True


@register
class Hybrid(Strategy):
    """The real host's values, the emulator's Jacobian (straight-through)."""

    name = "hybrid"
    gradient = Gradient.STRAIGHT_THROUGH
    needs_emulator = True


@register
class Differentiable(Strategy):
    """Through the host itself: only for hosts written in torch (the oracle)."""

    name = "differentiable"
    gradient = Gradient.FULL
    needs_torch_host = True


@register
class SIP(Strategy):
    """Scale-invariant physics updates through the emulator (Holl et al. 2022)."""

    name = "sip"
    needs_emulator = True

    def loss(self, a, starts, n, out_std, clim_var):
        from .sip import sip_loss

        targets = torch.stack([a[starts + k] for k in range(1, n + 1)], 1)
        return sip_loss(self, a[starts], targets, self.sip_damping, out_std)


def make_strategy(mode: str, *args, **kwargs) -> Strategy:
    """The registered strategy called ``mode``."""
    try:
        cls = STRATEGIES[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; modes: {list(STRATEGIES)}") from None
    return cls(*args, **kwargs)


if tuple(STRATEGIES) != MODES:  # every mode the settings accept has its strategy
    raise ImportError(f"fine-tuning strategies {tuple(STRATEGIES)} differ from MODES {MODES}")
NEEDS_EMULATOR: tuple[str, ...] = tuple(k for k, v in STRATEGIES.items() if v.needs_emulator)
