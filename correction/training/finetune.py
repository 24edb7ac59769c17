"""Online fine-tuning: the corrected model unrolled in time against later analyses.

Every mode compares the corrected trajectory with the *analyses* at the following
analysis times (never the truth, which is unknown in operations). Modes differ in
where the forward values and the gradients come from (List et al. 2024, Holl et al.
2022, Frezat et al. 2023):

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

Every mode but ``differentiable`` calls the host as a black box, forward only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from correction import artifacts
from correction.emulator import Emulator
from correction.hosts import BlackBoxHost, HostModel
from correction.inference import Corrector
from correction.networks import CorrectionModel

from .settings import settings_from_dict

MODES = ("one-step", "unrolled", "emulator", "hybrid", "differentiable", "sip")
NEEDS_EMULATOR = ("emulator", "hybrid", "sip")


@dataclass
class FinetuneConfig:
    """Settings of ``mecs finetune`` (a JSON/TOML ``--config`` file overrides them)."""

    mode: str = "hybrid"
    # 10 analysis intervals (0.5 MTU) with lr 1e-3 gained more valid time on l96-2s
    # than 4 intervals with 3e-4 (bench/online.py, both settings in the README).
    unroll: int = 10
    curriculum: list[int] | None = None  # e.g. [1, 4, 10]: equal shares of iterations
    iterations: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    val_every: int = 50
    val_windows: int = 256
    val_fraction: float = 0.1
    sip_damping: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes: {list(MODES)}")
        if self.unroll < 1:
            raise ValueError(f"unroll must be at least 1, got {self.unroll}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        return settings_from_dict(cls, d, "finetune")

    def unroll_at(self, iteration: int) -> int:
        if not self.curriculum:
            return self.unroll
        share = self.iterations / len(self.curriculum)
        return int(self.curriculum[min(int(iteration / share), len(self.curriculum) - 1)])

    @property
    def max_unroll(self) -> int:
        return max(self.curriculum) if self.curriculum else self.unroll


@dataclass
class FinetuneResult:
    version: artifacts.ModelVersion
    history: list[dict[str, float]]
    best_val: float
    host_calls: int
    wall_time: float


class Unroller:
    """Steps the corrected model one analysis interval in a given mode."""

    def __init__(
        self,
        mode: str,
        model: CorrectionModel,
        corrector: Corrector,
        host: HostModel,
        steps_per_interval: int,
        emulator: Emulator | None = None,
        torch_host: HostModel | None = None,
    ) -> None:
        self.mode, self.model, self.layout = mode, model, corrector.layout
        self.host, self.emulator, self.torch_host = host, emulator, torch_host
        self.steps = steps_per_interval
        self.dt = float(host.dt)
        if mode in NEEDS_EMULATOR and emulator is None:
            raise ValueError(f"mode {mode!r} needs an emulator (--emulator PATH)")
        if mode == "differentiable" and (torch_host is None or not torch_host.differentiable):
            raise ValueError("mode 'differentiable' needs a host written in torch")

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(self.layout.pack(x.to(torch.float32)))
        return self.layout.unpack(y).to(x.dtype)

    def host_values(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.host.step(x.detach())

    def step(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.dt
        if self.mode == "unrolled":
            x_in = x.detach()
            return self.host_values(x_in) + dt * self.correction(x_in)
        if self.mode == "emulator":
            return self.emulator.step(x) + dt * self.correction(x)
        if self.mode == "hybrid":
            e = self.emulator.step(x)
            return e + (self.host_values(x) - e).detach() + dt * self.correction(x)
        if self.mode == "differentiable":
            return self.torch_host.step(x) + dt * self.correction(x)
        # values only (validation, sip's reference trajectory)
        return self.host_values(x) + dt * self.correction(x)

    def interval(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = self.step(x)
        return x


def _windows(n_times: int, lo: int, hi: int, unroll: int) -> np.ndarray:
    """Start indices in ``[lo, hi)`` whose ``unroll`` following analyses stay below hi."""
    return np.arange(lo, max(lo, hi - unroll))


def sip_loss(
    unroller: Unroller,
    x0: torch.Tensor,
    targets: torch.Tensor,
    damping: float,
    out_std: torch.Tensor,
) -> torch.Tensor:
    """Scale-invariant physics loss (Holl et al. 2022), emulator-linearised.

    1. Run the real host with the current correction (values only), keeping the
       reference states and network outputs.
    2. Gauss-Newton in correction space: per-interval offsets ``d_n`` added to the
       correction; the residual's Jacobian ``J = dr/dd`` comes from the emulator's
       tangent-linear model along the reference trajectory. Solve the damped normal
       equations ``(J^T J + lambda I) d = -J^T r`` per window.
    3. L2 proxy loss between the network outputs and the updated corrections.
    """
    from torch.func import jvp

    emu, dt, steps = unroller.emulator, unroller.dt, unroller.steps
    n_int = targets.shape[1]
    refs, outs = [], []
    x = x0
    with torch.no_grad():
        for _ in range(n_int):
            for _ in range(steps):
                c = unroller.correction(x)
                refs.append(x)
                outs.append(c)
                x = unroller.host_values(x) + dt * c
        ref = torch.stack(refs, 1)  # [B, n_int*steps, K]
        cor = torch.stack(outs, 1)
        batch, k_dim = x0.shape
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
            _, cols = jvp(emu.step, (base,), (basis,))
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
    pred = unroller.correction(ref.reshape(-1, ref.shape[-1]))
    pred = pred.reshape(cor.shape)
    scale = out_std.to(pred.dtype).reshape(1, 1, -1)
    return torch.mean(((pred - target_c) / scale) ** 2)


def a_posteriori(
    unroller: Unroller, a: torch.Tensor, starts: np.ndarray, n: int, clim_var: float
) -> torch.Tensor:
    """Mean squared distance to the next ``n`` analyses, in climatological variances."""
    x = a[starts]
    loss = torch.zeros((), dtype=a.dtype)
    for k in range(1, n + 1):
        x = unroller.interval(x)
        loss = loss + torch.mean((x - a[starts + k]) ** 2) / clim_var
    return loss / n


def training_loss(
    unroller: Unroller,
    a: torch.Tensor,
    starts: np.ndarray,
    n: int,
    out_std: torch.Tensor,
    sip_damping: float,
    clim_var: float,
) -> torch.Tensor:
    """The loss each mode minimises, on the windows starting at ``starts``."""
    if unroller.mode == "one-step":
        x = a[starts]
        with torch.no_grad():
            fc = x
            for _ in range(unroller.steps):
                fc = unroller.host.step(fc)
        target = (a[starts + 1] - fc) / (unroller.steps * unroller.dt)
        pred = unroller.correction(x)
        return torch.mean(((pred - target) / out_std.to(pred.dtype)) ** 2)
    if unroller.mode == "sip":
        targets = torch.stack([a[starts + k] for k in range(1, n + 1)], 1)
        return sip_loss(unroller, a[starts], targets, sip_damping, out_std)
    return a_posteriori(unroller, a, starts, n, clim_var)


def finetune(
    repository: str | Path,
    name: str,
    analyses: np.ndarray,
    host: HostModel,
    cfg: FinetuneConfig,
    steps_per_interval: int,
    train_end: int,
    from_version: int | None = None,
    emulator_path: str | Path | None = None,
    torch_host: HostModel | None = None,
    data_ref: str | None = None,
    progress: bool = True,
    publish_as: str | None = None,
) -> FinetuneResult:
    """Fine-tune ``name`` (newest or ``from_version``) and publish a new version.

    ``analyses`` ``[T, *state]`` at consecutive analysis times; only indices before
    ``train_end`` are used (the last ``val_fraction`` of them for validation).
    ``host`` is called forward only unless the mode is ``differentiable``.
    """
    t0 = time.perf_counter()
    parent = Corrector.load(repository, name, from_version)
    model, _ = artifacts.load(artifacts.resolve(repository, name, parent.version).path)
    model.train()
    emulator = Emulator.load(emulator_path) if emulator_path else None
    black_box = host if isinstance(host, BlackBoxHost) else BlackBoxHost.wrap(host)
    unroller = Unroller(
        cfg.mode, model, parent, black_box, steps_per_interval, emulator, torch_host
    )
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    a = torch.from_numpy(np.asarray(analyses, dtype=np.float64))
    n_val = max(int(train_end * cfg.val_fraction), cfg.max_unroll + 1)
    val_lo = train_end - n_val
    train_hi = val_lo - cfg.max_unroll  # a gap so windows do not overlap validation
    if train_hi <= cfg.max_unroll + 1:
        raise ValueError(f"too few analyses ({train_end}) for unroll {cfg.max_unroll}")
    val_starts = _windows(len(a), val_lo, train_end, cfg.max_unroll)
    pick = np.linspace(0, len(val_starts) - 1, min(cfg.val_windows, len(val_starts)))
    val_starts = val_starts[pick.astype(int)]
    clim_var = float(a[:train_end].var())
    out_std = model.out_std.detach().clone()

    def val_loss() -> float:
        model.eval()
        saved, unroller.mode = unroller.mode, "values"
        with torch.no_grad():
            v = float(a_posteriori(unroller, a, val_starts, cfg.max_unroll, clim_var))
        unroller.mode = saved
        model.train()
        return v

    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    calls_before = black_box.calls if hasattr(black_box, "calls") else 0
    history = [{"iteration": 0, "val_loss": val_loss()}]
    best_val = history[0]["val_loss"]
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    bar = tqdm(
        range(1, cfg.iterations + 1),
        desc=f"finetune {cfg.mode}",
        disable=not progress,
        mininterval=0.5,
    )
    for it in bar:
        n = cfg.unroll_at(it - 1)
        starts = rng.choice(_windows(len(a), 0, train_hi, n), cfg.batch_size)
        loss = training_loss(unroller, a, starts, n, out_std, cfg.sip_damping, clim_var)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", unroll=n, refresh=False)
        if it % cfg.val_every == 0 or it == cfg.iterations:
            v = val_loss()
            history.append({"iteration": it, "train_loss": loss.item(), "val_loss": v, "unroll": n})
            if v < best_val:
                best_val = v
                best_state = {k: t.clone() for k, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    host_calls = (black_box.calls if hasattr(black_box, "calls") else 0) - calls_before
    config = dict(parent.config)
    for key in ("name", "version", "weights_sha256", "published_at"):
        config.pop(key, None)
    config["training"] = {
        "stage": "finetune",
        "mode": cfg.mode,
        "settings": dataclasses.asdict(cfg),
        "data": data_ref,
        "emulator": str(Path(emulator_path).absolute()) if emulator_path else None,
        "host": host.name,
        "history": history,
        "pretraining": parent.config.get("training", {}).get("stage"),
    }
    config["parent"] = {"name": parent.name, "version": parent.version}
    config["metrics"] = {
        "val_loss_a_posteriori": best_val,
        "val_loss_before": history[0]["val_loss"],
        "val_unroll": cfg.max_unroll,
    }
    mv = artifacts.publish(repository, publish_as or name, model, config)
    return FinetuneResult(mv, history, best_val, host_calls, time.perf_counter() - t0)


__all__ = ["MODES", "FinetuneConfig", "FinetuneResult", "Unroller", "finetune", "sip_loss"]
