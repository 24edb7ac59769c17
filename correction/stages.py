"""Version stages of a served model: ``candidate``, ``production``, ``retired``.

A forecasting centre does not change its operational model the moment a training
job finishes: the new version is verified against the current one and promoted
only if it wins (``mecs promote``). The stages live in one small file beside the
versions, ``<repository>/<name>/stages.json``; the Triton layout of the versions
is unchanged and no version directory is ever edited (their configs are
checksummed). The file holds each version's stage and the promotion records
(scores, data, rule, decision, who and when), the model's promotion lineage.

Rules, so that every reader agrees on what is served:

- a model **without** a stages file is ungated, as before stages existed: every
  version counts as production and the newest is served;
- a model **with** one serves its production version (exactly one after the
  first write); a version the file does not list is a candidate, so a hand copy
  or an old tool's publish never goes live unverified;
- candidates are answered only to a request that names their version.

Writers (``publish``, ``mecs promote``, the trainer loop) take an exclusive
``fcntl`` lock on ``stages.lock`` and replace the file atomically (write to a
temporary file, fsync, rename), so a reader sees the old file or the new one,
never half of one, and two promoters never lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .storage import atomic_write_text

FORMAT = "mecs-stages/1"
FILE = "stages.json"
LOCK = "stages.lock"
CANDIDATE, PRODUCTION, RETIRED = "candidate", "production", "retired"
STAGES = (CANDIDATE, PRODUCTION, RETIRED)


class StageError(ValueError):
    """A stages file or a stage change that cannot be used; the message says which."""


@dataclass
class StageBook:
    """One model's stages and promotion records (``gated`` False: no file yet)."""

    name: str
    stages: dict[int, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    gated: bool = False

    def stage_of(self, version: int, versions: list[int] | None = None) -> str:
        """The stage of ``version``; ungated models serve their newest version."""
        if not self.gated:
            if versions is not None and versions and version != max(versions):
                return RETIRED
            return PRODUCTION
        return self.stages.get(int(version), CANDIDATE)

    def production(self, versions: list[int]) -> int | None:
        """The version served by default among ``versions`` (on disk), or None."""
        if not versions:
            return None
        if not self.gated:
            return max(versions)
        prod = [v for v in versions if self.stages.get(v) == PRODUCTION]
        return max(prod) if prod else None

    def fallbacks(self, versions: list[int]) -> list[int]:
        """Versions to serve, best first, when the production one cannot be loaded:
        production, then retired ones newest first (the last good ones). Never a
        candidate."""
        if not self.gated:
            return sorted(versions, reverse=True)
        prod = self.production(versions)
        retired = sorted((v for v in versions if self.stages.get(v) == RETIRED), reverse=True)
        return ([prod] if prod is not None else []) + retired

    def previous_production(self) -> int | None:
        """The version that was production before the current one (the rollback target):
        what the record that made the current version production replaced."""
        current = self.production(sorted(self.stages))
        for r in reversed(self.records):
            if r.get("version") == current and r.get("decision") in ("promoted", "rollback"):
                before = r.get("previous_production")
                return None if before is None else int(before)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "stages": {str(v): s for v, s in sorted(self.stages.items())},
            "records": self.records,
        }


def path_of(repository: str | Path, name: str) -> Path:
    return Path(repository) / name / FILE


def read(repository: str | Path, name: str) -> StageBook:
    """The model's stage book (an ungated empty one when there is no file)."""
    path = path_of(repository, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return StageBook(name)
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise StageError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        stages = {}
        for key, stage in dict(doc.get("stages", {})).items():
            if stage not in STAGES:
                raise StageError(f"{path}: version {key} has stage {stage!r}; known {STAGES}")
            stages[int(key)] = stage
        records = list(doc.get("records", []))
    except (ValueError, TypeError, AttributeError) as err:
        if isinstance(err, StageError):
            raise
        raise StageError(f"{path} is not a stages file: {err}") from None
    return StageBook(name, stages, records, gated=True)


@contextlib.contextmanager
def editing(
    repository: str | Path, name: str, new_version: int | None = None
) -> Iterator[StageBook]:
    """Lock the model's stages, yield its book, write it back atomically on success.

    The first edit of an ungated model writes down what was implicit: its newest
    version production, the older ones retired (``new_version``, just published,
    is left for the caller to place).
    """
    from .artifacts import check_name, list_versions

    root = Path(repository) / check_name(name)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            book = read(repository, name)
            if not book.gated:
                on_disk = [v for v in list_versions(repository, name) if v != new_version]
                for v in on_disk:
                    book.stages[v] = PRODUCTION if v == max(on_disk) else RETIRED
                book.gated = True
            yield book
            atomic_write_text(root / FILE, json.dumps(book.to_dict(), indent=1) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def set_production(book: StageBook, version: int) -> int | None:
    """Make ``version`` the production one; the former production is retired.
    Returns the former production version (None if there was none)."""
    before = [v for v, s in book.stages.items() if s == PRODUCTION and v != version]
    for v in before:
        book.stages[v] = RETIRED
    book.stages[int(version)] = PRODUCTION
    return max(before) if before else None


def register_new(repository: str | Path, name: str, version: int, stage: str) -> str:
    """Record a just-published version's stage. ``candidate`` on a model without a
    production version makes it production (there is nothing to verify it against)."""
    if stage not in (CANDIDATE, PRODUCTION):
        raise StageError(f"a new version is a candidate or production, not {stage!r}")
    with editing(repository, name, new_version=version) as book:
        prod = book.production([v for v in book.stages if v != version])
        if stage == PRODUCTION or prod is None:
            before = set_production(book, version)
            book.records.append(
                record(
                    version,
                    "promoted",
                    previous=before,
                    reason="published as production"
                    if stage == PRODUCTION
                    else "first version: nothing to verify it against",
                )
            )
            return PRODUCTION
        book.stages[int(version)] = CANDIDATE
        return CANDIDATE


def who() -> str:
    """``user@host`` of the process making a stage change (or MECS_ACTOR)."""
    actor = os.environ.get("MECS_ACTOR")
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def record(version: int, decision: str, previous: int | None = None, **extra: Any) -> dict:
    """One promotion record: version, decision, the production before, who and when."""
    return {
        "version": int(version),
        "decision": decision,
        "previous_production": previous,
        "by": who(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
