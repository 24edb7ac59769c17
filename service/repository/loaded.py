"""One model version in memory: corrector, guarded forward path, batch queue."""

from __future__ import annotations

import time
from concurrent.futures import Executor

import numpy as np

from correction.guardrails import GuardedCorrector
from correction.inference import Corrector

from ..batching import Batcher, BatchResult, Traffic
from ..metrics import ServiceMetrics
from ..settings import ServiceSettings


class LoadedModel:
    """One model version in memory: the corrector, its guardrails and its batch queue."""

    def __init__(
        self,
        corrector: Corrector,
        settings: ServiceSettings,
        traffic: Traffic,
        executor: Executor,
        metrics: ServiceMetrics,
    ) -> None:
        self.corrector = corrector
        self.name = corrector.name
        self.version = int(corrector.version)
        self.version_str = str(self.version)
        self.state_shape = tuple(corrector.state_shape)
        self.n_forcings = int(corrector.model.n_forcings)
        self.loaded_at = time.time()
        self.forward = GuardedCorrector(
            corrector,
            settings.correction_cap_std,
            settings.ood_threshold_std,
            settings.runtime,
            settings.torch_threads,
            settings.runtime_arena,
            label=f"model '{self.name}' v{self.version}",
            max_values=settings.forward_max_values,
        )
        self.dtype = self.forward.dtype
        # checked request headers of this version (service.routers.checks.plan_for)
        self.plans: dict[bytes, object] = {}
        # candidate, production or retired (correction.stages); set by the repository
        self.stage = "production"
        self.runtime = self.forward.runtime
        labels = (self.name, self.version_str)
        # this version's series, resolved once: the hot path updates them directly
        self.served = metrics.infer_requests.labels(*labels, "200")
        self.samples = metrics.samples.labels(*labels)
        self.latency = metrics.infer_latency.labels(*labels)
        batch_size = metrics.batch_size.labels(*labels).observe
        batch_requests = metrics.batch_requests.labels(*labels).observe
        forward_latency = metrics.forward_latency.labels(*labels).observe
        queue_wait = metrics.queue_wait.labels(self.name).observe

        def observe(samples: int, requests: int, seconds: float, waits: list[float]) -> None:
            batch_size(samples)
            batch_requests(requests)
            forward_latency(seconds)
            for w in waits:
                queue_wait(w)

        self.batcher = Batcher(
            self.forward.run,
            traffic,
            executor,
            max_size=settings.batch_max_size,
            max_delay_s=settings.batch_max_delay_ms / 1000.0,
            max_queue_samples=settings.max_queue_samples,
            inline_max_values=settings.inline_forward_max_values,
            observe=observe,
            group_timeout_s=settings.batch_group_timeout_ms / 1000.0,
        )

    async def correct(
        self,
        state: np.ndarray,
        forcings: np.ndarray | None = None,
        ticket=None,
        group: tuple[str, int] | None = None,
        out: np.ndarray | None = None,
        bounds: tuple[float, float] | None = None,
    ) -> BatchResult:
        return await self.batcher.submit(state, forcings, ticket, group, out, bounds)

    def set_stage(self, stage: str) -> None:
        """A new stage (a promotion): answers name it from the next request on, so the
        answer headers cached with this version's plans are dropped."""
        self.stage = stage
        for plan in self.plans.values():
            heads = getattr(plan, "heads", None)
            if heads is not None:
                heads.clear()

    def warm_up(self) -> None:
        """One forward pass so the first real request does not pay allocation costs."""
        x = np.broadcast_to(self.corrector.in_mean.mean(), (1, *self.state_shape)).astype(
            self.dtype
        )
        f = None if not self.n_forcings else np.zeros((1, self.n_forcings), self.dtype)
        self.forward(x, f)
