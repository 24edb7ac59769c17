"""The served model repository: loaded versions, hot reload and atomic swaps.

Every model under the repository directory (Triton layout ``name/version/``) is
served; requests without a version get the model's *default* version, which is
its production version (:mod:`correction.stages`: the newest complete version of
an ungated model) unless an administrator pinned another with the load endpoint.
A candidate is answered only to a request that names its version. Other versions
are loaded on first request and kept in a small LRU cache. Every loaded version
carries its stage, re-read at each scan, and every answer names it.

Swaps are atomic: a request resolves its :class:`LoadedModel` once, at the start,
and keeps that object (weights, guardrails, batch queue) to the end, while the
default pointer is replaced by a single assignment on the event loop thread. So
in-flight requests finish on the version they started with, and every response
names the version that produced it. Loading (disk reads, checksum, warm-up) runs
in a worker thread; a version that fails to load is reported and never served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from correction import artifacts, stages
from correction.artifacts import ArtifactError
from correction.inference import Corrector

from ..batching import Traffic
from ..errors import ServiceError
from ..metrics import ServiceMetrics
from ..settings import ServiceSettings
from .loaded import LoadedModel

log = logging.getLogger("mecs.service")


@dataclass(frozen=True)
class VersionStatus:
    """One version on disk: served (ready) or not, and why; and its stage."""

    name: str
    version: int
    ready: bool
    reason: str
    stage: str = stages.PRODUCTION


@dataclass
class ModelSlot:
    """What the service holds for one model name."""

    name: str
    default: LoadedModel | None = None
    pinned: OrderedDict[int, LoadedModel] = field(default_factory=OrderedDict)
    pin: int | None = None
    unloaded: bool = False
    failed: dict[int, str] = field(default_factory=dict)
    # what each failed version's directory looked like when it failed: a changed one
    # (a hand copy that completed, a fixed file) is tried again
    failed_at: dict[int, tuple] = field(default_factory=dict)
    loading: dict[int, asyncio.Future] = field(default_factory=dict)
    book: stages.StageBook | None = None
    shadow: LoadedModel | None = None  # the newest candidate, with shadow mode on


class ModelRepository:
    """Loads, swaps and resolves model versions for the service."""

    def __init__(
        self,
        root: Path,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        executor: Executor,
        loader: Callable[[Path, str, int], Corrector] = Corrector.load,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.loader = loader
        self.slots: dict[str, ModelSlot] = {}
        self.traffic: dict[str, Traffic] = {}
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self.started = False

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        if not self.root.is_dir():
            raise ArtifactError(f"model repository {self.root} is not a directory")
        await self.refresh()
        self.started = True
        if self.settings.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # a bad scan must not stop polling
                log.exception("repository scan failed")

    @property
    def ready(self) -> bool:
        return self.started and any(s.default is not None for s in self.slots.values())

    # -- scanning and loading --------------------------------------------------------
    def _scan(self) -> dict[str, list[int]]:
        return {n: artifacts.list_versions(self.root, n) for n in artifacts.list_models(self.root)}

    def _books(self, names) -> dict[str, stages.StageBook | None]:
        """Each model's stage book; None for an unreadable one (reported, and the
        model keeps serving what it serves)."""
        out = {}
        for n in names:
            try:
                out[n] = stages.read(self.root, n)
            except stages.StageError as err:
                log.error("model '%s': %s; keeping the versions it serves", n, err)
                out[n] = None
        return out

    def _apply_stages(self, slot: ModelSlot, book: stages.StageBook, versions: list[int]) -> None:
        """Tell every loaded version of the slot its stage (answers and metrics name it)."""
        slot.book = book
        models = list(slot.pinned.values())
        if slot.default is not None:
            models.append(slot.default)
        if slot.shadow is not None:
            models.append(slot.shadow)
        for m in models:
            stage = book.stage_of(m.version, versions)
            if stage != m.stage:
                m.set_stage(stage)
                self.metrics.set_stage(slot.name, m.version_str, stage)

    def traffic_for(self, name: str) -> Traffic:
        t = self.traffic.get(name)
        if t is None:
            t = self.traffic[name] = Traffic()
        return t

    def _load_sync(self, name: str, version: int, traffic: Traffic) -> LoadedModel:
        corrector = self.loader(self.root, name, version)
        model = LoadedModel(corrector, self.settings, traffic, self.executor, self.metrics)
        model.warm_up()
        try:
            book = stages.read(self.root, name)
            model.set_stage(book.stage_of(version, artifacts.list_versions(self.root, name)))
        except stages.StageError:
            model.set_stage("unknown")  # the scan reports the file
        return model

    async def _load(self, slot: ModelSlot, version: int) -> LoadedModel:
        """Load one version in a thread; concurrent callers share one load."""
        pending = slot.loading.get(version)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        slot.loading[version] = future
        try:
            traffic = self.traffic_for(slot.name)  # shared state: touched on the loop only
            model = await asyncio.to_thread(self._load_sync, slot.name, version, traffic)
        except Exception as err:  # any broken version is reported, never served
            msg = str(err) or type(err).__name__
            slot.failed[version] = msg
            slot.failed_at[version] = await asyncio.to_thread(
                artifacts.fingerprint, self.root / slot.name / str(version)
            )
            self.metrics.loads.labels(slot.name, "failed").inc()
            log.error("cannot load model '%s' version %s: %s", slot.name, version, msg)
            exc = ServiceError(503, f"model '{slot.name}' version {version} failed to load: {msg}")
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise exc from None
        finally:
            slot.loading.pop(version, None)
        slot.failed.pop(version, None)
        slot.failed_at.pop(version, None)
        model.batcher.attach()
        self.metrics.set_stage(slot.name, model.version_str, model.stage)
        self.metrics.loads.labels(slot.name, "ok").inc()
        future.set_result(model)
        return model

    def _set_default(self, slot: ModelSlot, model: LoadedModel | None) -> None:
        old = slot.default
        slot.default = model  # the swap: one assignment, on the event loop thread
        if old is not None and old is not model and model is not None:
            self._keep(slot, old)  # stays warm for clients that pin it, or a rollback
        elif old is not None and old is not model:
            old.batcher.retire()
        if model is None:
            self.metrics.forget_version_served(slot.name)
        else:
            self.metrics.version_served.labels(slot.name).set(model.version)
            log.info("model '%s' now serves version %d", slot.name, model.version)
        self._count_loaded(slot)

    def _count_loaded(self, slot: ModelSlot) -> None:
        versions = {m.version for m in slot.pinned.values()}
        if slot.default is not None:
            versions.add(slot.default.version)
        self.metrics.versions_loaded.labels(slot.name).set(len(versions))

    def _changed_since_failure(self, slot: ModelSlot) -> None:
        """Forget the failures of versions whose files changed since (tried again)."""
        for v, seen in list(slot.failed_at.items()):
            if artifacts.fingerprint(self.root / slot.name / str(v)) != seen:
                slot.failed.pop(v, None)
                slot.failed_at.pop(v, None)

    async def refresh(self, only: str | None = None) -> None:
        """Scan the repository and move each model's default to its target version."""
        async with self._lock:
            disk = await asyncio.to_thread(self._scan)
            names = [n for n in disk if only is None or n == only]
            books = await asyncio.to_thread(self._books, names)
            for name in names:
                versions = disk[name]
                slot = self.slots.setdefault(name, ModelSlot(name))
                book = books[name]
                if book is None:
                    continue
                if slot.unloaded or not versions:
                    self._apply_stages(slot, book, versions)
                    continue
                if slot.failed_at:
                    await asyncio.to_thread(self._changed_since_failure, slot)
                if slot.pin in versions and slot.pin not in slot.failed:
                    targets = [slot.pin]
                else:  # production, then the last good ones; a failed version is skipped
                    targets = [v for v in book.fallbacks(versions) if v not in slot.failed]
                for target in targets:
                    if slot.default is not None and slot.default.version == target:
                        break
                    model = slot.pinned.pop(target, None)
                    shadow = slot.shadow
                    if model is None and shadow is not None and shadow.version == target:
                        model, slot.shadow = shadow, None  # the shadowed candidate, promoted
                    if model is None:
                        try:
                            model = await self._load(slot, target)
                        except ServiceError:
                            continue  # reported; keep serving what we have
                    self._set_default(slot, model)
                    break
                self._apply_stages(slot, book, versions)
                if self.settings.shadow:
                    await self._refresh_shadow(slot, book, versions)

    async def _refresh_shadow(self, slot: ModelSlot, book, versions: list[int]) -> None:
        """Keep the slot's newest candidate loaded for shadow mode (or none)."""
        cands = [
            v
            for v in versions
            if book.gated and book.stage_of(v) == stages.CANDIDATE and v not in slot.failed
        ]
        want = cands[-1] if cands else None
        current = slot.shadow
        if current is not None and current.version == want:
            return
        if (
            current is not None
            and current is not slot.default
            and current.version not in slot.pinned
        ):
            current.batcher.retire()
        slot.shadow = None
        if want is None:
            return
        model = slot.pinned.get(want)
        if model is None:
            try:
                model = await self._load(slot, want)
            except ServiceError:
                return  # reported by _load; shadowing waits for a loadable candidate
        slot.shadow = model
        self.metrics.set_stage(slot.name, model.version_str, model.stage)

    def shadow_of(self, name: str) -> LoadedModel | None:
        slot = self.slots.get(name)
        return None if slot is None else slot.shadow

    # -- resolving -------------------------------------------------------------------
    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise ServiceError(404, f"unknown model '{name}'")
        return slot

    async def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The model answering ``name`` (default version) or ``name``/``version``."""
        slot = self.slots.get(name)
        if slot is None:
            raise ServiceError(404, f"unknown model '{name}'")
        default = slot.default
        if default is None:
            if slot.unloaded:
                raise ServiceError(
                    404,
                    f"model '{name}' is not loaded (unloaded by an "
                    "administrator; load it to serve it again)",
                )
            raise ServiceError(503, f"model '{name}' has no loadable version")
        if version is None or version == default.version:
            return default
        model = slot.pinned.get(version)
        if model is not None:
            slot.pinned.move_to_end(version)
            return model
        if self.settings.max_pinned_versions <= 0:
            raise ServiceError(404, f"model '{name}' serves only version {default.version}")
        versions = await asyncio.to_thread(artifacts.list_versions, self.root, name)
        if version not in versions:
            raise ServiceError(404, f"model '{name}' has no version {version} (have {versions})")
        model = await self._load(slot, version)
        if slot.default is not None and slot.default.version == version:
            return slot.default
        self._keep(slot, model)
        self._count_loaded(slot)
        return model

    def _keep(self, slot: ModelSlot, model: LoadedModel) -> None:
        """Cache a non-default version (LRU of ``max_pinned_versions``)."""
        slot.pinned[model.version] = model
        slot.pinned.move_to_end(model.version)
        while len(slot.pinned) > self.settings.max_pinned_versions:
            _, evicted = slot.pinned.popitem(last=False)
            evicted.batcher.retire()

    async def versions(self, name: str) -> list[int]:
        return await asyncio.to_thread(artifacts.list_versions, self.root, name)

    # -- repository extension --------------------------------------------------------
    async def statuses(self) -> list[VersionStatus]:
        """Every version on disk and whether it is served (the repository index)."""
        disk = await asyncio.to_thread(self._scan)
        books = await asyncio.to_thread(self._books, list(disk))
        out = []
        for name in sorted(set(disk) | set(self.slots)):
            slot = self.slots.get(name)
            book = books.get(name) or stages.StageBook(name)
            for v in disk.get(name, []):
                loaded = slot is not None and (
                    (slot.default is not None and slot.default.version == v) or v in slot.pinned
                )
                if loaded:
                    ready, reason = True, ""
                    if slot.default is not None and slot.default.version == v:
                        reason = "default" + (" (pinned)" if slot.pin == v else "")
                elif slot is not None and v in slot.failed:
                    ready, reason = False, slot.failed[v]
                elif slot is not None and slot.unloaded:
                    ready, reason = False, "unloaded"
                else:
                    ready, reason = False, "not loaded"
                out.append(VersionStatus(name, v, ready, reason, book.stage_of(v, disk[name])))
        return out

    async def load(self, name: str, version: int | None = None) -> LoadedModel:
        """Admin load: (re)scan ``name``; pin ``version`` as default, or follow production."""
        artifacts.check_name(name)
        versions = await self.versions(name)
        if not versions:
            raise ServiceError(404, f"model '{name}' has no versions in the repository")
        if version is not None and version not in versions:
            raise ServiceError(404, f"model '{name}' has no version {version} (have {versions})")
        async with self._lock:
            slot = self.slots.setdefault(name, ModelSlot(name))
            if version is not None:
                target = version
            else:  # follow production (the newest of an ungated model), never a candidate
                try:
                    book = await asyncio.to_thread(stages.read, self.root, name)
                except stages.StageError as err:
                    raise ServiceError(503, f"model '{name}': {err}") from None
                target = book.production(versions)
                if target is None:
                    raise ServiceError(404, f"model '{name}' has no production version")
            slot.failed.pop(target, None)  # an explicit load always tries again
            slot.failed_at.pop(target, None)
            if slot.default is None or slot.default.version != target:
                # a version that fails to load raises here, before the pin or the
                # unloaded flag change: the model keeps serving (and following) as before
                model = slot.pinned.pop(target, None) or await self._load(slot, target)
                self._set_default(slot, model)
            slot.unloaded = False
            slot.pin = version
            return slot.default

    async def unload(self, name: str) -> None:
        """Admin unload: stop serving ``name`` (requests already queued still finish)."""
        async with self._lock:
            slot = self._slot(name)
            slot.unloaded = True
            slot.pin = None
            for m in slot.pinned.values():
                m.batcher.retire()
            slot.pinned.clear()
            self._set_default(slot, None)
