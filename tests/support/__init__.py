"""Helpers shared by the test modules (importable as ``support``; pytest puts tests/ on the path).

Fixtures stay in ``tests/conftest.py``; what a test calls directly lives here, so no
test imports from ``conftest``.
"""

from .data import BACKENDS, STORE_FORMATS, make_archive, open_store, write_store
from .metrics import metric_value, scrape
from .models import make_l96_model, service_settings
from .processes import ServeProcess

__all__ = [
    "BACKENDS",
    "STORE_FORMATS",
    "ServeProcess",
    "make_archive",
    "make_l96_model",
    "metric_value",
    "open_store",
    "scrape",
    "service_settings",
    "write_store",
]
