"""The one reader of settings files: JSON, TOML or env (``KEY=VALUE``) by extension.

Every stage's ``--config FILE`` and the service's configuration file go through
:func:`read_settings_file`; each caller then checks the names against its own
settings class, which holds the defaults. Errors name the file and the problem.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any


class SettingsFileError(ValueError):
    """A settings file cannot be read or parsed; the message names the file."""


def read_settings_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A flat mapping of settings from ``path``: ``.json``, ``.toml``, anything else env."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SettingsFileError(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            from dotenv import dotenv_values

            data = {k: ("" if v is None else v) for k, v in dotenv_values(path).items()}
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise SettingsFileError(f"{what} {path} cannot be parsed: {err}") from None
    if not isinstance(data, dict):
        raise SettingsFileError(f"{what} {path} must hold a mapping of settings")
    return data


__all__ = ["SettingsFileError", "read_settings_file"]
