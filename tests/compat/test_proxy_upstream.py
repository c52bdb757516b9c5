"""The proxy's engine-leg HTTP client against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from pdorch.devcluster.process import free_port
from pdorch.proxy.upstream import EngineStalled, UpstreamPool, UpstreamTimeout
from tests.compat.helpers import refused_url

pytestmark = pytest.mark.compat


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[str]]]:
    peers: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        peers.append(str(request.transport.get_extra_info("peername")))
        return web.json_response({"got": (await request.read()).decode(), "ct": request.content_type})

    async def stream(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(3):
            await out.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        await out.write_eof()
        return out

    async def stall(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        await out.write(b"first")
        await asyncio.sleep(3)
        return out

    async def fail(_: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=503)

    app = web.Application()
    app.add_routes(
        [
            web.post("/echo", echo),
            web.post("/stream", stream),
            web.post("/stall", stall),
            web.post("/fail", fail),
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", peers
    finally:
        await runner.cleanup()


async def test_post_reads_the_whole_body_and_reuses_the_connection(server: tuple[str, list[str]]) -> None:
    base, peers = server
    pool = UpstreamPool(connect_timeout=2)
    for i in range(3):
        r = await pool.post(base, "/echo", f"body {i}".encode(), {"Content-Type": "application/json"})
        assert r.status == 200 and r.headers.get("Content-Type") == "application/json; charset=utf-8"
        assert (await r.read()) == f'{{"got": "body {i}", "ct": "application/json"}}'.encode()
        if i % 2:
            r.release()
        else:
            r.close()  # after a full read, close() keeps the connection too (as aiohttp's does)
    assert len(set(peers)) == 1  # one kept-alive connection served all three
    pool.close()


async def test_retain_drops_idle_connections_to_endpoints_that_left(server: tuple[str, list[str]]) -> None:
    base, peers = server
    pool = UpstreamPool(connect_timeout=2)
    (await pool.post(base, "/echo", b"a", {})).close()
    port = int(base.rsplit(":", 1)[1])
    pool.retain({("127.0.0.1", port)})
    (await pool.post(base, "/echo", b"b", {})).close()
    assert len(set(peers)) == 1  # still listed: its idle connection was kept and reused
    pool.retain(set())
    (await pool.post(base, "/echo", b"c", {})).close()
    assert len(set(peers)) == 2  # gone from discovery: a fresh connection
    pool.retain(set())
    assert pool._targets == {}  # nor is its parsed URL kept (one per address ever used, before)
    pool.close()


async def test_chunked_stream_arrives_chunk_by_chunk(server: tuple[str, list[str]]) -> None:
    base, _ = server
    pool = UpstreamPool(connect_timeout=2)
    r = await pool.post(base, "/stream", b"{}", {})
    chunks = [c async for c in r.content.iter_any()]
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert len(chunks) >= 2  # relayed as they came, not buffered to the end
    r.release()
    pool.close()


async def test_error_status_is_returned_not_raised(server: tuple[str, list[str]]) -> None:
    base, _ = server
    pool = UpstreamPool(connect_timeout=2)
    r = await pool.post(base, "/fail", b"{}", {})
    assert r.status == 503 and b"boom" in await r.read()
    r.release()
    pool.close()


async def test_idle_timeout_and_abort(server: tuple[str, list[str]]) -> None:
    base, _ = server
    pool = UpstreamPool(connect_timeout=2, idle_timeout=0.3)
    r = await pool.post(base, "/stall", b"{}", {})
    assert await r.content.readany() == b"first"
    with pytest.raises(UpstreamTimeout):
        await r.content.readany()
    r.release()  # a timed-out connection is never reused
    ok = await pool.post(base, "/echo", b"x", {})
    assert ok.status == 200
    ok.release()
    pool.close()


async def test_failing_a_wait_raises_unless_the_head_already_came(server: tuple[str, list[str]]) -> None:
    """`Sent.fail` (the progress check giving up on an engine) fails a wait still without a head; a
    head that arrived first wins, even before the waiting task has resumed."""
    base, _ = server
    pool = UpstreamPool(connect_timeout=2)
    sent = await pool.send(base, "/stream", b"{}", {})
    await asyncio.wait({sent.conn.head})  # the head is in; the stream's chunks follow 10 ms apart
    sent.fail(EngineStalled("too late"))
    r = await sent.response()
    body = b"".join([chunk async for chunk in r.content.iter_any()])
    assert r.status == 200 and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    r.release()
    never = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)  # accepts, never answers
    port = never.sockets[0].getsockname()[1]
    sent = await pool.send(f"http://127.0.0.1:{port}", "/v1/completions", b"{}", {})
    asyncio.get_running_loop().call_later(0.05, sent.fail, EngineStalled("counters stood still"))
    with pytest.raises(EngineStalled, match="counters stood still"):
        await sent.response()
    never.close()
    pool.close()


async def test_refused_connection_is_a_client_connection_error() -> None:
    pool = UpstreamPool(connect_timeout=2)
    with refused_url() as closed, pytest.raises(aiohttp.ClientConnectionError):
        await pool.post(closed, "/echo", b"{}", {})
