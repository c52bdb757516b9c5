"""SGLang bootstrap rendezvous: a prefill and a decode meet by ``(bootstrap_host, bootstrap_port, room)``.

The prefill registers the room and waits until its decode connects; the decode connects and waits until
the prefill has prefilled and pushed the KV. When the prefill runs in this process (its bootstrap server
is one of ours) the decode uses the in-process `Rendezvous` directly. Otherwise it keeps one WebSocket
per prefill bootstrap server (`/pdorch/sim/rendezvous`) and exchanges two messages per request over it:
"connect to room R", then "room R done" (or failed). That is the shape of SGLang's own per-request
traffic, ZMQ messages between long-lived transfer agents rather than an HTTP call per request, and it
keeps the sims' CPU per request low enough not to crowd a front being benchmarked on the same cores.
Rooms are kept for a while after they end so a reused room is still refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

RoomKey = tuple[str, int, int]
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default
ROOM_RETENTION_S = 120.0  # SGLang's bootstrap entry cleanup interval
# A room a remote decode (over the WebSocket rendezvous) opened that no prefill ever claimed (its
# prefill failed upstream, or never came) is forgotten this long after the decode's own wait ends, or
# after this long at least. An in-process decode drops such a room itself when its wait ends.
UNCLAIMED_ROOM_S = 600.0
RENDEZVOUS_PATH = "/pdorch/sim/rendezvous"


class BootstrapError(Exception):
    """Rendezvous failed; `status` is the HTTP status to report."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


def transfer_error(room: int, detail: str) -> BootstrapError:
    """A decode's failed wait for the KV, worded as SGLang reports it."""
    return BootstrapError(f"KVTransferError(bootstrap_room={room}): {detail}")


def _kv_timeout(room: int, timeout_s: float) -> BootstrapError:
    return transfer_error(room, f"timed out after {timeout_s}s waiting for KV")


# What an ended room's events become: set for good and shared, so a room kept for the duplicate check
# is small (at 400 req/s a sim keeps ~50k of them, and every full garbage collection scans them all).
# Nothing waits on or clears an ended room's events.
_SET_FOR_GOOD = asyncio.Event()
_SET_FOR_GOOD.set()


@dataclass(slots=True, eq=False)
class Room:
    """State of one bootstrap room."""

    prefill_registered: bool = False
    decode_registered: bool = False
    decode_connected: asyncio.Event = field(default_factory=asyncio.Event)
    prefill_done: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str | None = None
    # When a room no prefill claimed may be forgotten (remote decodes only; see UNCLAIMED_ROOM_S).
    unclaimed_until: float = 0.0
    # Called once when the room ends (the WebSocket rendezvous answers a remote decode from here).
    listeners: list[Callable[[Room], None]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``failed``, ``done`` or ``pending``."""
        if self.failed is not None:
            return "failed"
        return "done" if self.prefill_done.is_set() else "pending"


# The one room every successful rendezvous becomes once it ended (both sides registered, KV pushed):
# the dict keeps this shared object for the duplicate check instead of a room per request, so the
# ~50k rooms kept at 400 req/s add nothing for the garbage collector to scan. Nothing mutates it:
# both registrations refuse it as a duplicate and `finish` ignores it.
_ENDED = Room(
    prefill_registered=True,
    decode_registered=True,
    decode_connected=_SET_FOR_GOOD,
    prefill_done=_SET_FOR_GOOD,
    listeners=[],
)


class Rendezvous:
    """Rooms of the prefills served by this process."""

    def __init__(self) -> None:
        self.rooms: dict[RoomKey, Room] = {}
        # (forget at, room) in the order rooms ended: one sweep per ended room instead of a timer each.
        self._expiry: deque[tuple[float, RoomKey]] = deque()
        # Heap of (forget at, room) for rooms a remote decode opened before any prefill claimed them.
        self._unclaimed: list[tuple[float, RoomKey]] = []

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

    def register_decode(self, key: RoomKey, remote_wait_s: float | None = None) -> Room:
        """A decode connects to the room; a second decode with the same room is refused.

        `remote_wait_s`: the decode waits elsewhere (WebSocket rendezvous) this long at most, so if no
        prefill claims the room it is forgotten after that wait (at least `UNCLAIMED_ROOM_S`).
        """
        room = self._room(key)
        if room.decode_registered:
            raise BootstrapError(f"duplicate bootstrap_room {key[2]} (decode already connected)", 400)
        room.decode_registered = True
        room.decode_connected.set()
        now = time.monotonic()
        if remote_wait_s is not None and not room.prefill_registered:
            # At most an hour, whatever a client asks for.
            room.unclaimed_until = now + min(max(UNCLAIMED_ROOM_S, remote_wait_s + 60.0), 3600.0)
            heapq.heappush(self._unclaimed, (room.unclaimed_until, key))
        self._sweep(now)
        return room

    def _drop_unclaimed(self, key: RoomKey, room: Room) -> None:
        """Forget `room` if it is still the one under `key` and no prefill claimed it."""
        if self.rooms.get(key) is room and not room.prefill_registered:
            del self.rooms[key]

    def finish(self, key: RoomKey, error: str | None = None) -> None:
        """End a room (KV pushed, or failed); it is forgotten `ROOM_RETENTION_S` later."""
        room = self.rooms.get(key)
        if room is None or room.prefill_done is _SET_FOR_GOOD:  # unknown, or already ended
            return
        if error is not None:
            room.failed = error
        room.prefill_done.set()
        listeners, room.listeners = room.listeners, []
        for listener in listeners:
            listener(room)
        # Waiters were woken by the set(). A decode that has not connected yet keeps its own event: a
        # prefill may still be waiting on it.
        room.prefill_done = _SET_FOR_GOOD
        if room.decode_connected.is_set():
            room.decode_connected = _SET_FOR_GOOD
        if room.failed is None and room.prefill_registered and room.decode_registered:
            self.rooms[key] = _ENDED  # holders of `room` still see it ended; the dict drops it
        now = time.monotonic()
        self._expiry.append((now + ROOM_RETENTION_S, key))
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget ended rooms past their retention, and rooms still unclaimed by a prefill past theirs."""
        while self._expiry and self._expiry[0][0] <= now:
            self.rooms.pop(self._expiry.popleft()[1], None)
        while self._unclaimed and self._unclaimed[0][0] <= now:
            key = heapq.heappop(self._unclaimed)[1]
            room = self.rooms.get(key)
            # A claimed room is forgotten by `finish`. A room opened again under a reused key after this
            # entry's room was forgotten has a later deadline of its own and stays.
            if room is not None and room.unclaimed_until <= now:
                self._drop_unclaimed(key, room)

    async def wait_prefill(self, key: RoomKey, timeout_s: float) -> None:
        """Decode side: wait until the prefill pushed the KV; raise `BootstrapError` on failure/timeout."""
        room = self._room(key)
        try:
            await asyncio.wait_for(room.prefill_done.wait(), timeout_s)
        except TimeoutError:
            self._drop_unclaimed(key, room)  # no prefill came; a late one opens a room of its own
            raise _kv_timeout(key[2], timeout_s) from None
        except asyncio.CancelledError:
            self._drop_unclaimed(key, room)
            raise
        if room.failed is not None:
            raise transfer_error(key[2], room.failed)


RENDEZVOUS = Rendezvous()
# (host, port) of the bootstrap servers running in this process; host "0.0.0.0" matches any host.
# Counted: a draining engine's server and its successor's share an address (a replaced dev-cluster
# pod's IP), and the first one to stop must not forget the other.
_LOCAL_SERVERS: Counter[tuple[str, int]] = Counter()


def add_local_server(host: str, port: int) -> None:
    """Record a bootstrap server of this process."""
    _LOCAL_SERVERS[(host, port)] += 1


def remove_local_server(host: str, port: int) -> None:
    """Forget a stopped bootstrap server."""
    _LOCAL_SERVERS[(host, port)] -= 1
    if _LOCAL_SERVERS[(host, port)] <= 0:
        del _LOCAL_SERVERS[(host, port)]


def is_local(host: str, port: int) -> bool:
    """True if the prefill's bootstrap server for (host, port) runs in this process."""
    return (host, port) in _LOCAL_SERVERS or ("0.0.0.0", port) in _LOCAL_SERVERS


def parse_key(body: dict[str, Any], default_port: int = DEFAULT_BOOTSTRAP_PORT) -> RoomKey | None:
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
    # A prefill registered without a bootstrap port (sglang-router's `--prefill URL none`) sends
    # null: SGLang then uses the server's own disaggregation bootstrap port.
    return (host, port if port is not None else default_port, room)


class _Outbox:
    """Lines queued for one WebSocket, sent by a single task (aiohttp allows one sender at a time);
    lines queued while a send is in flight go out together in the next frame."""

    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.lines: list[str] = []
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def send(self, message: dict[str, Any]) -> None:
        self.lines.append(json.dumps(message, separators=(",", ":")))
        self.wake.set()

    async def _run(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await self.wake.wait()
                self.wake.clear()
                lines, self.lines = self.lines, []
                await self.ws.send_str("\n".join(lines))

    def close(self) -> None:
        self.task.cancel()


def _room_message(key: RoomKey, status: str, error: str | None = None, code: int = 200) -> dict[str, Any]:
    return {"host": key[0], "port": key[1], "room": key[2], "status": status, "error": error, "code": code}


class _Channel:
    """The decode side of one WebSocket to a prefill's bootstrap server."""

    def __init__(self, base: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.base = base
        self.ws = ws
        self.pending: dict[RoomKey, asyncio.Future[dict[str, Any]]] = {}
        self.closed = False
        self.outbox = _Outbox(ws)
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                for line in msg.data.splitlines():
                    d = json.loads(line)
                    fut = self.pending.pop((d.get("host"), d.get("port"), d.get("room")), None)
                    if fut is not None and not fut.done():
                        fut.set_result(d)
        finally:
            self.closed = True
            self.outbox.close()
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(BootstrapError(f"bootstrap server {self.base} closed the rendezvous"))
            self.pending.clear()

    async def connect_and_wait(self, key: RoomKey, wait_s: float) -> None:
        if key in self.pending:
            raise BootstrapError(f"duplicate bootstrap_room {key[2]} (decode already connected)", 400)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        try:
            # wait_s: how long the server should keep the room if no prefill claims it.
            self.outbox.send({"host": key[0], "port": key[1], "room": key[2], "wait_s": wait_s})
            d = await fut
        finally:
            self.pending.pop(key, None)
        if d["status"] == "refused":
            raise BootstrapError(f"bootstrap connect refused: {d['error']}", 400 if d["code"] < 500 else 500)
        if d["status"] == "failed":
            raise transfer_error(key[2], d["error"])

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


class RendezvousClient:
    """A decode process's WebSockets to the prefills' bootstrap servers, opened on first use."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._channels: dict[str, _Channel] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def _channel(self, base: str) -> _Channel:
        ch = self._channels.get(base)
        if ch is not None and not ch.closed:
            return ch
        async with self._opening.setdefault(base, asyncio.Lock()):
            ch = self._channels.get(base)
            if ch is not None and not ch.closed:
                return ch
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
                )
            ws = await self._session.ws_connect(base + RENDEZVOUS_PATH, autoping=True)
            ch = self._channels[base] = _Channel(base, ws)
            return ch

    async def connect_and_wait(self, key: RoomKey, timeout_s: float) -> None:
        """Connect to the room on its prefill's bootstrap server, then wait for the KV; raise
        `BootstrapError` on refusal, failure, timeout or an unreachable server."""
        host, port, room = key
        base = f"http://{host}:{port}"
        try:
            async with asyncio.timeout(timeout_s):
                await (await self._channel(base)).connect_and_wait(key, timeout_s)
        except TimeoutError:
            raise _kv_timeout(room, timeout_s) from None
        except aiohttp.ClientError as exc:
            raise BootstrapError(f"bootstrap server {base} unreachable: {exc}") from exc

    async def close(self) -> None:
        """Close every channel and the session."""
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await ch.close()
        self._channels.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None


async def decode_connect_and_wait(key: RoomKey, timeout_s: float, client: RendezvousClient) -> None:
    """Decode side of the rendezvous: connect to the room, then wait for the prefill's KV.

    In-process when the prefill's bootstrap server is ours, else over the WebSocket to that server.
    """
    if is_local(key[0], key[1]):
        RENDEZVOUS.register_decode(key)
        await RENDEZVOUS.wait_prefill(key, timeout_s)
        return
    await client.connect_and_wait(key, timeout_s)


def bootstrap_routes(route_info: dict[str, Any]) -> list[web.RouteDef]:
    """Routes of the prefill bootstrap server: SGLang's `/route` and `/health`, plus the sim rendezvous."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def route(_: web.Request) -> web.Response:
        return web.json_response(route_info)

    def on_connect(out: _Outbox, line: str) -> None:
        try:
            d = json.loads(line)
            key = (str(d["host"]), int(d["port"]), int(d["room"]))
            wait_s = float(d.get("wait_s", 0.0))
        except (ValueError, KeyError, TypeError):
            out.send({"status": "invalid", "error": f"expected {{host, port, room}}, got {line[:100]!r}"})
            return
        try:
            room = RENDEZVOUS.register_decode(key, remote_wait_s=wait_s)
        except BootstrapError as exc:
            out.send(_room_message(key, "refused", str(exc), exc.status))
            return
        if room.prefill_done.is_set():
            out.send(_room_message(key, room.status, room.failed))
        else:
            room.listeners.append(lambda r: out.send(_room_message(key, r.status, r.failed)))

    async def rendezvous(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        out = _Outbox(ws)
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    for line in msg.data.splitlines():
                        on_connect(out, line)
        finally:
            out.close()
        return ws

    return [
        web.get("/health", health),
        web.get("/route", route),
        web.get(RENDEZVOUS_PATH, rendezvous),
    ]
