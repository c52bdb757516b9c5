"""The proxy's prefill queue (router.prefillQueue) in front of simulated engines on loopback.

A burst of long prompts followed by short ones, on one prefill engine that batches FCFS: without
the queue the short prompts wait behind every long one already in the engine's queue; with it the
long ones beyond the cap wait in the proxy and the short ones, which can still make the TTFT
target, go first. The assertions are about order (which answers came back before which), not
about how long anything took.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from tests.compat.helpers import sample, serve_app, wait_until
from tests.compat.test_proxy import FAST, MODEL, WAIT_S, stack

pytestmark = pytest.mark.compat

LONG = " ".join(["abc"] * 4000)  # 4000 tokens for the sim and for the proxy's estimate (chars / 4)
SHORT = " ".join(["abc"] * 40)
# A batch of two long prompts takes ~0.7 s on the sim's H100 model at this scale.
SLOW = replace(FAST, time_scale=5.0)


async def _complete(http: aiohttp.ClientSession, url: str, prompt: str, done: list[tuple[float, str]]) -> int:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    async with http.post(url + "/v1/completions", json=body) as resp:
        await resp.read()
        done.append((time.monotonic(), "long" if prompt is LONG else "short"))
        return resp.status


async def _metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as resp:
        return await resp.text()


async def _burst(queue_tokens: int | None, **proxy: object) -> tuple[list[str], str]:
    """6 long prompts, then (once they are all held somewhere) 12 short ones; the finishing order."""
    extra = (
        {} if queue_tokens is None else {"prefill_queue_tokens": queue_tokens, "prefill_queue_ttft_s": 2.0}
    )
    extra.update(proxy)
    async with (
        stack("vllm", sim_config=SLOW, **extra) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        done: list[tuple[float, str]] = []
        longs = [asyncio.ensure_future(_complete(http, s.url, LONG, done)) for _ in range(6)]

        async def longs_held() -> bool:
            if queue_tokens is not None:  # 2 on the engine (8000 tokens), 4 in the proxy
                return sample(await _metrics(http, s.url), "pdorch_proxy_prefill_queue_depth") == 4
            text = await _metrics(http, s.prefill_url)
            return sample(text, "vllm:num_requests_waiting") + sample(text, "vllm:num_requests_running") == 6

        await wait_until(longs_held, WAIT_S, "the long prompts to be queued")
        shorts = [asyncio.ensure_future(_complete(http, s.url, SHORT, done)) for _ in range(12)]
        statuses = await asyncio.gather(*longs, *shorts)
        assert statuses == [200] * 18
        metrics = await _metrics(http, s.url)
        if queue_tokens is not None:
            assert s.proxy._prefill_queue is not None and s.proxy._prefill_queue.inflight == 0
        return [kind for _, kind in sorted(done)], metrics


def _longs_before_last_short(order: list[str]) -> int:
    last_short = max(i for i, kind in enumerate(order) if kind == "short")
    return order[:last_short].count("long")


async def test_without_the_queue_short_prompts_wait_behind_the_long_ones() -> None:
    order, _ = await _burst(None)
    # FCFS batches of <= 8192 tokens: [L, L], [L, L], then the last two long prompts with the first
    # short ones: at least four long answers come before the last short one.
    assert _longs_before_last_short(order) >= 4, order


async def test_with_the_queue_short_prompts_go_before_the_waiting_long_ones() -> None:
    order, metrics = await _burst(8192)
    # Two long prompts were on the engine; of the four held back at most one is sent with the
    # short ones (it fits beside them), so three long answers come after every short one.
    assert _longs_before_last_short(order) <= 3, order
    assert sample(metrics, "pdorch_proxy_prefill_queue_wait_seconds_count") == 18
    assert sample(metrics, "pdorch_proxy_prefill_queue_depth") == 0


async def test_the_queue_orders_prompts_even_when_admission_is_the_tighter_limit() -> None:
    # Six upstream slots: waiting prompts must not hold them, or admission's FIFO decides instead.
    order, _ = await _burst(8192, max_inflight=6)
    assert _longs_before_last_short(order) <= 3, order


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
async def test_room_comes_back_when_the_prefill_leg_ends_not_the_answer(protocol: str) -> None:
    slow = replace(FAST, time_scale=5.0)  # ~30 ms per decode step: the answer streams for ~2 s
    async with (
        stack(protocol, sim_config=slow, prefill_queue_tokens=4000) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        q = s.proxy._prefill_queue
        assert q is not None
        body = {"model": MODEL, "prompt": SHORT, "max_tokens": 64, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readany()  # the first token: the prefill is done
            await wait_until(lambda: asyncio.sleep(0, q.inflight == 0), WAIT_S, "the room to come back")
            # ... while the decode leg is still in flight (the answer is still streaming).
            assert s.proxy.loads.get(s.decode_url) == 1
            await resp.read()


async def test_a_request_with_no_usable_pair_gives_its_room_back() -> None:
    async with (
        stack(
            "vllm",
            prefill_queue_tokens=4000,
            decode=("http://127.0.0.1:9",),  # nothing listens there
            breaker_failures=1,
            max_retries=1,
        ) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        q = s.proxy._prefill_queue
        assert q is not None
        body = {"model": MODEL, "prompt": SHORT, "max_tokens": 1}
        statuses = []
        for _ in range(3):
            async with http.post(s.url + "/v1/completions", json=body) as resp:
                statuses.append(resp.status)
            assert q.inflight == 0 and q.waiters == []
        # The first fails its decode leg (its retry finds the decode's breaker open), the others find
        # no usable pair before any leg: each gives its room back.
        assert statuses == [503, 503, 503]
        assert sample(await _metrics(http, s.url), "pdorch_proxy_rejected_total", {"reason": "no_pair"}) == 3


async def test_a_request_timeout_in_the_queue_is_a_504_and_leaves_no_waiter() -> None:
    async with (
        stack("vllm", prefill_queue_tokens=4000, request_timeout_s=0.5) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        q = s.proxy._prefill_queue
        assert q is not None
        # The room is taken by another prompt (held here, so it outlives this request's timeout).
        other = await q.acquire(4000, time.monotonic())
        body = {"model": MODEL, "prompt": SHORT, "max_tokens": 1}
        async with http.post(s.url + "/v1/completions", json=body) as resp:
            assert resp.status == 504
            err = (await resp.json())["error"]
            assert "prefill queue" in err["message"], err
        metrics = await _metrics(http, s.url)
        assert sample(metrics, "pdorch_proxy_request_timeouts_total", {"phase": "prefill_queue"}) == 1
        assert sample(metrics, "pdorch_proxy_prefill_queue_depth") == 0
        assert q.waiters == []
        other.release()
        async with http.post(s.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
        assert q.inflight == 0


async def test_sglang_burst_gives_all_room_back() -> None:
    async with (
        stack("sglang", prefill_queue_tokens=50) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        done: list[tuple[float, str]] = []
        statuses = await asyncio.gather(*(_complete(http, s.url, SHORT, done) for _ in range(8)))
        assert statuses == [200] * 8
        q = s.proxy._prefill_queue
        assert q is not None
        await wait_until(lambda: asyncio.sleep(0, q.inflight == 0), WAIT_S, "the room to come back")
        assert q.waiters == []


async def test_a_retry_takes_room_without_queueing_behind_prompts_waiting_for_its_slot() -> None:
    """One upstream slot. The first prompt's prefill fails (slowly, on an engine answering 503) and
    its room goes to a prompt that waits for that slot. Were the retry to queue for room again,
    holding the slot, neither would move until the request timeout; it takes room at once."""

    hit = asyncio.Event()

    async def slow_503(_: web.Request) -> web.Response:
        hit.set()
        await asyncio.sleep(0.5)
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow_503)
    async with (
        serve_app(app) as broken,
        stack(
            "vllm",
            extra_prefill=(broken,),
            policy="round_robin",
            max_inflight=1,
            prefill_queue_tokens=100,
            request_timeout_s=20.0,
            max_retries=2,
            breaker_failures=100,  # the broken engine keeps its share of the room
        ) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        q = s.proxy._prefill_queue
        assert q is not None
        body = {"model": MODEL, "prompt": " ".join(["abc"] * 200), "max_tokens": 1}

        async def post() -> int:
            async with http.post(s.url + "/v1/completions", json=body) as resp:
                await resp.read()
                return resp.status

        # Round robin: one of the first two prompts goes to the broken engine and holds the slot.
        first = None
        for _ in range(2):
            sent = asyncio.ensure_future(post())
            await asyncio.wait({sent, asyncio.ensure_future(hit.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if hit.is_set():
                first = sent
                break
            assert await sent == 200
        assert first is not None, "no prompt reached the broken engine"
        # Two more fill the room (200: 100 per engine) and wait for the slot, one more in the queue.
        rest = [asyncio.ensure_future(post()) for _ in range(3)]
        statuses = await asyncio.gather(first, *rest)
        assert statuses == [200] * 4, statuses
        metrics = await _metrics(http, s.url)
        assert sample(metrics, "pdorch_proxy_retries_total", {"endpoint": broken, "reason": "http_503"}) >= 1
        assert sample(metrics, "pdorch_proxy_request_timeouts_total", {"phase": "prefill_queue"}) == 0
        assert q.inflight == 0 and q.waiters == []


async def test_max_queue_zero_refuses_only_prompts_that_would_wait() -> None:
    async with (
        stack("vllm", prefill_queue_tokens=4000, max_queue=0) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        q = s.proxy._prefill_queue
        assert q is not None
        body = {"model": MODEL, "prompt": SHORT, "max_tokens": 1}
        async with http.post(s.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200  # an idle role: no wait, so no refusal
        other = await q.acquire(4000, time.monotonic())  # the room is full: this one would wait
        async with http.post(s.url + "/v1/completions", json=body) as resp:
            assert resp.status == 429, await resp.text()
        other.release()


async def test_room_counts_only_prefills_a_request_can_be_routed_to() -> None:
    """Early in a rollout a new revision's prefill is ready before its decode: no request can go
    to it, so it adds no room (it doubled the tokens let onto the old revision's prefill)."""
    from pdorch.proxy.config import ProxyConfig
    from pdorch.proxy.discovery import StaticDiscovery
    from pdorch.proxy.endpoints import Endpoint, EndpointSet
    from pdorch.proxy.server import ProxyServer

    def ep(i: int, role: str, rev: str) -> Endpoint:
        return Endpoint(
            url=f"http://127.0.0.{i}:8000", role=role, host=f"127.0.0.{i}", port=8000, revision=rev
        )  # type: ignore[arg-type]

    rollout = EndpointSet((ep(1, "prefill", "old"), ep(2, "decode", "old"), ep(3, "prefill", "new")))
    px = ProxyServer(
        ProxyConfig(engine="vllm", decode=("http://127.0.0.1:1",), prefill_queue_tokens=1000),
        StaticDiscovery(rollout),
    )
    queue = px._prefill_queue
    assert queue is not None
    ticket = await queue.acquire(900, 0.0)
    assert not queue.fits_now(900)  # 1800 tokens on one usable prefill of 1000
    ticket.release()
    assert queue.fits_now(900)


async def test_prompts_held_in_the_queue_get_a_503_as_soon_as_the_proxy_drains() -> None:
    """Held prompts hold no admission slot but wait all the same: on shutdown they are answered
    at once (503), not left to the end of the grace and a bare disconnect."""
    async with (
        stack("vllm", sim_config=SLOW, prefill_queue_tokens=4000, shutdown_grace_s=10.0) as s,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
    ):
        done: list[tuple[float, str]] = []
        longs = [asyncio.ensure_future(_complete(http, s.url, LONG, done)) for _ in range(3)]

        async def held() -> bool:
            return sample(await _metrics(http, s.url), "pdorch_proxy_prefill_queue_depth") == 2

        await wait_until(held, WAIT_S, "two prompts held in the prefill queue")
        t0 = time.monotonic()
        stopping = asyncio.ensure_future(s.proxy.stop())
        statuses = await asyncio.gather(*longs)
        assert sorted(statuses) == [200, 503, 503]  # the one on the engine finishes
        assert time.monotonic() - t0 < 5.0  # the held ones did not wait for the grace
        await asyncio.wait_for(stopping, WAIT_S)
