"""Injected engine faults (pure config): answer with an error status, hang, or stall mid-stream.

They exist to test what sits in front of the engines (the proxy's retries, timeouts and error events)
against an engine that misbehaves in a controlled way. Faults apply to generation requests
(/v1/completions, /v1/chat/completions) of engines whose role is in ``roles``; health, models and
metrics keep answering, as a wedged real engine often still does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/generate"})
# Request key read by `generation`: stop answering after this many tokens were produced.
STALL_KEY = web.RequestKey("pdorch_sim_stall_after_tokens", int)


@dataclass(frozen=True)
class Faults:
    """Which fault to inject and on which roles (empty ``roles`` = every role)."""

    roles: frozenset[str] = frozenset()
    status: int | None = None  # answer every generation request with this HTTP status
    hang: bool = False  # accept generation requests and never answer (headers included)
    stall_after_tokens: int | None = None  # stream this many tokens, then go silent for good

    @property
    def active(self) -> bool:
        """Any fault configured."""
        return self.status is not None or self.hang or self.stall_after_tokens is not None

    def applies(self, role: str) -> bool:
        """Whether an engine of ``role`` misbehaves."""
        return self.active and (not self.roles or role in self.roles)


def validate_faults(f: Faults) -> None:
    """Raise ValueError naming the bad setting."""
    if f.status is not None and not 400 <= f.status <= 599:
        raise ValueError(f"--fault-status must be an HTTP error status (400-599), got {f.status}")
    if f.stall_after_tokens is not None and f.stall_after_tokens < 0:
        raise ValueError(f"--fault-stall-after must be >= 0, got {f.stall_after_tokens}")
    bad = sorted(f.roles - {"prefill", "decode", "both"})
    if bad:
        raise ValueError(f"--fault-roles: unknown role(s) {bad}; use prefill, decode, both")


async def stall_forever() -> None:
    """Block until cancelled (the client or the server going away)."""
    await asyncio.Event().wait()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(
    faults: Faults, role_of: Callable[[web.Request], str]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware applying ``faults`` to generation requests of matching engines."""

    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method != "POST"
            or request.path not in GENERATION_PATHS
            or not faults.applies(role_of(request))
        ):
            return await handler(request)
        if faults.status is not None:
            msg = f"injected fault: HTTP {faults.status}"
            return web.json_response(
                {"object": "error", "message": msg, "type": "InjectedFault", "code": faults.status},
                status=faults.status,
            )
        if faults.hang:
            await request.read()
            await stall_forever()
        if faults.stall_after_tokens is not None:
            request[STALL_KEY] = faults.stall_after_tokens
        return await handler(request)

    return inject
