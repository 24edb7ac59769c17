"""Helpers shared by the test modules (importable as ``support``; pytest puts tests/ on the path).

Fixtures stay in ``tests/conftest.py``; what a test calls directly lives here, so no
test imports from ``conftest``.
"""

from .balancer import NginxProcess, nginx_binary
from .batching import FakeCompute, make_batcher
from .data import BACKENDS, STORE_FORMATS, make_archive, open_store, write_store
from .metrics import metric_value, scrape
from .models import make_l96_model, service_settings
from .native import NativeBuild, build_native, missing_tools, mpi_env
from .processes import ServeProcess
from .tls import self_signed

__all__ = [
    "BACKENDS",
    "FakeCompute",
    "NativeBuild",
    "NginxProcess",
    "STORE_FORMATS",
    "build_native",
    "ServeProcess",
    "make_archive",
    "make_batcher",
    "make_l96_model",
    "metric_value",
    "missing_tools",
    "mpi_env",
    "nginx_binary",
    "open_store",
    "scrape",
    "self_signed",
    "service_settings",
    "write_store",
]
