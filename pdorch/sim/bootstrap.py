"""SGLang bootstrap rendezvous: a prefill and a decode meet by ``(bootstrap_host, bootstrap_port, room)``.

The prefill registers the room and waits until its decode connects; the decode connects and waits until
the prefill has prefilled and pushed the KV. When the prefill runs in this process (its bootstrap server
is one of ours) the decode uses the in-process `Rendezvous` directly; otherwise it talks to the prefill's
bootstrap HTTP server (`/pdorch/sim/connect`, `/pdorch/sim/room`), which fronts the same registry in the
prefill's process. Rooms are kept for a while after they end so a reused room is still refused.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

RoomKey = tuple[str, int, int]
ROOM_RETENTION_S = 120.0  # SGLang's bootstrap entry cleanup interval
CONNECT_PATH = "/pdorch/sim/connect"
ROOM_PATH = "/pdorch/sim/room"


class BootstrapError(Exception):
    """Rendezvous failed; `status` is the HTTP status to report."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Room:
    """State of one bootstrap room."""

    prefill_registered: bool = False
    decode_registered: bool = False
    decode_connected: asyncio.Event = field(default_factory=asyncio.Event)
    prefill_done: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str | None = None
    created: float = field(default_factory=time.monotonic)

    @property
    def status(self) -> str:
        """``failed``, ``done`` or ``pending``."""
        if self.failed is not None:
            return "failed"
        return "done" if self.prefill_done.is_set() else "pending"


class Rendezvous:
    """Rooms of the prefills served by this process."""

    def __init__(self) -> None:
        self.rooms: dict[RoomKey, Room] = {}

    def _room(self, key: RoomKey) -> Room:
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room()
        return room

    def register_prefill(self, key: RoomKey) -> Room:
        """A prefill claims the room; a second prefill with the same room is refused."""
        room = self._room(key)
        if room.prefill_registered:
            raise BootstrapError(f"duplicate bootstrap_room {key[2]} (prefill already registered)", 400)
        room.prefill_registered = True
        return room

    def register_decode(self, key: RoomKey) -> Room:
        """A decode connects to the room; a second decode with the same room is refused."""
        room = self._room(key)
        if room.decode_registered:
            raise BootstrapError(f"duplicate bootstrap_room {key[2]} (decode already connected)", 400)
        room.decode_registered = True
        room.decode_connected.set()
        return room

    def finish(self, key: RoomKey, error: str | None = None) -> None:
        """End a room (KV pushed, or failed) and schedule its removal."""
        room = self.rooms.get(key)
        if room is None:
            return
        if error is not None and not room.prefill_done.is_set():
            room.failed = error
        room.prefill_done.set()
        asyncio.get_running_loop().call_later(ROOM_RETENTION_S, self.rooms.pop, key, None)

    async def wait_prefill(self, key: RoomKey, timeout_s: float) -> None:
        """Decode side: wait until the prefill pushed the KV; raise `BootstrapError` on failure/timeout."""
        room = self._room(key)
        try:
            await asyncio.wait_for(room.prefill_done.wait(), timeout_s)
        except TimeoutError:
            raise BootstrapError(
                f"KVTransferError(bootstrap_room={key[2]}): timed out after {timeout_s}s waiting for KV"
            ) from None
        if room.failed is not None:
            raise BootstrapError(f"KVTransferError(bootstrap_room={key[2]}): {room.failed}")


RENDEZVOUS = Rendezvous()
# (host, port) of the bootstrap servers running in this process; host "0.0.0.0" matches any host.
_LOCAL_SERVERS: set[tuple[str, int]] = set()


def add_local_server(host: str, port: int) -> None:
    """Record a bootstrap server of this process."""
    _LOCAL_SERVERS.add((host, port))


def remove_local_server(host: str, port: int) -> None:
    """Forget a stopped bootstrap server."""
    _LOCAL_SERVERS.discard((host, port))


def is_local(host: str, port: int) -> bool:
    """True if the prefill's bootstrap server for (host, port) runs in this process."""
    return (host, port) in _LOCAL_SERVERS or ("0.0.0.0", port) in _LOCAL_SERVERS


def parse_key(body: dict[str, Any]) -> RoomKey | None:
    """The room key of a request, None if it carries no bootstrap fields; ValueError if malformed."""
    host, port, room = body.get("bootstrap_host"), body.get("bootstrap_port"), body.get("bootstrap_room")
    if host is None and room is None:
        return None
    if not isinstance(host, str) or not host:
        raise ValueError("bootstrap_host must be a non-empty string")
    if isinstance(port, bool) or not isinstance(port, int | None):
        raise ValueError("bootstrap_port must be an integer or null")
    if isinstance(room, bool) or not isinstance(room, int) or room < 0:
        raise ValueError("bootstrap_room must be a non-negative integer")
    host = host.strip("[]")  # IPv6 literals arrive bracketed
    return (host, port if port is not None else 0, room)


async def decode_connect_and_wait(key: RoomKey, timeout_s: float, session: aiohttp.ClientSession) -> None:
    """Decode side of the rendezvous: connect to the room, then wait for the prefill's KV.

    In-process when the prefill's bootstrap server is ours, else over HTTP to that server.
    """
    host, port, room = key
    if is_local(host, port):
        RENDEZVOUS.register_decode(key)
        await RENDEZVOUS.wait_prefill(key, timeout_s)
        return
    base = f"http://{host}:{port}"
    query = {"host": host, "port": str(port), "room": str(room)}
    deadline = time.monotonic() + timeout_s
    try:
        async with session.post(base + CONNECT_PATH, json={"host": host, "port": port, "room": room}) as r:
            if r.status != 200:
                raise BootstrapError(
                    f"bootstrap connect refused: {await r.text()}", 400 if r.status < 500 else 500
                )
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootstrapError(
                    f"KVTransferError(bootstrap_room={room}): timed out after {timeout_s}s waiting for KV"
                )
            params = {**query, "wait": f"{min(left, 5.0):.3f}"}
            async with session.get(base + ROOM_PATH, params=params) as r:
                data = await r.json()
            if data.get("status") == "done":
                return
            if data.get("status") == "failed":
                raise BootstrapError(f"KVTransferError(bootstrap_room={room}): {data.get('error')}")
    except aiohttp.ClientError as exc:
        raise BootstrapError(f"bootstrap server {base} unreachable: {exc}") from exc


def bootstrap_routes(route_info: dict[str, Any]) -> list[web.RouteDef]:
    """Routes of the prefill bootstrap server: SGLang's `/route` and `/health`, plus the sim rendezvous."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def route(_: web.Request) -> web.Response:
        return web.json_response(route_info)

    async def connect(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            key = (str(body["host"]), int(body["port"]), int(body["room"]))
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "expected {host, port, room}"}, status=400)
        try:
            RENDEZVOUS.register_decode(key)
        except BootstrapError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.json_response({"status": "connected"})

    async def room_status(request: web.Request) -> web.Response:
        q = request.query
        try:
            key = (q["host"], int(q["port"]), int(q["room"]))
            wait = min(float(q.get("wait", "0")), 30.0)
        except (KeyError, ValueError):
            return web.json_response({"error": "expected host, port, room"}, status=400)
        room = RENDEZVOUS.rooms.get(key)
        if room is None:
            return web.json_response({"status": "unknown"})
        if wait > 0 and not room.prefill_done.is_set():
            try:
                await asyncio.wait_for(room.prefill_done.wait(), wait)
            except TimeoutError:
                pass
        return web.json_response({"status": room.status, "error": room.failed})

    return [
        web.get("/health", health),
        web.get("/route", route),
        web.post(CONNECT_PATH, connect),
        web.get(ROOM_PATH, room_status),
    ]
