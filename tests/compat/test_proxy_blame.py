"""Engines that misbehave in ways the breaker and the relay must not get wrong.

Each case was found by a review (2026-12-05) with a reproducer against real processes: the wrong
engine charged for a silent SGLang pair, a decode whose /health passes while its generations fail,
an error event glued to half an SSE event, and engine bodies read without a bound. The fake engines
here are small aiohttp apps on loopback; the rest are the real proxy and simulated engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import openai
import pytest
from aiohttp import web

import pdorch.proxy.server as proxy_server
from pdorch.sim.engine import Role
from pdorch.sim.faults import Faults
from pdorch.sim.server import SimServer
from tests.compat.helpers import sample, serve_app
from tests.compat.test_proxy import FAST, MODEL, WAIT_S, stack, text_of

pytestmark = pytest.mark.compat

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as s:
        yield s


@contextlib.asynccontextmanager
async def fake_engine(generate: Handler) -> AsyncIterator[str]:
    """An engine whose /health and /v1/models answer, and whose generations run `generate`."""

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", generate)
    async with serve_app(app) as url:
        yield url


async def test_a_wedged_sglang_prefill_is_charged_not_the_decode_serving_the_other_prefill(
    http: aiohttp.ClientSession,
) -> None:
    """Two prefills (one accepts and never answers), one decode: the silent pairs are the wedged
    prefill's, because the decode kept serving the other prefill meanwhile. Charging the decode
    opened its breaker after five of them and the proxy answered 503 to everything."""
    wedged = SimServer(
        replace(FAST, protocol="sglang", faults=Faults(roles=frozenset({"prefill"}), hang=True)),
        host="127.0.0.1",
        ports=[0],
        role=Role.PREFILL,
        bootstrap_port=0,
        serve_bootstrap=True,
    )
    await wedged.start()
    bad = f"{wedged.url(0)}#{wedged.bootstrap_port}"
    try:
        async with stack("sglang", extra_prefill=(bad,), first_byte_timeout_s=1.0, policy="round_robin") as s:

            async def one(i: int) -> int:
                body = {"model": MODEL, "prompt": f"q{i}", "max_tokens": 3}
                async with http.post(s.url + "/v1/completions", json=body) as r:
                    return r.status

            statuses = await asyncio.gather(*(one(i) for i in range(10)))
            assert sorted(set(statuses)) == [200, 504], statuses
            text = await text_of(http, s.url)
            timeouts = {"reason": "first_byte_timeout"}
            assert sample(text, "pdorch_proxy_endpoint_errors_total", {**timeouts, "role": "prefill"}) == 5
            assert sample(text, "pdorch_proxy_endpoint_errors_total", {**timeouts, "role": "decode"}) == 0
            assert sample(text, "pdorch_proxy_breaker_state", {"endpoint": s.decode_url}) == 0
            assert sample(text, "pdorch_proxy_breaker_state", {"endpoint": wedged.url(0)}) == 1
            assert await one(99) == 200  # the wedged prefill is out; the pair that works serves
            async with http.get(s.url + "/health") as r:
                assert r.status == 200
    finally:
        await wedged.stop()


async def test_a_decode_whose_health_passes_but_whose_generations_fail_is_cut_off(
    http: aiohttp.ClientSession,
) -> None:
    """Its passing /health used to clear the failure count every 5 s, so the breaker never opened,
    and round robin (moving once per attempt) sent every request's first attempt to it."""
    hits = 0

    async def fail(_: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({"object": "error", "message": "boom"}, status=500)

    async with fake_engine(fail) as bad:
        async with stack("vllm", extra_decode=(bad,), policy="round_robin", health_interval_s=0.2) as s:
            for i in range(30):
                body = {"model": MODEL, "prompt": f"q{i}", "max_tokens": 2}
                async with http.post(s.url + "/v1/completions", json=body) as r:
                    assert r.status == 200  # retried on the working decode
                await asyncio.sleep(0.05)  # several health checks pass in between
            text = await text_of(http, s.url)
        # Five failures open the breaker; after its 10 s cooldown nothing more was sent there.
        assert hits == 5, hits
        assert sample(text, "pdorch_proxy_breaker_state", {"endpoint": bad}) == 1


async def test_a_decode_cut_off_inside_an_event_sends_whole_events_then_the_error_event(
    http: aiohttp.ClientSession,
) -> None:
    """The half event was closed with a blank line and relayed: clients (the openai one included)
    failed to parse it as JSON and never saw the proxy's error event (review helper-72, finding 3)."""

    async def half_then_reset(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices":[{"index":0,"text":"one"}]}\n\n')
        await asyncio.sleep(0.05)
        await out.write(b'data: {"choices":[{"index":0,"te')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return out

    async with fake_engine(half_then_reset) as decode:
        async with stack("vllm", decode=(decode,)) as s:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 5, "stream": True}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                raw = await r.read()
            texts: list[str] = []
            with pytest.raises(openai.APIError, match="decode stream interrupted"):
                stream = await s.client().completions.create(
                    model=MODEL, prompt="hi", max_tokens=5, stream=True
                )
                async for chunk in stream:
                    texts.append(chunk.choices[0].text)
            assert texts == ["one"]
    assert raw.count(b"data: ") == 3  # the half event never reached the client
    *parts, end = [e for e in raw.split(b"\n\n") if e.strip()]
    assert end == b"data: [DONE]"  # after the error event, as vLLM ends its streams
    events = [json.loads(e.removeprefix(b"data: ")) for e in parts]
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["one"]
    assert events[-1]["error"]["code"] == 502 and "interrupted" in events[-1]["error"]["message"]


@pytest.mark.parametrize("status", [200, 500])
async def test_an_endless_prefill_body_is_cut_at_the_cap(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """A prefill answering a body without end (200) or an endless error page (500): the proxy stops
    reading at its cap and answers 502 instead of buffering it (3 GiB took ~6 GB of memory)."""
    monkeypatch.setattr(proxy_server, "MAX_ANSWER_BYTES", 1 << 20)
    monkeypatch.setattr(proxy_server, "MAX_ERROR_BODY_BYTES", 64 << 10)
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        out = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await out.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(256):  # 256 MiB if nobody stops reading
                await out.write(b"x" * (1 << 20))
                sent += 1 << 20
        return out

    async with fake_engine(endless) as prefill:
        async with stack("vllm", prefill=(prefill,), max_retries=0) as s:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                assert r.status == 502
                assert "prefill" in (await r.json())["error"]["message"]
    assert sent < 64 << 20, sent  # the engine could not push it all: the proxy hung up
