"""Errors that become HTTP answers: status, one-line message, optional headers."""

from __future__ import annotations


class ServiceError(Exception):
    """Raised anywhere in a request; answered as ``{"error": message}`` with ``status``.

    The body follows the Open Inference Protocol's error object, so stock clients
    show the message.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
