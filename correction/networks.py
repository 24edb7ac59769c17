"""Correction networks, chosen by name from a registry.

Every network maps a packed state ``[B, C, *H]`` (C channels = fields x levels,
H horizontal dims) to a tendency ``[B, C_out, *H]`` in *normalised* units. The
:class:`CorrectionModel` wrapper owns the normalisation from the training store's
statistics, so a saved model takes and returns physical units and nobody can pair
weights with the wrong statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

NETWORKS: dict[str, Callable[..., nn.Module]] = {}


def register_network(name: str) -> Callable:
    """Class decorator adding a network to the registry under ``name``."""

    def deco(cls):
        NETWORKS[name] = cls
        cls.registry_name = name
        return cls

    return deco


def build_network(name: str, **params: Any) -> nn.Module:
    try:
        factory = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network '{name}'; known: {sorted(NETWORKS)}") from None
    return factory(**params)


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "relu": nn.ReLU(), "tanh": nn.Tanh(), "silu": nn.SiLU()}[name]


def _stencil_layers(
    name: str,
    n_horizontal: int,
    in_channels: int,
    out_channels: int,
    kernel: int,
    periodic: bool,
) -> tuple[nn.Module, type[nn.Module]]:
    """The ``kernel``-point first layer and the conv class for pointwise layers."""
    if n_horizontal not in (1, 2):
        raise ValueError(f"{name} supports 1 or 2 horizontal dims, got {n_horizontal}")
    conv = nn.Conv1d if n_horizontal == 1 else nn.Conv2d
    mode = "circular" if periodic else "zeros"
    first = conv(in_channels, out_channels, kernel, padding=kernel // 2, padding_mode=mode)
    return first, conv


@register_network("stencil-cnn")
class StencilCNN(nn.Module):
    """Local stencil network: convolutions over the horizontal dims.

    The first layer sees ``kernel`` neighbouring points (periodic padding for
    global rings and tori, zero padding for limited areas); the following layers
    are pointwise, so the receptive field stays local, as a parameterization's is.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_horizontal: int = 1,
        hidden: int = 64,
        depth: int = 3,
        kernel: int = 5,
        periodic: bool = True,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        first, conv = _stencil_layers(
            "stencil-cnn", n_horizontal, in_channels, hidden, kernel, periodic
        )
        layers: list[nn.Module] = [first, _activation(activation)]
        for _ in range(depth - 2):
            layers += [conv(hidden, hidden, 1), _activation(activation)]
        layers.append(conv(hidden, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_network("bilinear-cnn")
class BilinearCNN(nn.Module):
    """Stencil convolutions with a multiplicative layer (after Brajard et al. 2020).

    Advection terms are products of neighbouring values; a product of two
    convolution outputs represents them exactly where a stack of smooth
    activations only approximates them. The emulator of a host's step uses it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_horizontal: int = 1,
        hidden: int = 24,
        kernel: int = 5,
        periodic: bool = True,
        depth: int = 2,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.stencil, conv = _stencil_layers(
            "bilinear-cnn", n_horizontal, in_channels, 3 * hidden, kernel, periodic
        )
        layers: list[nn.Module] = []
        width = 2 * hidden
        for _ in range(depth - 1):
            layers += [conv(width, hidden, 1), _activation(activation)]
            width = hidden
        layers.append(conv(width, out_channels, 1))
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = torch.split(self.stencil(x), self.hidden, dim=1)
        return self.head(torch.cat([a, b * c], dim=1))


@register_network("column-mlp")
class ColumnMLP(nn.Module):
    """Column-wise MLP in the IFS style: every horizontal point is a sample.

    Features are the channels of one column (fields x levels, plus forcings that
    the wrapper appends as extra channels); there is no horizontal coupling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_horizontal: int = 1,
        hidden: int = 64,
        depth: int = 3,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        dims = [in_channels] + [hidden] * (depth - 1)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), _activation(activation)]
        layers.append(nn.Linear(dims[-1], out_channels))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, *H] -> [B, *H, C] -> MLP -> back; explicit non-negative permutations
        # because torch's ONNX exporter writes movedim's negative axes as an invalid perm
        n = x.dim()
        y = self.net(x.permute(0, *range(2, n), 1))
        return y.permute(0, n - 1, *range(1, n - 1))


class CorrectionModel(nn.Module):
    """Normalise, apply the core network, de-normalise; physical units at both ends.

    ``in_mean``/``in_std``/``out_mean``/``out_std`` are per-channel buffers saved in
    the weights file, so they travel with the model.
    """

    def __init__(
        self,
        network: str,
        params: dict[str, Any],
        in_channels: int,
        out_channels: int,
        n_horizontal: int,
        n_forcings: int = 0,
    ) -> None:
        super().__init__()
        self.network_name = network
        self.n_horizontal = n_horizontal
        self.n_forcings = n_forcings
        self.core = build_network(
            network,
            in_channels=in_channels + n_forcings,
            out_channels=out_channels,
            n_horizontal=n_horizontal,
            **params,
        )
        self.register_buffer("in_mean", torch.zeros(in_channels))
        self.register_buffer("in_std", torch.ones(in_channels))
        self.register_buffer("out_mean", torch.zeros(out_channels))
        self.register_buffer("out_std", torch.ones(out_channels))

    def set_normalisation(self, in_mean, in_std, out_mean, out_std) -> None:
        for name, value in [
            ("in_mean", in_mean),
            ("in_std", in_std),
            ("out_mean", out_mean),
            ("out_std", out_std),
        ]:
            buf = getattr(self, name)
            buf.copy_(torch.as_tensor(value, dtype=buf.dtype).reshape(buf.shape))

    def _expand(self, v: torch.Tensor) -> torch.Tensor:
        return v.reshape(1, -1, *([1] * self.n_horizontal))

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._expand(self.in_mean)) / self._expand(self.in_std)

    def forward_normalised(
        self, x: torch.Tensor, forcings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Network output in normalised target units (the training loss lives here)."""
        z = self.normalise_input(x)
        if self.n_forcings:
            if forcings is None or forcings.shape[-1] != self.n_forcings:
                raise ValueError(f"this model needs {self.n_forcings} forcing values per sample")
            f = forcings.reshape(forcings.shape[0], self.n_forcings, *([1] * self.n_horizontal))
            z = torch.cat([z, f.expand(-1, -1, *z.shape[2:]).to(z.dtype)], dim=1)
        return self.core(z)

    def denormalise_output(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._expand(self.out_std) + self._expand(self.out_mean)

    def forward(self, x: torch.Tensor, forcings: torch.Tensor | None = None) -> torch.Tensor:
        return self.denormalise_output(self.forward_normalised(x, forcings))
