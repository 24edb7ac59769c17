"""Scale-invariant physics (SIP) updates through the emulator (Holl et al. 2022)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from correction.corrections import Correction
from correction.rollout import rollout

if TYPE_CHECKING:
    from .strategies import Strategy


#: the largest Gauss-Newton system SIP builds per window (offsets; the matrix is square)
MAX_SIP_UNKNOWNS = 4096


class _Recorded(Correction):
    """A correction that keeps each step's input state and output (SIP's reference)."""

    def __init__(self, inner) -> None:
        self.inner, self.inputs, self.outputs = inner, [], []

    def tendency(self, x: torch.Tensor) -> torch.Tensor:
        c = self.inner.tendency(x)
        self.inputs.append(x)
        self.outputs.append(c)
        return c


def sip_loss(
    strategy: Strategy,
    x0: torch.Tensor,
    targets: torch.Tensor,
    damping: float,
    out_std: torch.Tensor,
) -> torch.Tensor:
    """Scale-invariant physics loss, emulator-linearised.

    1. Run the real host with the current correction (values only), keeping the
       reference states and network outputs.
    2. Gauss-Newton in correction space: per-interval offsets ``d_n`` added to the
       correction; the residual's Jacobian ``J = dr/dd`` comes from the emulator's
       tangent-linear model along the reference trajectory. Solve the damped normal
       equations ``(J^T J + lambda I) d = -J^T r`` per window.
    3. L2 proxy loss between the network outputs and the updated corrections.
    """
    from torch.func import jvp

    emu, dt, steps = strategy.emulator, strategy.dt, strategy.steps
    n_int = targets.shape[1]
    shape = tuple(x0.shape[1:])  # one member's state; worked on flat below
    k_dim = int(torch.tensor(shape).prod())
    if n_int * k_dim > MAX_SIP_UNKNOWNS:
        raise ValueError(
            f"mode 'sip' solves for {n_int} x {k_dim} correction offsets per window (a "
            f"dense {n_int * k_dim}-square system); at most {MAX_SIP_UNKNOWNS}: use hybrid "
            "or emulator for states this large, or a shorter unroll"
        )

    def step_flat(z: torch.Tensor) -> torch.Tensor:
        return emu.step(z.reshape(-1, *shape)).reshape(z.shape[0], k_dim)

    rec = _Recorded(strategy.correction)
    with torch.no_grad():
        x = rollout(strategy.host, rec, x0, n_int * steps).reshape(len(x0), k_dim)
        ref = torch.stack(rec.inputs, 1).reshape(len(x0), -1, k_dim)  # [B, n_int*steps, K]
        cor = torch.stack(rec.outputs, 1).reshape(len(x0), -1, k_dim)
        targets = targets.reshape(len(x0), n_int, k_dim)
        batch = x0.shape[0]
        n_dir = n_int * k_dim
        # d(state)/d(offsets), propagated by the emulator's tangent-linear model along
        # the real trajectory: [B, K, n_dir]. Each step's Jacobian comes from one jvp
        # per state dimension, whatever the number of offsets.
        tangent = torch.zeros(batch, k_dim, n_dir, dtype=x0.dtype)
        basis = torch.eye(k_dim, dtype=x0.dtype).repeat(batch, 1)  # [B*K, K]
        eye = dt * torch.eye(k_dim, dtype=x0.dtype)
        jac_rows, residuals = [], []
        for k in range(n_int * steps):
            n = k // steps
            base = ref[:, k].repeat_interleave(k_dim, 0)
            _, cols = jvp(step_flat, (base,), (basis,))
            step_jac = cols.reshape(batch, k_dim, k_dim).transpose(1, 2)  # [B, out, in]
            tangent = step_jac @ tangent
            tangent[:, :, n * k_dim : (n + 1) * k_dim] += eye
            if (k + 1) % steps == 0:
                jac_rows.append(tangent)  # [B, K, n_dir]
                end = ref[:, k + 1] if k + 1 < ref.shape[1] else x
                residuals.append(end - targets[:, n])
        jac = torch.cat(jac_rows, 1)  # [B, n_int*K, n_dir]
        r = torch.cat(residuals, 1)  # [B, n_int*K]
        jtj = jac.transpose(1, 2) @ jac
        lam = damping * torch.diagonal(jtj, dim1=1, dim2=2).mean(-1)
        eye_n = torch.eye(n_dir, dtype=jtj.dtype)
        rhs = jac.transpose(1, 2) @ r[..., None]
        delta = -torch.linalg.solve(jtj + lam[:, None, None] * eye_n, rhs)[..., 0]
    delta = delta.reshape(x0.shape[0], n_int, -1).repeat_interleave(steps, dim=1)
    target_c = (cor + delta).detach()
    pred = strategy.correction.tendency(ref.reshape(-1, *shape))
    pred = pred.reshape(cor.shape)
    scale = strategy.per_channel(out_std, x0).reshape(1, 1, k_dim)
    return torch.mean(((pred - target_c) / scale) ** 2)
