"""The proxy's own HTTP/1.1 server (pdorch.proxy.http_server) on loopback, byte by byte.

Raw sockets, so each test controls exactly what a client sends: pipelining, chunked bodies,
``Expect: 100-continue``, HTTP/1.0, malformed and oversized heads, and a client that leaves mid-stream.
Both event loops the proxy can run on are covered.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from pdorch.proxy.http_server import HttpServer, Request, Response, StreamResponse, json_response

pytestmark = pytest.mark.compat

LIMIT = 4096


Server = tuple["App", int, HttpServer]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Each test runs its own loop (asyncio's or uvloop's) instead of pytest-asyncio's shared one."""
    return uvloop.new_event_loop if request.param == "uvloop" else None


class App:
    """Handlers for the tests; records what they saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.written = 0

    async def echo(self, req: Request) -> Response:
        body = await req.read()
        return json_response(
            {"path": req.path, "query": req.query, "len": len(body), "ct": req.headers.get("content-type")}
        )

    async def hello(self, _: Request) -> Response:
        return Response(200, b"hello", {"Content-Type": "text/plain"})

    async def stream(self, req: Request) -> StreamResponse:
        out = req.start_stream(200, {"Content-Type": "text/event-stream"})
        for i in range(3):
            await out.write(f"data: {i}\n\n".encode())
        await out.write_eof()
        return out

    async def flood(self, req: Request) -> StreamResponse:
        """Write 16 MiB; each write waits while the client's buffer is full."""
        out = req.start_stream(200, {"Content-Type": "application/octet-stream"})
        block = b"x" * 65536
        for i in range(256):
            await out.write(block)
            self.written = i + 1
        await out.write_eof()
        return out

    async def hang(self, req: Request) -> StreamResponse:
        out = req.start_stream(200, {"Content-Type": "text/event-stream"})
        await out.write(b"data: first\n\n")
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return out


def error(status: int, message: str) -> Response:
    return json_response({"error": {"message": message, "code": status}}, status=status)


def run(
    loop: Callable[[], asyncio.AbstractEventLoop] | None, case: Callable[[Server], Awaitable[None]]
) -> None:
    """Start a server with the test handlers on ``loop``, run ``case`` against it, close it."""

    async def main() -> None:
        app = App()
        srv = HttpServer(
            {
                ("POST", "/echo"): app.echo,
                ("GET", "/hello"): app.hello,
                ("POST", "/stream"): app.stream,
                ("POST", "/hang"): app.hang,
                ("POST", "/flood"): app.flood,
            },
            max_body_bytes=LIMIT,
            idle_timeout_s=1.0,
            error=error,
        )
        port = await srv.start("127.0.0.1", 0)
        try:
            async with asyncio.timeout(30):
                await case((app, port, srv))
        finally:
            await srv.close(1.0)

    with asyncio.Runner(loop_factory=loop) as runner:
        runner.run(main())


async def talk(port: int, data: bytes, until: Callable[[bytes], bool] | None = None) -> bytes:
    """Send ``data``; read until ``until(received)`` holds or the server closes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    got = b""
    try:
        async with asyncio.timeout(5.0):
            while until is None or not until(got):
                chunk = await r.read(65536)
                if not chunk:
                    break
                got += chunk
    finally:
        w.close()
    return got


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length or chunked responses."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = rest[:n], rest[n:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
            raw = rest
        else:
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_pipelined_requests_are_answered_in_order(
    loop: Callable[[], asyncio.AbstractEventLoop] | None,
) -> None:
    async def case(server: Server) -> None:
        _, port, _ = server
        data = post("/echo?a=1", b"x" * 10) + b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n" + post("/echo", b"yy")
        raw = await talk(port, data, until=lambda b: len(responses_safe(b)) >= 3)
        got = responses(raw)
        assert [s for s, _, _ in got] == [200, 200, 200]
        assert json.loads(got[0][2]) == {"path": "/echo", "query": "a=1", "len": 10, "ct": None}
        assert got[1][2] == b"hello"
        assert json.loads(got[2][2])["len"] == 2

    run(loop, case)


def responses_safe(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    try:
        return responses(raw)
    except (ValueError, IndexError):
        return []


def test_chunked_request_body_and_streamed_response(
    loop: Callable[[], asyncio.AbstractEventLoop] | None,
) -> None:
    async def case(server: Server) -> None:
        _, port, _ = server
        chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
        raw = await talk(port, chunked, until=lambda b: len(responses_safe(b)) >= 1)
        assert json.loads(responses(raw)[0][2])["len"] == 8
        raw = await talk(port, post("/stream", b""), until=lambda b: b.endswith(b"0\r\n\r\n"))
        ((status, headers, body),) = responses(raw)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"

    run(loop, case)


def test_http10_stream_ends_with_close(loop: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
    async def case(server: Server) -> None:
        _, port, _ = server
        raw = await talk(port, b"POST /stream HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"chunked" not in head.lower() and b"connection: close" in head.lower()
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"

    run(loop, case)


def test_expect_continue_and_head(loop: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
    async def case(server: Server) -> None:
        _, port, _ = server
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b"abcd")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        w.close()
        raw = await talk(port, b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and b"Content-Length: 5" in raw and raw.endswith(b"\r\n\r\n")

    run(loop, case)


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, "/nowhere"),
        (b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 405, "POST"),
        (b"NOT A REQUEST\r\n\r\n", 400, "malformed"),
        (b"GET /hello HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431, "larger than"),
        (post("/echo", b"z" * (LIMIT + 1)), 413, "larger than"),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"800\r\n"
            + b"q" * 2048
            + b"\r\n"
            + b"800\r\n"
            + b"q" * 2048
            + b"\r\n5\r\nqqqqq\r\n0\r\n\r\n",
            413,
            "larger than",
        ),
    ],
)
def test_bad_requests_get_json_errors(
    loop: Callable[[], asyncio.AbstractEventLoop] | None, data: bytes, status: int, words: str
) -> None:
    async def case(server: Server) -> None:
        _, port, _ = server
        raw = await talk(port, data, until=lambda b: len(responses_safe(b)) >= 1)
        ((got, headers, body),) = responses(raw)
        assert got == status
        assert headers["content-type"].startswith("application/json")
        assert words in json.loads(body)["error"]["message"]

    run(loop, case)


def test_client_leaving_mid_stream_cancels_the_handler(
    loop: Callable[[], asyncio.AbstractEventLoop] | None,
) -> None:
    async def case(server: Server) -> None:
        app, port, _ = server
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(post("/hang", b""))
        assert b"data: first" in await asyncio.wait_for(r.readuntil(b"data: first\n\n"), 5)
        w.close()
        await asyncio.wait_for(app.cancelled.wait(), 5)

    run(loop, case)


def test_idle_and_slow_heads_are_closed(loop: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
    async def case(server: Server) -> None:
        _, port, _ = server
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed by the idle timer (1 s)
        w.close()

    run(loop, case)


def test_close_lets_in_flight_finish(loop: Callable[[], asyncio.AbstractEventLoop] | None) -> None:
    async def case(server: Server) -> None:
        app, port, srv = server
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(post("/hang", b""))
        await asyncio.wait_for(r.readuntil(b"data: first\n\n"), 5)
        closing = asyncio.create_task(srv.close(5.0))
        await asyncio.sleep(0.2)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
        app.release.set()
        rest = await asyncio.wait_for(r.read(), 5)
        assert rest.endswith(b"0\r\n\r\n")  # the in-flight stream ended properly
        await closing
        assert not app.cancelled.is_set()

    run(loop, case)


def test_a_slow_client_holds_the_writer_back_and_loses_nothing(
    loop: Callable[[], asyncio.AbstractEventLoop] | None,
) -> None:
    async def case(server: Server) -> None:
        app, port, _ = server
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, set before connect
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        r, w = await asyncio.open_connection(sock=sock, limit=1 << 16)
        w.write(post("/flood", b""))
        await asyncio.sleep(0.5)  # not reading: the buffers fill and the writer must wait
        assert 0 < app.written < 256
        head = await r.readuntil(b"\r\n\r\n")
        assert b"chunked" in head
        parts: list[bytes] = []
        tail = b""
        while not tail.endswith(b"0\r\n\r\n"):
            chunk = await r.read(1 << 20)
            assert chunk, "server closed before the end of the body"
            parts.append(chunk)
            tail = (tail + chunk)[-16:]
        body = b"".join(parts)
        w.close()
        ((_, _, data),) = responses(head + body)
        assert data == b"x" * (65536 * 256)

    run(loop, case)
