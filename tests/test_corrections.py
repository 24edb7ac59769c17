"""The Correction interface and the one rollout: composition, boundaries, gradient policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from correction.corrections import (
    Correction,
    FunctionCorrection,
    PolynomialCorrection,
    ZeroCorrection,
    as_correction,
)
from correction.hosts import BlackBoxHost, HostGradientError, Lorenz96
from correction.rollout import Gradient, rollout, step

RNG = np.random.default_rng(5)


class NumpyOnly(Correction):
    """A numpy-native correction (as the guarded and remote ones are)."""

    name = "numpy-only"

    def numpy(self, x):
        return 0.5 * x


def test_corrections_compose_like_parameterizations():
    x = torch.from_numpy(RNG.normal(2.5, 3.6, (4, 36)))
    poly = PolynomialCorrection([0.1, -0.2, 0.0, 0.01])
    lin = FunctionCorrection(lambda t: -0.3 * t, "linear")
    both = poly + 2.0 * lin
    torch.testing.assert_close(both(x), poly(x) + 2.0 * (-0.3 * x))
    assert sum([poly, lin]).name == "poly3 + linear"  # sum() starts from 0
    torch.testing.assert_close((0.5 * poly)(x), 0.5 * poly(x))
    torch.testing.assert_close(ZeroCorrection()(x), torch.zeros_like(x))
    assert as_correction(None) is None and as_correction(poly) is poly


def test_numpy_and_torch_at_the_boundary():
    x = RNG.normal(size=(3, 36))
    c = NumpyOnly()
    out = c(x)
    assert isinstance(out, np.ndarray) and np.allclose(out, 0.5 * x)
    t = c(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    poly = PolynomialCorrection([0.0, 1.0])
    assert isinstance(poly(x), np.ndarray) and np.allclose(poly(x), x)
    with pytest.raises(TypeError, match="must implement tendency"):

        class Nothing(Correction):  # noqa: F841
            pass


def test_rollout_is_the_corrected_host_step():
    host = Lorenz96()
    x0 = torch.from_numpy(RNG.normal(2.5, 3.6, (2, 36)))
    poly = PolynomialCorrection([0.2, -0.1])
    x = x0
    for _ in range(5):
        x = host.step(x) + host.dt * poly(x)
    torch.testing.assert_close(rollout(host, poly, x0, 5), x, rtol=0, atol=0)
    seen = []
    rollout(host, None, x0, 3, on_step=lambda n, _: seen.append(n))
    assert seen == [1, 2, 3]


def test_gradient_policies_reach_what_they_say():
    x0 = torch.from_numpy(RNG.normal(2.5, 3.6, (2, 36)))
    w = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    corr = FunctionCorrection(lambda t: w * t)
    black = BlackBoxHost.wrap(Lorenz96())
    for policy in (Gradient.TRUNCATED, Gradient.STRAIGHT_THROUGH):
        w.grad = None
        x = x0.clone().requires_grad_()
        rollout(black, corr, x, 3, policy, surrogate=Lorenz96()).sum().backward()
        assert w.grad is not None  # the correction learns; the black box was never asked
        assert (x.grad is None) == (policy is Gradient.TRUNCATED)  # cut at each step's input
    with pytest.raises(HostGradientError):
        step(black, corr, x0.clone().requires_grad_(), Gradient.FULL)
    with pytest.raises(ValueError, match="needs a surrogate"):
        rollout(black, corr, x0, 1, Gradient.SURROGATE)
    with torch.enable_grad():
        y = rollout(Lorenz96(), corr, x0, 2)  # NONE: inference, no graph
    assert not y.requires_grad
