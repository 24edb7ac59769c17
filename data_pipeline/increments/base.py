"""Names shared by every part of the increment pipeline: dims, roles, limits, errors."""

from __future__ import annotations

import logging

from ..config import DEFAULT_SPLIT, LOCAL_WORKERS  # noqa: F401 (re-exported)

SAMPLE = "sample"


TIME, INIT, LEAD = "time", "init_time", "lead_time"


ROLES = ("state", "increment", "target")


SPLIT_NAMES = ("train", "val", "test")


MARKER = ".mecs-complete"


STATS_FILE = "stats.json"


VERTICAL_NAMES = frozenset({"level", "lev", "plev", "z", "height", "depth", "model_level"})


MAX_CHUNK_SAMPLES = 4096


CHUNK_BYTES = 32 * 2**20  # default output chunk: at most this many bytes per variable


INPUT_CHUNK_BYTES = 64 * 2**20  # inputs that are not chunked yet get chunks of this size


IN_MEMORY = "<in-memory xarray.Dataset>"


HASH_VERSION = b"mecs-increments-v1\0"


NS_PER_HOUR = 3_600_000_000_000


CONVENTIONS = "CF-1.10"


log = logging.getLogger(__name__)


class InputError(ValueError):
    """Inputs that do not fit; the message names the variable, the time and the fault."""


class IncompleteStoreError(OSError):
    """The path holds no complete increment store (no completion marker)."""
