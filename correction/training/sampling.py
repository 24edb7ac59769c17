"""Loss-prioritised sampling for pretraining (SIFT, Das et al. 2024).

Uniform sampling spends most backpropagation on samples the network already fits.
SIFT scores a pool of candidates (``pool`` times the batch) with a cheap
*approximate* loss and backpropagates on the highest-scoring part. The
approximation here is an early-exit head: a linear map from the network's first
hidden layer (after its activation) to the target, trained alongside the network
on every pool with the features detached, so it never changes the network's
gradients. Scoring a pool costs the first layer and the head, without autograd:
for the default column MLP (depth 3) about a third of a forward, a small fraction
of the forward and backward of the batch it replaces.

Greedy selection overfits noisy samples (an increment with a large observation
error keeps a large loss however long it is trained on). A floor of ``floor``
of each batch is therefore drawn uniformly from the pool, before the greedy part
picks the highest scores among the rest.

The head is part of the training state (checkpointed, so a resumed run gives the
same weights), not of the published model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: the sampling strategies of ``mecs pretrain --sampling``
SAMPLINGS = ("uniform", "sift")


def select(
    scores: torch.Tensor, batch: int, floor: float, generator: torch.Generator
) -> torch.Tensor:
    """Indices of the pool to train on: a uniform floor, then the highest scores.

    ``floor`` is the share of ``batch`` drawn uniformly (at least one sample when it
    is positive); the rest are the ``batch - n_floor`` highest ``scores`` among the
    samples the floor did not take. Returns ``min(batch, len(scores))`` distinct
    indices.
    """
    n = scores.shape[0]
    batch = min(batch, n)
    n_floor = min(batch, math.ceil(floor * batch)) if floor > 0 else 0
    order = torch.randperm(n, generator=generator)
    uniform = order[:n_floor]
    if n_floor == batch:
        return uniform
    rest = scores.detach().clone()
    rest[uniform] = -math.inf
    greedy = torch.topk(rest, batch - n_floor).indices
    return torch.cat([uniform, greedy])


def _sequential(core: nn.Module) -> nn.Sequential:
    net = getattr(core, "net", None)
    if not isinstance(net, nn.Sequential) or len(net) < 3:
        raise ValueError(
            f"--sampling sift needs a network whose layers form one sequence "
            f"(column-mlp, stencil-cnn); {type(core).__name__} does not"
        )
    return net


class EarlyExitHead(nn.Module):
    """A linear head on the network's first hidden layer: the approximate loss.

    ``network`` is the core of a :class:`~correction.networks.CorrectionModel`
    (``model.core``). The head has the shape of the network's last layer (a 1x1
    convolution or a linear map from the hidden width to the outputs).
    """

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        net = _sequential(core)
        last = net[-1]
        if isinstance(last, nn.Linear):
            width, out = net[0].out_features, last.out_features
            self.head = nn.Linear(width, out)
            self.channels_last = True
        else:
            width, out = net[0].out_channels, last.out_channels
            self.head = type(last)(width, out, 1)
            self.channels_last = False
        # the first layer and its activation: the network's, so kept out of this
        # module's parameters and state (a list is not registered as a submodule)
        self._trunk = [net[:2]]

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The first hidden layer of the network for normalised inputs ``z``, detached."""
        trunk = self._trunk[0]
        with torch.no_grad():
            if self.channels_last:
                n = z.dim()
                return trunk(z.permute(0, *range(2, n), 1))
            return trunk(z)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        y = self.head(h)
        if self.channels_last:
            n = y.dim()
            y = y.permute(0, n - 1, *range(1, n - 1))
        return y

    def per_sample_loss(self, h: torch.Tensor, yn: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the head per sample, ``[B]``."""
        err = (self.predict(h) - yn) ** 2
        return err.reshape(err.shape[0], -1).mean(dim=1)
