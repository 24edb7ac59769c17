"""The destination check for increment stores behind fsspec URLs (object storage).

Staging and commit themselves are :mod:`correction.storage`'s; what is particular
to increment stores is that an *unfinished* one (no completion marker) may be
replaced without ``--overwrite``: it was left by a killed build.
"""

from __future__ import annotations

import contextlib
import json

from correction.storage import OutputExistsError, url_to_fs

from .base import MARKER


def check_remote_destination(out: str, overwrite: bool) -> None:
    """Refuse a non-empty remote ``out``, unless it is an unfinished increment store."""
    fs, root = url_to_fs(out)
    if not (fs.exists(root) and fs.ls(root)) or overwrite:
        return
    unfinished = False
    if not fs.exists(f"{root}/{MARKER}") and fs.exists(f"{root}/zarr.json"):
        with contextlib.suppress(Exception):
            meta = json.loads(fs.cat(f"{root}/zarr.json"))
            unfinished = meta.get("attributes", {}).get("source") == "mecs increments"
    if not unfinished:
        raise OutputExistsError(f"output {out} is not empty; pass --overwrite to replace it")
