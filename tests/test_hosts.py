"""Host models: accuracy of the integrators, the formulas, the black-box contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from correction.hosts import (
    BlackBoxHost,
    HostGradientError,
    HostModel,
    Lorenz96,
    Lorenz96TwoScale,
    integrate,
    make_host,
)


def _convergence_order(make, x0, t_end: float, dts: list[float]) -> list[float]:
    """Observed orders from errors against a much finer reference solution."""
    ref_dt = dts[-1] / 8
    ref = integrate(make(ref_dt), x0, round(t_end / ref_dt))
    errors = [np.abs(integrate(make(dt), x0, round(t_end / dt)) - ref).max() for dt in dts]
    return [np.log2(errors[i] / errors[i + 1]) for i in range(len(dts) - 1)]


def test_rk4_order_one_scale():
    rng = np.random.default_rng(0)
    x0 = 10 + rng.standard_normal(36)
    orders = _convergence_order(lambda dt: Lorenz96(dt=dt), x0, 0.4, [0.01, 0.005, 0.0025])
    assert all(3.7 < p < 4.3 for p in orders), orders


def test_rk4_order_two_scale():
    rng = np.random.default_rng(1)
    model = Lorenz96TwoScale()
    x0 = model.join(10 + rng.standard_normal(36), 0.3 * rng.standard_normal((36, 10))).numpy()
    orders = _convergence_order(
        lambda dt: Lorenz96TwoScale(dt=dt), x0, 0.1, [0.005, 0.0025, 0.00125]
    )
    assert all(3.7 < p < 4.3 for p in orders), orders


def _two_scale_formula(x, y, F, h, b, c):
    """Independent, loop-by-loop evaluation of the Lorenz (1996) equations."""
    K, J = y.shape
    ring = y.reshape(-1)  # Y_{j,k} at k*J + j; the fast ring wraps across sectors
    n = K * J
    dx = np.empty(K)
    for k in range(K):
        dx[k] = (
            -x[(k - 1) % K] * (x[(k - 2) % K] - x[(k + 1) % K])
            - x[k]
            + F
            - (h * c / b) * sum(y[k, j] for j in range(J))
        )
    dy = np.empty((K, J))
    for k in range(K):
        for j in range(J):
            i = k * J + j
            dy[k, j] = (
                -c * b * ring[(i + 1) % n] * (ring[(i + 2) % n] - ring[(i - 1) % n])
                - c * ring[i]
                + (h * c / b) * x[k]
            )
    return dx, dy


@pytest.mark.parametrize("params", [{}, {"c": 4.0, "F": 8.0, "h": 0.5, "K": 8, "J": 5}])
def test_two_scale_tendency_matches_formula(params):
    model = Lorenz96TwoScale(**params)
    rng = np.random.default_rng(2)
    x = model.F + rng.standard_normal(model.K)
    y = rng.standard_normal((model.K, model.J))
    got = model.tendency(model.join(x, y)).numpy()
    dx, dy = _two_scale_formula(x, y, model.F, model.h, model.b, model.c)
    np.testing.assert_allclose(got[: model.K], dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[model.K :], dy.reshape(-1), rtol=1e-12, atol=1e-12)
    xs, ys = model.split(model.join(x, y))
    np.testing.assert_allclose(
        model.coupling(ys).numpy(), -(model.h * model.c / model.b) * y.sum(-1)
    )
    np.testing.assert_array_equal(xs.numpy(), x)


def test_one_scale_is_two_scale_without_coupling():
    rng = np.random.default_rng(3)
    two = Lorenz96TwoScale(h=0.0)
    one = Lorenz96()
    x = 10 + rng.standard_normal(36)
    full = two.tendency(two.join(x, rng.standard_normal((36, 10)))).numpy()
    np.testing.assert_allclose(full[:36], one.tendency(torch.from_numpy(x)).numpy())


def test_hosts_batch_over_leading_dims():
    host = Lorenz96()
    x = 10 + torch.randn(4, 3, 36, dtype=torch.float64)
    batched = host.step(x)
    single = torch.stack([host.step(x[i, j]) for i in range(4) for j in range(3)])
    torch.testing.assert_close(batched.reshape(12, 36), single)


def test_host_rejects_wrong_state_shape():
    with pytest.raises(ValueError, match=r"expected trailing dimensions \(36,\)"):
        Lorenz96().step(torch.zeros(5, 35))


def test_torch_hosts_are_differentiable():
    host = make_host("l96")
    x = (10 + torch.randn(36, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: host.step(s), (x,))


def test_numpy_callers_get_numpy():
    out = integrate(make_host("l96"), np.full(36, 10.0) + np.eye(36)[0], 3)
    assert isinstance(out, np.ndarray) and out.shape == (36,)


def test_black_box_refuses_gradients_but_steps_without_them():
    host = BlackBoxHost.wrap(Lorenz96())
    assert isinstance(host, HostModel) and not host.differentiable
    x = (10 + torch.randn(2, 36, dtype=torch.float64)).requires_grad_()
    with pytest.raises(HostGradientError, match="black box"):
        host.step(x)
    with torch.no_grad():
        stepped = host.step(x)
    torch.testing.assert_close(stepped, Lorenz96().step(x.detach()))
    assert not stepped.requires_grad
    # a detached input needs no gradient, so it steps even with autograd on
    assert host.step(x.detach()).shape == (2, 36)


def test_black_box_wraps_any_callable():
    calls = []

    def fortran_like(state: np.ndarray) -> np.ndarray:
        calls.append(state.shape)
        return state * 0.5

    host = BlackBoxHost(fortran_like, state_shape=(4,), dt=0.1, name="toy")
    np.testing.assert_allclose(host.step(np.ones(4)), 0.5)
    out = host.step(torch.ones(3, 4, dtype=torch.float32))
    assert out.dtype == torch.float32 and calls == [(4,), (3, 4)]
    with pytest.raises(ValueError, match="toy"):
        host.step(torch.ones(3, 5))


def test_unknown_host_name():
    with pytest.raises(ValueError, match="unknown host 'nope'"):
        make_host("nope")
