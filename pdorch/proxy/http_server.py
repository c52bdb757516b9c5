"""A lean HTTP/1.1 server for the proxy's client side: an asyncio `Protocol` and the httptools parser.

Why not aiohttp's server: measured per request on this project's 2-core VM (sequential POSTs, small
JSON answer, server CPU from /proc), aiohttp's web server cost 140-230 us and this shape of server
27-100 us (the lower end on uvloop). The proxy pays that on every request, on the latency path.

What it does, and no more: keep-alive and pipelined requests (answered in order), chunked and
Content-Length request bodies with a size cap, ``Expect: 100-continue``, chunked streaming responses
whose head goes out in the same write as the first chunk, HEAD for GET routes, 404/405/400/431 as
JSON, an idle timer that bounds keep-alive and slow request heads, cancellation of the handler when
the client goes away, write back-pressure, and a graceful close that lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; beyond this: 431
LINGER_S = 2.0  # after an early answer (413, 408), read and drop the rest of the body this long

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class BodyTooLarge(Exception):
    """The request body passed the server's byte limit."""


class BodyMalformed(Exception):
    """The request body broke HTTP framing (a bad chunk size, say); the message says how."""


@dataclass(slots=True)
class Response:
    """A complete response; ``close`` ends the connection after it."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False


def json_response(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON `Response`."""
    h = {"Content-Type": "application/json; charset=utf-8"}
    if headers:
        h.update(headers)
    return Response(status, json.dumps(obj).encode(), h)


def _head(status: int, headers: dict[str, str], extra: bytes) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for k, v in headers.items():
        parts.append(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")))
    parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)


def _encode(r: Response, close: bool, head_only: bool = False) -> bytes:
    """A complete response on the wire: head with Content-Length (and Connection: close), body."""
    extra = b"Content-Length: %d\r\n" % len(r.body)
    if close:
        extra += b"Connection: close\r\n"
    return _head(r.status, r.headers, extra) + (b"" if head_only else r.body)


class Request:
    """One request: method, path (no query), lower-cased headers, and its body via `read()`."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_malformed",
        "_size",
        "_too_large",
        "content_length",
        "expects_continue",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "path",
        "query",
        "stream",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: dict[str, str],
        keep_alive: bool,
        http10: bool,
    ) -> None:
        self.method = method
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        cl = headers.get("content-length")
        self.content_length: int | None = int(cl) if cl is not None and cl.isdigit() else None
        self.keep_alive = keep_alive
        self.http10 = http10
        self._conn = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._malformed: str | None = None
        self._done: asyncio.Future[None] = conn.loop.create_future()
        self.stream: StreamResponse | None = None
        # "Expect: 100-continue" within the body limit: the client waits for a 100 before sending
        # the body, which may only be written once this request is the one being answered.
        self.expects_continue = (
            headers.get("expect", "").lower() == "100-continue"
            and (self.content_length or 0) <= conn.server.max_body_bytes
        )

    def _feed(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._conn.server.max_body_bytes:
            self._too_large = True
            self._chunks.clear()
        elif not self._too_large:
            self._chunks.append(data)

    def _complete(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _broken(self, message: str) -> None:
        """The parser refused the rest of this body: its reader gets `BodyMalformed`."""
        self._malformed = message
        self._complete()

    @property
    def body_complete(self) -> bool:
        """Whether the whole body has arrived."""
        return self._done.done()

    async def read(self) -> bytes:
        """The whole body; raises `BodyTooLarge` past the server's limit, `BodyMalformed` when the
        parser refused it."""
        await self._done
        if self._malformed is not None:
            raise BodyMalformed(self._malformed)
        if self._too_large:
            raise BodyTooLarge
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    def start_stream(self, status: int, headers: dict[str, str]) -> StreamResponse:
        """A streamed (chunked) response; nothing is sent until its first `write`."""
        self.stream = StreamResponse(self._conn, status, headers, self.http10)
        return self.stream


class StreamResponse:
    """A chunked response body. The head is sent with the first chunk, in one write."""

    __slots__ = ("_chunked", "_conn", "_pending_head", "ended", "status")

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str], http10: bool) -> None:
        self.status = status
        self._conn = conn
        # HTTP/1.0 has no chunked encoding: the body then ends when the connection closes.
        self._chunked = not http10
        extra = b"Transfer-Encoding: chunked\r\n" if self._chunked else b"Connection: close\r\n"
        self._pending_head: bytes | None = _head(status, headers, extra)
        self.ended = False

    async def write(self, data: bytes) -> None:
        """Send one chunk; raises ConnectionResetError if the client is gone."""
        if not data:
            return
        out = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data
        if self._pending_head is not None:
            out = self._pending_head + out
            self._pending_head = None
        await self._conn.send(out)

    async def write_eof(self) -> None:
        """End the body (the zero-length chunk)."""
        if self.ended:
            return
        self.ended = True
        out = b"0\r\n\r\n" if self._chunked else b""
        if self._pending_head is not None:
            out = self._pending_head + out
            self._pending_head = None
        if out:
            await self._conn.send(out)
        if not self._chunked:
            self._conn.closing = True


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and runs their handlers one at a time, in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.parsing: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.lingering = False
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._head_too_large = False
        self._idle: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._failed: tuple[int, str] | None = None  # a parser error held until earlier answers are out

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not an isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.server._conns.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the answer is out; the rest of this body is dropped
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            if self._head_too_large:
                self._fail(431, f"request line and headers larger than {MAX_HEAD_BYTES} bytes")
            else:
                self._fail(400, f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        self._cancel_idle()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away: stop its work (and the legs behind it)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client disconnected"))
        self.transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = {}
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = val if old is None else f"{old}, {val}"

    def on_headers_complete(self) -> None:
        self._cancel_idle()
        p = self.parser
        req = Request(
            self,
            p.get_method().decode("ascii", "replace"),
            self._url.decode("latin-1"),
            self._headers,
            p.should_keep_alive(),
            p.get_http_version() == "1.0",
        )
        self.parsing = req
        self.queue.append(req)
        if self.task is None:
            self._next()

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing._feed(body)

    def on_message_complete(self) -> None:
        if self.parsing is not None:
            self.parsing._complete()
            self.parsing = None

    # -- requests ----------------------------------------------------------------------------------

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise httptools.HttpParserError(f"request head larger than {MAX_HEAD_BYTES} bytes")

    def _next(self) -> None:
        if self.queue and not self.closing:
            req = self.queue.popleft()
            if req.expects_continue and not req.body_complete:
                # Only now: written while an earlier pipelined answer streams, it would land
                # inside that answer's body.
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.task = self.loop.create_task(self._run(req))
            return
        self.task = None
        if self._failed is not None:  # the requests before a malformed one are answered: now it
            status, message = self._failed
            self._write(_encode(self.server.error(status, message), close=True))
            self._end()

    async def _run(self, req: Request) -> None:
        try:
            try:
                out = await self.server.dispatch(req)
            except BodyTooLarge:
                out = self.server.error(413, f"request body larger than {self.server.max_body_bytes} bytes")
            if isinstance(out, StreamResponse):
                await out.write_eof()
                if out.status >= 400 and not req.body_complete:
                    self.closing = True
            else:
                await self._respond(req, out)
            if not req.keep_alive or self.closing or not req.body_complete:
                self._end()
                return
        except asyncio.CancelledError:
            return  # the client left (connection_lost) or the server is closing
        except ConnectionError:
            self._abort()
            return
        except Exception:  # a handler bug: answer 500 if nothing was sent yet, and drop the connection
            log.exception("unhandled error serving %s %s", req.method, req.path)
            if req.stream is None or req.stream._pending_head is not None:
                with contextlib.suppress(ConnectionError):
                    await self._respond(req, self.server.error(500, "internal proxy error"))
            self._end()
            return
        self._next()
        if self.task is None:
            self._arm_idle()

    async def _respond(self, req: Request, r: Response) -> None:
        close = r.close or not req.keep_alive or self.closing or not req.body_complete
        if close:
            self.closing = True
        await self.send(_encode(r, close, head_only=req.method == "HEAD"))

    async def send(self, data: bytes) -> None:
        """Write with back-pressure; ConnectionResetError once the client is gone."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("client disconnected")
        self.transport.write(data)
        if self._paused:
            self._drain = self.loop.create_future()
            await self._drain

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, status: int, message: str) -> None:
        """Answer a request the parser refused, then close.

        Complete requests that came before it on this connection (pipelined, or in the same
        packet) are answered first: the error is written once they are done (`_next`)."""
        if self.parsing is None and (self.task is not None or self.queue):
            if self._failed is None:
                self._failed = (status, message)
            self.lingering = True  # the rest of the input cannot be parsed: drop it
            return
        self.closing = True
        if self.parsing is not None and self.task is not None:
            # Mid-body of a request whose handler runs: it reads the failure and answers it (a 400
            # saying what broke), instead of waiting for a body that never ends.
            self.parsing._broken(message)
        if self.task is None:
            self._write(_encode(self.server.error(status, message), close=True))
        self._end()

    def _end(self) -> None:
        """Close after the answer; if the client is still sending a body, read and drop it a while
        first, so closing does not reset the connection before the client reads the answer."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self.closing = True
        if self.parsing is None:
            t.close()
            return
        self.lingering = True
        self.loop.call_later(LINGER_S, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- idle timer --------------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self._idle = self.loop.call_later(self.server.idle_timeout_s, self._on_idle)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        # No complete request head in time: an idle keep-alive or a slow (slowloris) client.
        if self.task is None:
            self._abort()


class HttpServer:
    """Routes ``(method, path)`` to handlers over `_Connection`s; `start`, then `close`."""

    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        *,
        max_body_bytes: int,
        idle_timeout_s: float,
        error: Callable[[int, str], Response],
    ) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.error = error
        self._paths = {p for _, p in routes}
        self._conns: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def dispatch(self, req: Request) -> Response | StreamResponse:
        """Find the route (HEAD uses the GET route); 404 for an unknown path, 405 for a wrong method."""
        method = "GET" if req.method == "HEAD" else req.method
        handler = self.routes.get((method, req.path))
        if handler is not None:
            return await handler(req)
        if req.path not in self._paths:
            return self.error(404, f"no route for {req.path}")
        allowed = sorted({m for m, p in self.routes if p == req.path})
        r = self.error(405, f"method {req.method} not allowed on {req.path}; use {', '.join(allowed)}")
        r.headers["Allow"] = ", ".join(allowed)
        return r

    async def start(self, host: str, port: int) -> int:
        """Bind and listen; returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        """Close the listening socket (connections already accepted go on until `close`)."""
        if self._server is not None:
            self._server.close()

    async def close(
        self, grace_s: float, on_expiry: Callable[[], None] | None = None, cancel_wait_s: float = 1.0
    ) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish up to ``grace_s``.

        Handlers still running then are cancelled, after ``on_expiry`` (which may tell them to end
        their answers with an error), and get ``cancel_wait_s`` to write it before their
        connections are closed."""
        self.stop_accepting()
        busy: list[asyncio.Task[None]] = []
        for c in list(self._conns):
            c.closing = True
            if c.task is None:
                c._abort()
            else:
                busy.append(c.task)
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace_s)
            if pending and on_expiry is not None:
                on_expiry()
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=cancel_wait_s)
        for c in list(self._conns):
            c._abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
