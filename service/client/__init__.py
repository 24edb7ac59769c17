"""The Python client of the correction service (numpy and the standard library only).

``transport`` holds the HTTP connection, ``degradation`` the breaker and the
``raise``/``zero``/``last`` policies, ``client`` the protocol calls, ``shm`` the
shared-memory regions of a caller on the server's host.
"""

from __future__ import annotations

from .client import CorrectionClient, InferResult
from .degradation import POLICIES, Policy
from .shm import SharedMemoryRegion
from .transport import (
    TRANSPORTS,
    HttpClientTransport,
    NotTheProtocol,
    RequestRejected,
    ServiceError,
    ServiceUnavailable,
    SocketTransport,
    TLSFailure,
    make_transport,
)

__all__ = [
    "POLICIES",
    "TRANSPORTS",
    "CorrectionClient",
    "HttpClientTransport",
    "InferResult",
    "NotTheProtocol",
    "Policy",
    "RequestRejected",
    "ServiceError",
    "ServiceUnavailable",
    "SharedMemoryRegion",
    "SocketTransport",
    "TLSFailure",
    "make_transport",
]
