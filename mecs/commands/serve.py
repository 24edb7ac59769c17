"""``mecs serve``: the correction service over a model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from mecs.cli import UsageError


def run(args: argparse.Namespace) -> int:
    import logging

    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings(
            args.config,
            repository=args.repository,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
        )
        if settings.repository is None:
            raise SettingsError("no model repository: pass --repository DIR or set MECS_REPOSITORY")
        if not Path(settings.repository).is_dir():
            raise SettingsError(f"model repository {settings.repository} is not a directory")
        from service.app import create_app

        app = create_app(settings)
    except SettingsError as err:
        raise UsageError(f"mecs serve: {err}") from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    from service.server import serve

    def ready(url: str) -> None:
        print(
            f"serve: models from {Path(settings.repository).resolve()} on {url} "
            f"(docs: {url}/docs, metrics: {url}/metrics)",
            flush=True,
        )

    serve(settings, on_ready=ready, app=app)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="start the HTTP correction service over a model repository",
        description="Serve every model under --repository over the Open Inference Protocol. "
        "Other settings come from MECS_* environment variables or --config (see README).",
    )
    p.add_argument("--repository", help="model repository (name/version/ directories)")
    p.add_argument("--host", default=None, help="interface (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000; 0: any)")
    p.add_argument("--config", help="settings file: JSON, TOML or KEY=VALUE env file")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)
