"""QG evaluation metrics and the Smagorinsky baseline: what each figure means holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from correction.corrections import Correction, ZeroCorrection
from correction.evaluation import qg_metrics as m
from correction.hosts.qg import TwoLayerQG
from correction.qg_closures import Smagorinsky


@pytest.fixture(scope="module")
def flow():
    """A turbulent 32^2 state (strong shear, a few months of spin-up) and the host."""
    host = TwoLayerQG(nx=32, U1=0.1)
    g = torch.Generator().manual_seed(0)
    q = 1e-7 * torch.randn(2, 2, 32, 32, generator=g, dtype=torch.float64)
    for _ in range(24 * 60):
        q = host.step(q)
    states = []
    for _ in range(20):
        for _ in range(12):
            q = host.step(q)
        states.append(q.numpy().copy())
    return host, np.concatenate(states)  # [40, 2, 32, 32]


def test_spectra_add_up_to_the_energy_and_enstrophy(flow):
    host, q = flow
    spec = m.isotropic_spectra(host, q)
    ke = host.kinetic_energy(torch.from_numpy(q)).mean(0).numpy()
    # every mode but the corners beyond the largest ring is binned
    np.testing.assert_allclose(spec["ke"].sum(1), ke, rtol=0.02)
    ens = 0.5 * (q**2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(spec["enstrophy"].sum(1), ens, rtol=0.05)
    assert m.spectral_error(spec["ke"], spec["ke"]) == 0.0
    assert m.spectral_error(10 * spec["ke"], spec["ke"]) == pytest.approx(1.0)


def test_energy_terms(flow):
    host, q = flow
    e = m.energy_budget(host, q)
    direct = float(host.energy(torch.from_numpy(q)).mean())
    assert e["total"] == pytest.approx(direct, rel=1e-9)
    assert e["ke_upper"] > e["ke_lower"] > 0 and e["ape"] > 0 and e["drag_dissipation"] > 0


def test_energy_transfer_spectra_close_the_budget(flow):
    host, q = flow
    # the nonlinear flux moves energy between scales and creates none
    flux = m.energy_transfer_spectrum(host, q, m.advection_tendency(host, q))
    assert abs(flux.sum()) < 0.02 * np.abs(flux).sum()
    assert np.abs(flux).max() > 0
    # a linear damping dq/dt = -r q removes energy at 2 r E, scale by scale
    r = 1e-6
    damp = m.energy_transfer_spectrum(host, q, -r * q)
    total = float(host.energy(torch.from_numpy(q)).mean())
    assert damp.sum() == pytest.approx(-2 * r * total, rel=0.03)
    assert (damp[1:] <= 0).all()
    assert m.transfer_error(damp, damp) == 0.0
    assert m.transfer_error(2 * damp, damp) == pytest.approx(1.0)
    # the subgrid forcing of a trajectory of the host itself is zero
    traj = [q[:1]]
    for _ in range(3):
        traj.append(host.step(torch.from_numpy(traj[-1])).numpy())
    states, forcing = m.subgrid_forcing(host, np.concatenate(traj), 1, np.arange(3))
    assert np.abs(forcing).max() < 1e-12 * np.abs(states).max()


def test_wasserstein_and_distribution_distances(flow):
    host, q = flow
    a = np.random.default_rng(0).normal(size=10000)
    assert m.wasserstein_1d(a, a) == 0.0
    assert m.wasserstein_1d(a, a + 0.5) == pytest.approx(0.5, abs=1e-9)
    same = m.distribution_distances(host, q, q)
    assert same["mean"] == 0.0 and len(same) == 11  # 5 quantities x 2 layers + mean
    weaker = m.distribution_distances(host, 0.5 * q, q)
    assert weaker["mean"] > 0.1 and weaker["ke1"] > weaker["q1"]  # energy is quadratic


def test_skill_by_lead(flow):
    host, q = flow
    truth = q[None, :10]
    clim = q.mean(0)
    perfect = m.rmse_acc_by_lead(truth, truth, clim)
    assert np.allclose(perfect["rmse"], 0) and np.allclose(perfect["acc"], 1)
    noisy = m.rmse_acc_by_lead(truth + 0.3 * truth.std(), truth, clim)
    assert (noisy["rmse"] > 0).all()


def test_smagorinsky_removes_energy_and_is_per_hour(flow):
    host, q = flow
    x = torch.from_numpy(q[:4])
    c = Smagorinsky(host).tendency(x) / 3600.0  # per second
    psi = host.streamfunction(x)
    w1, w2 = host.layer_weights
    d_energy = -(w1 * (psi[:, 0] * c[:, 0]) + w2 * (psi[:, 1] * c[:, 1])).mean((-2, -1))
    assert (d_energy < 0).all()
    assert torch.allclose(Smagorinsky(host, 0.0).tendency(x), torch.zeros_like(x))
    assert isinstance(Smagorinsky(host) + ZeroCorrection(), Correction)


class _Explode(Correction):
    def tendency(self, x):
        return 1e3 * x


def test_free_runs_report_blow_ups_and_drift(flow):
    host, q = flow
    truth_energy = m.energy_budget(host, q)["total"]
    run, blew = m.free_run(host, ZeroCorrection(), q[:2], 48, 12)
    assert blew is None and run.shape == (4, 2, 2, 32, 32)
    assert m.stability(host, run, blew, truth_energy)["stable"]
    run, blew = m.free_run(host, _Explode(), q[:2], 400, 12)
    assert blew is not None
    status = m.stability(host, run, blew, truth_energy)
    assert not status["stable"] and status["status"].startswith("blew up at step")
    drift = m.stability(host, 10 * q[None], None, truth_energy)
    assert drift["status"] == "drifted" and drift["energy_ratio"] > 3
