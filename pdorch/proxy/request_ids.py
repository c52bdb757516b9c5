"""Request ids for requests that arrive without ``X-Request-Id``."""

from __future__ import annotations

import secrets


class RequestIds:
    """32 hex characters, like a uuid4's hex: a random 64-bit prefix drawn once per process, then a
    counter. Unique within the process by construction and across replicas as two random 64-bit
    draws; unlike `uuid.uuid4()` no system call per request (`getrandom` costs tens of microseconds
    when the process's caches are cold between requests)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._n = 0

    def next(self) -> str:
        """A fresh id."""
        self._n += 1
        return f"{self._prefix}{self._n:016x}"
