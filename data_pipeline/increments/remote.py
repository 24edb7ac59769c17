"""Staging and commit for stores behind fsspec URLs (object storage)."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from .base import MARKER, STATS_FILE


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _check_remote_destination(out: str, overwrite: bool) -> None:
    """Refuse a non-empty remote ``out``, unless it is an unfinished increment store."""
    from ..stores import OutputExistsError

    fs, root = _fs(out)
    if not (fs.exists(root) and fs.ls(root)) or overwrite:
        return
    unfinished = False
    if not fs.exists(f"{root}/{MARKER}") and fs.exists(f"{root}/zarr.json"):
        with contextlib.suppress(Exception):
            meta = json.loads(fs.cat(f"{root}/zarr.json"))
            unfinished = meta.get("attributes", {}).get("source") == "mecs increments"
    if not unfinished:
        raise OutputExistsError(f"output {out} is not empty; pass --overwrite to replace it")


def _remote_staging(out: str) -> str:
    """Object stores cannot rename atomically: stage beside ``out``; the marker commits."""
    import secrets

    fs, root = _fs(out)
    parent, name = root.rstrip("/").rsplit("/", 1)
    protocol = out.split("://", 1)[0]
    return f"{protocol}://{parent}/.{name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _remote_commit(staging: str, out: str, stats_text: str, digest: str) -> None:
    fs, root = _fs(out)
    _, stage_root = _fs(staging)
    fs.pipe(f"{stage_root}/{STATS_FILE}", stats_text.encode())
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.mv(stage_root, root, recursive=True)
    fs.pipe(f"{root}/{MARKER}", (digest + "\n").encode())  # last: the store is complete


def _discard(staging: Any, remote: bool) -> None:
    if remote:
        with contextlib.suppress(Exception):
            fs, root = _fs(str(staging))
            fs.rm(root, recursive=True)
    else:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
