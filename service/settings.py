"""Service settings: environment (``MECS_*``), an optional config file, then flags.

Precedence, highest first: explicit arguments (``mecs serve`` flags), environment
variables, the ``--config`` file (JSON, TOML, or a ``KEY=VALUE`` env file), the
defaults below. API keys are never in code: they come from ``MECS_INFERENCE_KEYS``
/ ``MECS_ADMIN_KEYS`` (comma-separated) or from ``MECS_API_KEYS_FILE``, a JSON or
TOML file ``{"inference": [...], "admin": [...]}``. A key written as
``sha256:<hex>`` is stored as that digest, so plain keys need not sit on disk.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from correction.config_files import SettingsFileError, read_settings_file

log = logging.getLogger("mecs.service")

ENV_PREFIX = "MECS_"


class SettingsError(ValueError):
    """A setting or a settings file is wrong; the message names it."""


class ServiceSettings(BaseSettings):
    """Every knob of ``mecs serve``; each is also the env variable ``MECS_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    repository: Path | None = Field(None, description="model repository (name/version/ dirs)")
    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    inference_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bearer keys with the inference scope"
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="bearer keys with the admin scope (implies inference)"
    )
    api_keys_file: Path | None = Field(None, description="JSON/TOML file of keys by scope")
    allow_anonymous: bool = Field(
        False, description="serve without keys on a non-loopback host (not recommended)"
    )
    max_body_bytes: int = Field(64 << 20, gt=0, description="request body limit (413 above)")
    max_json_body_bytes: int = Field(
        4 << 20,
        gt=0,
        description="limit of a JSON body (413 above): JSON is decoded on the event loop, "
        "so large states go binary",
    )
    max_inflight_body_bytes: int = Field(
        256 << 20,
        gt=0,
        description="request bytes admitted at once over all connections; a request that "
        "would pass it gets 503 with Retry-After",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive within this time (408 and close)"
    )
    max_connections: int = Field(
        1024, ge=1, description="concurrent connections and requests (uvicorn answers 503 above)"
    )
    forward_max_values: int = Field(
        1 << 21,
        ge=1,
        description="values per forward pass: a larger batch runs in pieces, bounding the "
        "network's working memory",
    )
    batch_max_size: int = Field(
        64, ge=1, description="samples per forward pass; 1 turns micro-batching off"
    )
    batch_max_delay_ms: float = Field(
        2.0, ge=0, description="longest a request waits for companions"
    )
    batch_group_timeout_ms: float = Field(
        50.0,
        ge=0,
        description="longest a request of a timestep group (parameters group, group_size) "
        "waits for the rest of its group",
    )
    shared_memory: bool = Field(
        False,
        description="system shared-memory regions for callers on this host "
        "(/v2/systemsharedmemory); off, those endpoints answer 404",
    )
    shared_memory_root: Path = Field(
        Path("/dev/shm"), description="where shared-memory keys are looked up"
    )
    max_shared_memory_regions: int = Field(
        64, ge=1, description="shared-memory regions registered at once, over all callers"
    )
    max_shared_memory_bytes: int = Field(
        1 << 30, ge=1, description="bytes of shared memory mapped at once, over all regions"
    )
    shared_memory_idle_s: float = Field(
        3600.0,
        gt=0,
        description="a region unused this long is unregistered (a caller that died without "
        "unregistering)",
    )
    max_queue_samples: int = Field(
        65536, ge=1, description="queued samples per model version before 503"
    )
    inline_forward_max_values: int = Field(
        1 << 18,
        ge=0,
        description="batches up to this many values run on the event loop, larger ones in a "
        "worker thread",
    )
    poll_interval_s: float = Field(
        2.0, ge=0, description="repository scan period for new versions (0: only on load)"
    )
    max_pinned_versions: int = Field(
        4, ge=0, description="non-default versions kept loaded per model (LRU)"
    )
    shadow: bool = Field(
        False,
        description="also run each model's newest candidate on live requests (never "
        "answered) and export its distance from production (mecs_shadow_difference)",
    )
    shadow_max_in_flight: int = Field(
        4, ge=1, description="requests shadowed at once; beyond it a request is not shadowed"
    )
    record_dir: str | None = Field(
        None,
        description="record a sample of the states corrected and the corrections returned "
        "here, for mecs monitor (off when unset)",
    )
    record_fraction: float = Field(
        0.01, gt=0, le=1, description="fraction of answered requests recorded"
    )
    record_file_samples: int = Field(
        256, ge=1, description="samples per record file (netCDF, written when full)"
    )
    record_max_files: int = Field(
        50, ge=1, description="record files kept per model; the oldest are removed"
    )
    max_dt_ratio: float = Field(
        100.0,
        ge=0,
        description="refuse a request dt this many times larger or smaller than the host "
        "step a model was trained with (a likely unit error; 0: off)",
    )
    correction_cap_std: float | None = Field(
        10.0, description="cap |correction - mean| at this many training-target stds (0: off)"
    )
    ood_threshold_std: float = Field(
        6.0, gt=0, description="flag a sample whose input lies this many stds from the mean"
    )
    torch_threads: int = Field(
        1, ge=0, description="intra-op threads of torch and ONNX Runtime (0: their defaults)"
    )
    runtime: Literal["onnxruntime", "torchscript", "eager"] = Field(
        "onnxruntime",
        description="inference runtime, checked against eager torch at load; falls back "
        "along onnxruntime, torchscript, eager",
    )
    gc_freeze: bool = Field(True, description="gc.freeze() after start-up (short GC pauses)")
    busy_poll_us: int = Field(
        0,
        ge=0,
        le=100_000,
        description="after each request the event loop polls without sleeping for this many "
        "microseconds, yielding the core on every pass (lower latency for callers in step, at "
        "the cost of CPU while idle; 0: off)",
    )
    cpu_latency_qos_us: int | None = Field(
        None,
        ge=0,
        le=1_000_000,
        description="while serving, hold a CPU latency QoS request of this many microseconds "
        "(/dev/cpu_dma_latency; 0: idle CPUs poll instead of halting, machine-wide, at the cost "
        "of CPU while idle; needs root or the device; unset: off)",
    )
    runtime_arena: bool = Field(
        False,
        description="ONNX Runtime's memory arena: large batches ~2x faster, but each loaded "
        "version keeps the memory of its largest batch",
    )
    malloc_mmap_threshold_mb: int = Field(
        32,
        ge=0,
        le=32,
        description="glibc malloc: buffers below this many MB come from the heap instead of "
        "fresh mmaps (a 4 MB body reads ~3x faster); 0 leaves malloc as it is",
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (when a provider is configured); off, it "
        "costs nothing per request",
    )
    ssl_certfile: Path | None = Field(
        None, description="serve https with this PEM certificate (chain) file"
    )
    ssl_keyfile: Path | None = Field(None, description="the private key of ssl_certfile (PEM)")
    keep_alive_s: float = Field(75.0, gt=0, description="idle keep-alive connection timeout")
    metrics_require_auth: bool = Field(False, description="/metrics needs an admin key")
    docs_enabled: bool = Field(True, description="serve /docs and /openapi.json")
    log_level: str = Field("info", description="uvicorn and service log level")

    @field_validator("inference_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator(
        "ssl_certfile", "ssl_keyfile", "record_dir", "cpu_latency_qos_us", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("correction_cap_std")
    @classmethod
    def _cap(cls, value: float | None) -> float | None:
        if value is not None and value < 0:
            raise ValueError("must be >= 0 (0 turns the cap off)")
        return value or None

    @model_validator(mode="after")
    def _limits_agree(self) -> ServiceSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: set both or neither")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}), or no request of the largest size "
                "could ever be admitted"
            )
        return self

    def keys_by_scope(self) -> dict[str, list[str]]:
        """Keys from the settings plus the keys file, by scope ("inference", "admin")."""
        keys = {"inference": list(self.inference_keys), "admin": list(self.admin_keys)}
        if self.api_keys_file is not None:
            for scope, values in read_keys_file(self.api_keys_file).items():
                keys[scope].extend(values)
        return keys

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def read_keys_file(path: Path) -> dict[str, list[str]]:
    """``{"inference": [...], "admin": [...]}`` from a JSON or TOML secrets file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SettingsError(f"api_keys_file {path}: {err.strerror or err}") from None
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("api_keys_file %s is readable by group or others; chmod 600 it", path)
    try:
        # parsed from the text already read: the secrets file is opened once
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as err:  # tomllib.TOMLDecodeError is a ValueError
        raise SettingsError(f"api_keys_file {path}: cannot parse: {err}") from None
    unknown = set(data) - {"inference", "admin"} if isinstance(data, dict) else {"<not a map>"}
    if unknown:
        raise SettingsError(
            f"api_keys_file {path}: unknown entries {sorted(unknown)}; use 'inference' and 'admin'"
        )
    out = {}
    for scope in ("inference", "admin"):
        values = data.get(scope, [])
        if isinstance(values, str):
            values = [values]
        if not all(isinstance(v, str) and v for v in values):
            raise SettingsError(f"api_keys_file {path}: '{scope}' must be a list of strings")
        out[scope] = list(values)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a JSON, TOML or env (``KEY=VALUE``, ``MECS_`` prefix optional) file."""
    path = Path(path)
    try:
        data = read_settings_file(path)
    except SettingsFileError as err:
        raise SettingsError(str(err)) from None
    out = {}
    for key, value in data.items():
        name = key.lower().removeprefix(ENV_PREFIX.lower())
        if name not in ServiceSettings.model_fields:
            raise SettingsError(
                f"config file {path}: unknown setting '{key}' "
                f"(known: {', '.join(sorted(ServiceSettings.model_fields))})"
            )
        out[name] = value
    return out


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServiceSettings:
    """Build settings with the precedence flags > environment > file > defaults.

    ``overrides`` whose value is None are ignored, so argparse defaults of None do
    not mask the environment.
    """
    values = read_config_file(config_file) if config_file else {}
    # the environment beats the file: drop file values that the environment sets
    values = {k: v for k, v in values.items() if f"{ENV_PREFIX}{k.upper()}" not in os.environ}
    values.update({k: v for k, v in overrides.items() if v is not None})
    from pydantic import ValidationError

    try:
        return ServiceSettings(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if not where:  # a rule between settings
            raise SettingsError(f"settings: {first['msg'].removeprefix('Value error, ')}") from None
        raise SettingsError(f"setting '{where}': {first['msg']}") from None
