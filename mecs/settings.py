"""The deployment's settings: one model for the service, the jobs and docker compose.

:class:`Settings` extends the service's own model (:class:`service.settings.ServiceSettings`,
read by ``mecs serve``) with what the other roles of a deployment need: where the
jobs read and write, the dask scheduler, the model and host names, and the sizes of
the training jobs. Every field is the environment variable ``MECS_<NAME>``.

In ``docker-compose.yml`` each job's command line is built from these variables
(``${MECS_INCREMENTS:-/data/increments.zarr}`` and so on), the service reads its own
variables from the environment, and ``.env.example`` lists every field with the value
a compose deployment uses. The settings table of docs/settings.md is generated from this model
(:func:`settings_table`), and the tests check that ``.env.example``, the table and the
model agree.

``python -m mecs.settings --check .env`` validates an env file against the model
before a deployment (unknown ``MECS_*`` names and bad values are errors; variables
with another prefix, such as compose's own, are left alone), and
``python -m mecs.settings --table`` prints the settings table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from correction.training.settings import MODES, EmulatorConfig, FinetuneConfig, PretrainConfig
from data_pipeline.config import DEFAULT_SPLIT, PRESETS, BenchmarkConfig
from service.settings import ENV_PREFIX, ServiceSettings

FinetuneMode = Literal[MODES]
SynthPreset = Literal[tuple(PRESETS)]


class Settings(ServiceSettings):
    """Every setting of a deployment; each is also the env variable ``MECS_<NAME>``.

    The fields inherited from :class:`ServiceSettings` configure ``mecs serve``;
    the others configure the jobs that docker compose runs (their values become
    command-line flags there). Paths default to the container layout of
    ``deploy/Dockerfile``: data under ``/data`` and models under ``/models``.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # where the jobs read and write (paths, or fsspec URLs where a stage takes them)
    synth_dir: str = Field(
        "/data/synth", description="where the synth job writes the built-in l96-2s benchmark"
    )
    analyses: str = Field(
        "/data/synth/analyses.zarr",
        description="analyses the pipeline, emulator, trainer and forecast jobs read",
    )
    forecasts: str = Field(
        "/data/synth/forecasts_archive.zarr",
        description="forecast archive the pipeline aligns with the analyses",
    )
    increments: str = Field(
        "/data/increments.zarr",
        description="increment store the pipeline writes and pretraining reads",
    )
    emulator: str = Field(
        "/data/emulator",
        description="emulator artifact the emulator job writes and the trainer reads",
    )
    forecast_out: str = Field(
        "/data/forecast.zarr", description="output store of the forecast job (replaced)"
    )
    # the increment pipeline
    scheduler: str = Field(
        "tcp://scheduler:8786",
        description="dask scheduler the pipeline job runs on (`mecs increments --scheduler`): "
        "compose's own, an existing cluster's address, or `local` for a cluster inside the job",
    )
    window: str = Field(
        str(BenchmarkConfig.obs_interval),
        description="increment window: a number in the data's time units or a duration "
        "such as `6h` (0.05 is the l96-2s analysis interval)",
    )
    split: str = Field(
        DEFAULT_SPLIT,
        description="train/validation/test split of the increment store (fractions or "
        "explicit time ranges, as `mecs increments --split`)",
    )
    # models and hosts
    model_name: str = Field(
        "l96", description="model name in the repository: trained, published, served, called"
    )
    host_model: str = Field(
        "l96", description="host model of the emulator, trainer and forecast jobs"
    )
    # the built-in benchmark
    synth_preset: SynthPreset = Field(
        BenchmarkConfig.preset, description="benchmark preset of the synth job"
    )
    synth_duration: float = Field(
        BenchmarkConfig.duration,
        gt=0,
        description="stored cycling period of the synth job, model time units",
    )
    # training jobs: the stages' own defaults (compose passes every flag)
    pretrain_network: str = Field(
        PretrainConfig.network,
        description="network of the pretrain job (`column-mlp`, `stencil-cnn`)",
    )
    pretrain_epochs: int = Field(
        PretrainConfig.max_epochs, ge=1, description="most epochs of the pretrain job"
    )
    emulator_epochs: int = Field(
        EmulatorConfig.epochs, ge=1, description="epochs of the emulator job"
    )
    finetune_mode: FinetuneMode = Field(FinetuneConfig.mode, description="online fine-tuning mode")
    finetune_iterations: int = Field(
        FinetuneConfig.iterations, ge=1, description="optimizer iterations per fine-tuning run"
    )
    train_interval_s: float = Field(
        0.0,
        ge=0,
        description="the trainer fine-tunes every this many seconds (0: once, on demand)",
    )
    # the promotion gate the trainer runs after each fine-tuning job (mecs promote)
    promote_margin: float = Field(
        0.01,
        gt=-1,
        lt=1,
        description="a candidate is promoted when its mean RMSE over production's is at most "
        "1 - this, on the held-out analyses",
    )
    promote_tolerance: float = Field(
        0.02,
        gt=-1,
        lt=1,
        description="and no field's RMSE ratio is above 1 + this",
    )
    promote_free_run: int = Field(
        200,
        ge=0,
        description="analysis intervals of the candidate's free run, which must stay finite "
        "and bounded (0: no free run)",
    )
    monitor_interval_s: float = Field(
        300.0,
        gt=0,
        description="the monitoring profile's mecs monitor re-scores the service's records "
        "every this many seconds",
    )
    # torchrun of the training jobs (compose runs pretrain, emulator and trainer under it)
    train_processes: int = Field(
        1, ge=1, description="training processes per node (`torchrun --nproc-per-node`)"
    )
    train_nodes: int = Field(1, ge=1, description="nodes of a training job (`torchrun --nnodes`)")
    train_rdzv_endpoint: str = Field(
        "localhost:29400",
        description="where a training job's nodes meet (`torchrun --rdzv-endpoint`, c10d): "
        "the first node's host:port",
    )
    # clients of the service
    service_url: str = Field(
        "http://api:8000", description="URL at which jobs reach the service (forecast job)"
    )
    api_key: SecretStr | None = Field(
        None,
        description="bearer key a client sends (`mecs forecast --service` reads it); "
        "it must be one of the service's keys",
    )
    forecast_steps: int = Field(500, ge=1, description="host steps of the forecast job")
    forecast_members: int = Field(20, ge=1, description="ensemble members of the forecast job")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key(cls, value: Any) -> Any:
        return None if value == "" else value


def env_name(field: str) -> str:
    """The environment variable of a field: ``MECS_<FIELD>``."""
    return f"{ENV_PREFIX}{field.upper()}"


def env_names() -> list[str]:
    """Every variable the model reads, in field order."""
    return [env_name(name) for name in Settings.model_fields]


def _text(value: Any) -> str:
    """A default as an operator would write it in an env file."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) if value else "(none)"
    return str(value)


def default_text(field: str) -> str:
    info = Settings.model_fields[field]
    value = info.get_default(call_default_factory=True)
    return _text(value)


def settings_table(compose_values: Mapping[str, str] | None = None) -> str:
    """The Markdown table of docs/settings.md: variable, default, compose value, meaning.

    ``compose_values`` are the values of ``.env.example`` (what a compose deployment
    uses); without them the compose column is left out.
    """
    head = ["variable", "default"] + (["compose"] if compose_values is not None else [])
    lines = [
        "| " + " | ".join(head + ["meaning"]) + " |",
        "| " + " | ".join(["---"] * (len(head) + 1)) + " |",
    ]
    for name, info in Settings.model_fields.items():
        var = env_name(name)
        default = default_text(name)
        cells = [f"`{var}`", default if default.startswith("(") else f"`{default}`"]
        if compose_values is not None:
            value = compose_values.get(var, "")
            cells.append(f"`{value}`" if value else "(empty)")
        meaning = (info.description or "").replace("|", "\\|")
        lines.append("| " + " | ".join(cells + [meaning]) + " |")
    return "\n".join(lines) + "\n"


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blank lines skipped)."""
    from correction.config_files import read_settings_file

    return {k: str(v) for k, v in read_settings_file(path, "env file").items()}


def check_env_values(values: Mapping[str, str]) -> list[str]:
    """Problems with the ``MECS_*`` entries of an env mapping (empty list: none).

    Unknown ``MECS_*`` names and values the model refuses are problems; names with
    any other prefix (compose's own, ``DEPLOY_*``) are not this model's business.
    """
    known = set(env_names())
    problems = [
        f"{key}: unknown setting (not a field of mecs.settings.Settings)"
        for key in values
        if key.startswith(ENV_PREFIX) and key not in known
    ]
    # validated as the service reads its environment: an empty value is a value
    fields = {
        key[len(ENV_PREFIX) :].lower(): value for key, value in values.items() if key in known
    }
    try:
        Settings.model_validate(fields)
    except ValidationError as err:
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            problems.append(f"{env_name(where) if where else '(model)'}: {e['msg']}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mecs.settings",
        description="Check an env file against the deployment's settings, or print the "
        "settings table.",
    )
    parser.add_argument("--check", metavar="ENV_FILE", help="env file to validate (.env)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table")
    parser.add_argument(
        "--compose-values",
        metavar="ENV_FILE",
        help="with --table: add a column of this file's values",
    )
    args = parser.parse_args(argv)
    if not args.check and not args.table:
        parser.error("nothing to do: pass --check ENV_FILE or --table")
    if args.table:
        values = read_env_file(args.compose_values) if args.compose_values else None
        sys.stdout.write(settings_table(values))
    if args.check:
        path = Path(args.check)
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        problems = check_env_values(read_env_file(path))
        for problem in problems:
            print(f"error: {path}: {problem}", file=sys.stderr)
        if problems:
            return 1
        count = sum(1 for key in read_env_file(path) if key.startswith(ENV_PREFIX))
        print(f"{path}: {count} MECS_* settings, all known and valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
