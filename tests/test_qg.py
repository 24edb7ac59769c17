"""The two-layer QG host: conservation, linear instability, convergence, batching, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from correction.hosts import HOSTS, make_host
from correction.hosts.qg import TwoLayerQG

EDDY = {}
JET = {"rek": 7.0e-8, "delta": 0.1, "beta": 1.0e-11}


def smooth_field(nx: int, seed: int = 0, members: int = 3) -> torch.Tensor:
    """A random PV field with modes only below a third of the grid's wavenumbers, so that
    products of two such fields alias onto modes the fields do not have."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(members, 2, nx, nx, generator=g, dtype=torch.float64) * 1e-5
    ky = torch.fft.fftfreq(nx, 1 / nx).abs()[:, None]
    kx = torch.fft.rfftfreq(nx, 1 / nx)[None, :]
    keep = (ky < nx / 3) & (kx < nx / 3)
    return torch.fft.irfft2(torch.fft.rfft2(q) * keep, s=(nx, nx))


@pytest.mark.parametrize("cfg", [EDDY, JET], ids=["eddy", "jet"])
def test_the_jacobian_conserves_energy_and_each_layers_enstrophy(cfg):
    m = TwoLayerQG(nx=32, **cfg)
    q = smooth_field(32)
    tend = m.jacobian_tendency(q)
    psi = m.streamfunction(q)
    w1, w2 = m.layer_weights
    d_energy = -(w1 * (psi[:, 0] * tend[:, 0]).mean((-2, -1)))
    d_energy -= w2 * (psi[:, 1] * tend[:, 1]).mean((-2, -1))
    d_enstrophy = (q * tend).mean((-2, -1))
    scale_e = (psi.abs() * tend.abs()).mean((-3, -2, -1))
    scale_z = (q.abs() * tend.abs()).mean((-2, -1))
    assert (d_energy / scale_e).abs().max() < 1e-12
    assert (d_enstrophy / scale_z).abs().max() < 1e-12
    assert tend.abs().max() > 1e-12  # and the term itself is not zero


def test_the_full_model_does_not_conserve_energy_the_shear_feeds_it():
    """The control of the test above: with the background flow the energy changes."""
    m = TwoLayerQG(nx=32)
    q = smooth_field(32)
    psi = m.streamfunction(q)
    w1, w2 = m.layer_weights
    tend = m.tendency(q)
    d_energy = -(w1 * (psi[:, 0] * tend[:, 0]) + w2 * (psi[:, 1] * tend[:, 1])).mean((-2, -1))
    scale = (psi.abs() * tend.abs()).mean((-3, -2, -1))
    assert (d_energy / scale).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [EDDY, JET], ids=["eddy", "jet"])
def test_normal_modes_grow_at_the_analytic_rate(cfg):
    """Baroclinic instability: the fastest-growing mode of the dispersion relation, put in
    the model at small amplitude, grows at the relation's rate (its nonlinear term is zero
    for a single zonal wavenumber), and a stable mode decays at its rate."""
    m = TwoLayerQG(nx=32, filterfac=0, **cfg)
    rates = {(k, 0): m.linear_growth_rate(k, 0) for k in range(1, 16)}
    k_best = max(rates, key=rates.get)[0]
    assert rates[(k_best, 0)] > 0
    for k in (k_best, 15):
        q = m.normal_mode(k, 0, amplitude=1e-12)
        e0 = m.energy(q)
        steps = 24 * 30
        for _ in range(steps):
            q = m.step(q)
        measured = math.log(float(m.energy(q) / e0)) / (2 * steps * m.dt_seconds)
        expected = m.linear_growth_rate(k, 0)
        assert measured == pytest.approx(expected, rel=1e-6, abs=1e-12), (k, measured, expected)


def test_the_eddy_growth_rate_scale():
    """The eddy configuration's fastest mode e-folds in about five months at the domain's
    wavenumber 7, near the deformation scale (k rd ~ 0.66): slow growth, as the weak
    shear (2.5 cm/s) of pyqg's default configuration gives."""
    m = TwoLayerQG()
    rate = max(m.linear_growth_rate(k, 0) for k in range(1, 20))
    assert 100 < 1 / rate / 86400 < 200


def test_rk4_converges_at_fourth_order():
    q0 = smooth_field(32, seed=1, members=1) * 5
    horizon = 48.0  # hours

    def run(dt: float) -> torch.Tensor:
        m = TwoLayerQG(nx=32, filterfac=0, dt=dt)
        q = q0
        for _ in range(int(round(horizon / dt))):
            q = m.step(q)
        return q

    reference = run(1 / 16)
    errors = [float((run(dt) - reference).abs().max()) for dt in (1.0, 0.5, 0.25)]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 3.7 < math.log2(coarse / fine) < 4.3, errors  # the order of the scheme


def test_members_step_independently_and_float32_comes_back_as_float32():
    m = TwoLayerQG(nx=32)
    q = smooth_field(32, members=3)
    batched = m.step(q)
    for i in range(3):
        torch.testing.assert_close(m.step(q[i]), batched[i], rtol=0, atol=1e-20)
    out = m.step(q.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), batched, rtol=1e-5, atol=1e-11)
    with pytest.raises(ValueError, match="expected trailing"):
        m.step(torch.zeros(2, 32, 16))


def test_the_step_is_differentiable():
    m = TwoLayerQG(nx=8, dt=0.5)
    q = (smooth_field(8, members=1) * 1e5).requires_grad_()  # O(1) values for gradcheck

    def scaled_step(x):
        return m.step(x * 1e-5) * 1e5

    assert torch.autograd.gradcheck(scaled_step, (q,), eps=1e-6, atol=1e-6)


def test_the_filter_removes_only_the_small_scales():
    m = TwoLayerQG(nx=64)
    f = m.ops()["filter"]
    assert f[0, :10].min() == 1.0 and f[:10, :10].min() == 1.0  # large scales untouched
    assert f[32, 32] < 1e-6  # the corner (|k| dx = pi sqrt 2) is gone


def test_the_host_is_registered():
    assert "qg" in HOSTS
    host = make_host("qg", nx=16)
    assert host.state_shape == (2, 16, 16) and host.dt == 1.0 and host.time_unit == "hour"
    assert host.dt_seconds == 3600.0
