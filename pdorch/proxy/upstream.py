"""The proxy's HTTP/1.1 client for the engine legs: pooled keep-alive connections on asyncio
protocols with httptools' parser.

The hot path of a P/D request is two upstream calls (prefill, then decode), and aiohttp's general
client spends about twice the CPU of a bare protocol on each (bench/proxy/clients.py). This client
does only what the legs need: POST a body, read the status and headers, then the body whole or
chunk by chunk (chunked transfer decoding is the parser's), drop the connection on abort, and reuse
it only after a response was read to the end with keep-alive. Failures are aiohttp exceptions
(`ClientConnectionError`, `ServerTimeoutError`) so the server's error handling stays the same.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import httptools

from pdorch.proxy.deadline import Deadline


class UpstreamTimeout(aiohttp.ServerTimeoutError):
    """The engine sent nothing for longer than the idle timeout."""


class EngineStalled(aiohttp.ClientError):
    """The engine made no progress while this leg waited for its answer (`pdorch.proxy.progress`)."""


class _Headers(dict[str, str]):
    """Response headers with case-insensitive `get` (names are stored lower-cased)."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.key = pool, key
        self.loop = loop  # kept: a loop lookup costs a syscall on Python 3.11 (pdorch.proxy.deadline)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.last_rx = loop.time()  # when bytes last arrived (read by the pool's silence watchdog)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers = _Headers()
        self._name = ""
        self.chunks: collections.deque[bytes] = collections.deque()
        self.done = False
        self.reusable = False
        self.ended_by_close = False  # a body without length or chunking, ended by the close
        self.error: BaseException | None = None
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.waiter: asyncio.Future[None] | None = None  # a reader waiting for body bytes

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - engines never upgrade
            self._fail(aiohttp.ClientPayloadError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(aiohttp.ClientPayloadError(f"invalid HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.done and exc is None and self._close_delimited():
            # HTTP/1.1 lets a response without Content-Length or chunking end at a clean close.
            self.done, self.reusable, self.ended_by_close = True, False, True
            self._wake()
        elif not self.done:
            self._fail(aiohttp.ServerDisconnectedError(str(exc) if exc else None))

    def _close_delimited(self) -> bool:
        """The headers are in and announce neither a length nor chunked encoding."""
        # A head future cancelled with its waiter (a deadline, a client gone) has no exception to ask.
        if not self.head.done() or self.head.cancelled() or self.head.exception() is not None:
            return False
        te = (self.headers.get("transfer-encoding") or "").lower()
        return "content-length" not in self.headers and "chunked" not in te

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        # Read it now: llhttp resets its state once this callback returns.
        self.reusable = self.parser.should_keep_alive()
        self.done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved: nobody may be waiting any more
        self._wake()
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        """Put a request on the wire."""
        assert self.transport is not None
        self.transport.write(data)

    def keep_alive(self) -> bool:
        return self.done and self.reusable and not self.closed and self.error is None


class UpstreamResponse:
    """A response being read; `content` offers `readany()` and `iter_any()` like aiohttp's."""

    def __init__(self, conn: _Connection, idle_timeout: float | None) -> None:
        self._conn = conn
        self._idle = idle_timeout
        self.status = conn.status
        self.headers = conn.headers
        self.content = self
        self._finished = False

    async def readany(self) -> bytes:
        """Every body byte that arrived since the last call (several chunks in one, so the relay
        writes them in one send), or b"" at the end."""
        c = self._conn
        while True:
            if c.chunks:
                if len(c.chunks) == 1:
                    return c.chunks.popleft()
                out = b"".join(c.chunks)
                c.chunks.clear()
                return out
            if c.done:
                return b""
            if c.error is not None:
                raise c.error
            c.waiter = c.loop.create_future()
            if self._idle is None:
                await c.waiter  # no silence limit: skip the timer on the hot path
                continue
            try:
                with Deadline(c.loop, self._idle):
                    await c.waiter
            except TimeoutError:
                c.abort()
                raise UpstreamTimeout(f"no data from the engine for {self._idle}s") from None

    async def iter_any(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive."""
        while chunk := await self.readany():
            yield chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body; past `limit` bytes the connection is dropped and
        `ClientPayloadError` raised (an engine answer must not exhaust the proxy's memory)."""
        parts = []
        size = 0
        while chunk := await self.readany():
            size += len(chunk)
            if limit is not None and size > limit:
                self._conn.abort()
                raise aiohttp.ClientPayloadError(f"engine response body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    @property
    def close_delimited(self) -> bool:
        """The head announces neither a length nor chunking: the body will end at the close."""
        return self._conn._close_delimited()

    @property
    def ended_by_close(self) -> bool:
        """The body ended at the engine's close, with no length or chunking to say it was whole: a
        crashed engine ends its answer the same way, so the reader checks the body itself."""
        return self._conn.ended_by_close

    def watch(self, silence_s: float | None) -> None:
        """Fail this response if the engine then sends nothing for `silence_s` seconds (checked by
        `UpstreamPool.expire_silent`; costs one clock read per arrival, no timer per chunk)."""
        if silence_s is not None:
            self._conn.pool.watched[self._conn] = silence_s

    def close(self) -> None:
        """Done with the response: a fully read one gives its connection back to the pool (as
        aiohttp does at EOF); an unfinished one drops it, which aborts the engine's request."""
        self.release()

    def release(self) -> None:
        """Return the connection to the pool if the response was read to the end, else drop it."""
        if self._finished:
            return
        self._finished = True
        conn = self._conn
        conn.pool.watched.pop(conn, None)
        if conn.keep_alive():
            conn.pool.put_back(conn)
        else:
            conn.abort()


class Sent:
    """A request written to an engine; `response()` waits for its head, `abort()` gives the leg up."""

    __slots__ = ("_data", "_pool", "_resp", "_reused", "conn")

    def __init__(self, pool: UpstreamPool, conn: _Connection, data: bytes, reused: bool) -> None:
        conn.write(data)
        self._pool, self.conn, self._data, self._reused = pool, conn, data, reused
        self._resp: UpstreamResponse | None = None

    async def response(self) -> UpstreamResponse:
        """The response once its status line and headers arrived."""
        try:
            self._resp = await self._pool._head(self.conn)
        except aiohttp.ServerDisconnectedError:
            if not self._reused:
                raise
            # The engine had closed this idle keep-alive connection: send once more on a fresh one.
            self._reused = False
            self.conn = await self._pool._connect(*self.conn.key)
            self.conn.write(self._data)
            self._resp = await self._pool._head(self.conn)
        return self._resp

    def fail(self, exc: BaseException) -> None:
        """Give up waiting for the head: `response()` raises `exc` and the connection is dropped. A
        head that already arrived wins (the answer came; nothing is failed)."""
        if self._resp is None and not self.conn.head.done():
            self.conn._fail(exc)

    def abort(self) -> None:
        """Drop the connection unless the response was already read and handed back to the pool."""
        if self._resp is not None:
            self._resp.close()
        else:
            self.conn.abort()


class UpstreamPool:
    """Idle keep-alive connections per (host, port), for POSTs to the engines."""

    def __init__(self, connect_timeout: float, idle_timeout: float | None = None, max_idle: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}
        self.watched: dict[_Connection, float] = {}  # responses being relayed -> allowed silence

    def expire_silent(self, now: float) -> int:
        """Fail every watched response whose engine has been silent past its limit; returns how many."""
        expired = [(c, limit) for c, limit in self.watched.items() if now - c.last_rx > limit]
        for conn, limit in expired:
            del self.watched[conn]
            conn._fail(UpstreamTimeout(f"no data from the engine for {limit:g}s in the middle of its answer"))
        return len(expired)

    def _target(self, base: str) -> tuple[str, int, bytes]:
        t = self._targets.get(base)
        if t is None:
            u = urlsplit(base)
            host = u.hostname or "127.0.0.1"
            port = u.port or 80
            authority = u.netloc.encode("ascii")
            t = self._targets[base] = (host, port, authority)
        return t

    def put_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle:
            conn.abort()
            return
        conn._reset()
        conn.parser = httptools.HttpResponseParser(conn)
        idle.append(conn)

    async def _connect(self, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, (host, port), loop), host, port
                )
        except TimeoutError:
            raise aiohttp.ClientConnectionError(f"connect to {host}:{port} timed out") from None
        except OSError as exc:
            raise aiohttp.ClientConnectionError(f"cannot connect to {host}:{port}: {exc}") from None
        return conn

    async def send(self, base: str, path: str, body: bytes, headers: dict[str, str]) -> Sent:
        """Write a POST of `body` to `base + path` on a pooled keep-alive connection (or a new one) and
        return without waiting for the answer: with a pooled connection this never suspends, so the
        caller can put several legs on the wire in one loop turn. `Sent.response()` awaits the head."""
        host, port, authority = self._target(base)
        head = [b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", authority, b"\r\n"]
        for k, v in headers.items():
            head += [k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n"]
        head += [b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n"]
        data = b"".join(head) + body
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return Sent(self, conn, data, reused=True)
        return Sent(self, await self._connect(host, port), data, reused=False)

    async def post(self, base: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST `body` to `base + path` and return once the status line and headers arrived."""
        return await (await self.send(base, path, body, headers)).response()

    async def _head(self, conn: _Connection) -> UpstreamResponse:
        try:
            with Deadline(conn.loop, self.idle_timeout):
                await conn.head
        except TimeoutError:
            conn.abort()
            raise UpstreamTimeout(f"no response head from the engine within {self.idle_timeout}s") from None
        except BaseException:
            conn.abort()
            raise
        return UpstreamResponse(conn, self.idle_timeout)

    def retain(self, live: set[tuple[str, int]]) -> None:
        """Drop the idle connections to (host, port)s not in `live`: an endpoint that left discovery
        may come back as another pod on the same IP, and must not be reached over an old connection."""
        for key in [k for k in self._idle if k not in live]:
            for c in self._idle.pop(key):
                c.abort()
        # The parsed-URL cache goes with them (one entry per address a churning fleet ever used).
        self._targets = {base: t for base, t in self._targets.items() if t[:2] in live}

    def close(self) -> None:
        """Drop every idle connection."""
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()
