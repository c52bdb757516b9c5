"""`pdorch proxy` in front of simulated vLLM / SGLang engines on loopback, driven by the openai client.

Sims and proxies run in-process (one test also runs the `pdorch proxy` command as a subprocess). The
sims' time scale makes the modelled engines fast, or slow where a test needs a request to be caught
mid-flight; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from pdorch.proxy.config import ProxyConfig
from pdorch.proxy.discovery import StaticDiscovery, endpoint_from_pod, static_endpoints
from pdorch.proxy.endpoints import Endpoint, EndpointSet
from pdorch.proxy.server import ProxyServer
from pdorch.sim import tokens
from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Role
from pdorch.sim.server import SimServer
from tests.compat.helpers import (
    free_port,
    refused_url,
    sample,
    serve_app,
    spawn,
    stop,
    wait_http_ok,
    wait_until,
)
from tests.compat.test_proxy_http_server import post, talk

pytestmark = pytest.mark.compat

MODEL = "sim-model"
FAST = SimConfig(model=MODEL, time_scale=0.01)
WAIT_S = 20.0


def expected_text(prompt: str, n: int) -> str:
    return tokens.generated_text(tokens.prompt_seed(tokens.tokenize(prompt)), 0, n)


def chat_text(messages: list[dict[str, Any]], n: int) -> str:
    return tokens.generated_text(tokens.prompt_seed(tokens.tokenize(tokens.render_chat(messages))), 0, n)


@dataclass
class Stack:
    """Sims (prefill on port 0, decode on port 1) and a proxy in front."""

    sim: SimServer
    proxy: ProxyServer
    protocol: str
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def prefill_url(self) -> str:
        return self.sim.url(0)

    @property
    def decode_url(self) -> str:
        return self.sim.url(1)

    def client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=WAIT_S)
        self.clients.append(c)  # closed with the stack
        return c


@contextlib.asynccontextmanager
async def stack(
    protocol: str = "vllm",
    sim_config: SimConfig = FAST,
    extra_prefill: tuple[str, ...] = (),
    decode: tuple[str, ...] | None = None,
    extra_decode: tuple[str, ...] = (),
    prefill: tuple[str, ...] | None = None,
    **proxy: Any,
) -> AsyncIterator[Stack]:
    """Start sims and a proxy; ``extra_prefill``/``extra_decode`` add (broken) URLs before the real one."""
    cfg = replace(sim_config, protocol=protocol)  # type: ignore[arg-type]
    if protocol == "vllm":
        sim = SimServer(cfg, host="127.0.0.1", ports=[0, 0])
    else:
        sim = SimServer(
            cfg, host="127.0.0.1", ports=[0, 0], role=Role.DECODE, bootstrap_port=0, serve_bootstrap=True
        )
    await sim.start()
    sim.roles = {f"127.0.0.1:{sim.ports[0]}": Role.PREFILL, f"127.0.0.1:{sim.ports[1]}": Role.DECODE}
    real_prefill = sim.url(0) if protocol == "vllm" else f"{sim.url(0)}#{sim.bootstrap_port}"
    pc = ProxyConfig(
        engine=protocol,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=0,
        prefill=prefill or (*extra_prefill, real_prefill),
        decode=decode or (*extra_decode, sim.url(1)),
        **{"health_interval_s": 60.0, **proxy},  # by default tests drive breakers through traffic
    )
    px = ProxyServer(pc, StaticDiscovery(static_endpoints(pc.prefill, pc.decode, pc.bootstrap_port)))
    await px.start()
    s = Stack(sim, px, protocol)
    try:
        yield s
    finally:
        for c in s.clients:
            await c.close()
        await px.stop()
        await sim.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as s:
        yield s


@pytest.fixture
def closed() -> Iterator[str]:
    """A URL nothing answers on: connections are refused while the test runs."""
    with refused_url() as url:
        yield url


async def text_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


# -- happy path through the official client ------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
async def test_openai_client_completions_and_chat(protocol: str, http: aiohttp.ClientSession) -> None:
    async with stack(protocol) as s:
        c = s.client()
        prompt = "The quick brown fox jumps over"
        r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=9)
        assert r.choices[0].text == expected_text(prompt, 9)
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 9

        streamed = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=9, stream=True)
        text = "".join([ch.choices[0].text async for ch in streamed if ch.choices])
        assert text == expected_text(prompt, 9)

        messages = [{"role": "user", "content": "Tell me about disaggregated serving"}]
        chat = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=7)  # type: ignore[arg-type]
        assert chat.choices[0].message.content == chat_text(messages, 7)

        chat_stream = await c.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_completion_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in chat_stream]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_text(
            messages, 7
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7

        models = await c.models.list()
        assert [m.id for m in models.data] == [MODEL]

        # Same X-Request-Id echoed; streamed answers are declared as event streams.
        body = {"model": MODEL, "prompt": "x y z", "max_tokens": 2, "stream": True}
        async with http.post(
            s.url + "/v1/completions", json=body, headers={"X-Request-Id": "rid-42"}
        ) as resp:
            assert resp.headers["X-Request-Id"] == "rid-42"
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = await resp.read()
        assert raw.endswith(b"data: [DONE]\n\n")

        # The prefill leg really ran on the prefill engine, once per request (5 requests).
        p_text, d_text = await text_of(http, s.prefill_url), await text_of(http, s.decode_url)
        if protocol == "vllm":
            assert sample(p_text, "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_leased"}) == 5
            assert sample(d_text, "pdorch_sim_pd_handshakes_total", {"outcome": "kv_pulled"}) == 5
            assert sample(p_text, "vllm:generation_tokens_total") == 5  # one token per prefill leg
        else:
            assert sample(p_text, "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_pushed"}) == 5
            assert sample(d_text, "pdorch_sim_pd_handshakes_total", {"outcome": "decode_matched"}) == 5
        proxy_text = await text_of(http, s.url)
        assert sample(proxy_text, "pdorch_proxy_pd_decisions_total", {"mode": "pd"}) == 5
        assert sample(proxy_text, "pdorch_proxy_requests_total", {"status": "200"}) == 5
        assert sample(proxy_text, "pdorch_proxy_prefill_duration_seconds_count") == 5


async def test_conditional_disaggregation_learns_the_engines_tokens_per_character(
    http: aiohttp.ClientSession,
) -> None:
    """Prompts of one-letter words hold a token per 2 characters, not 4: a 300-character prompt
    (151 tokens by the engine) reads as 75 at the default ratio, under a 100-token threshold. The
    ratio is learned from prefill answers only, so such a prompt goes P/D to teach it while few
    were counted (reason ratio_sample), and is then read as ~150 tokens and disaggregated on its
    own estimate. Only the prefill answers teach the ratio: a prompt skipping the prefill never
    could."""
    prompt = "a " * 150
    assert tokens.count_tokens(prompt) == 151
    async with stack("vllm", min_prompt_tokens=100) as s:
        c = s.client()
        await c.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        await asyncio.sleep(0)  # the count is learned on the loop turn after the prefill answer
        await c.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        await c.completions.create(model=MODEL, prompt="a " * 10, max_tokens=2)  # too short to matter
        proxy_text = await text_of(http, s.url)
        decisions = {
            (mode, reason): sample(
                proxy_text, "pdorch_proxy_pd_decisions_total", {"mode": mode, "reason": reason}
            )
            for mode, reason in (
                ("decode_only", "short_prompt"),
                ("pd", "ratio_sample"),
                ("pd", "long_prompt"),
            )
        }
        assert decisions == {
            ("decode_only", "short_prompt"): 1,
            ("pd", "ratio_sample"): 1,
            ("pd", "long_prompt"): 1,
        }
        assert s.proxy.token_ratios["completion"].per_char == pytest.approx(0.5, abs=0.01)


async def test_conditional_disaggregation_skips_prefill(http: aiohttp.ClientSession) -> None:
    async with stack("vllm", min_prompt_tokens=50) as s:
        c = s.client()
        short = "short prompt"
        r = await c.completions.create(model=MODEL, prompt=short, max_tokens=4)
        assert r.choices[0].text == expected_text(short, 4)
        long_prompt = "word " * 400  # ~500 estimated tokens
        r = await c.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
        assert r.choices[0].text == expected_text(long_prompt, 4)
        p_text = await text_of(http, s.prefill_url)
        assert sample(p_text, "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_leased"}) == 1
        proxy_text = await text_of(http, s.url)
        assert (
            sample(
                proxy_text,
                "pdorch_proxy_pd_decisions_total",
                {"mode": "decode_only", "reason": "short_prompt"},
            )
            == 1
        )
        assert (
            sample(proxy_text, "pdorch_proxy_pd_decisions_total", {"mode": "pd", "reason": "long_prompt"})
            == 1
        )


# -- client errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "status", "param"),
    [
        ("/v1/completions", b'{"model": "sim-model", "prompt": ', 400, None),
        ("/v1/completions", b"[1, 2, 3]", 400, None),
        ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404, "model"),
        ("/v1/completions", b'{"prompt": "x"}', 400, "model"),
        ("/v1/completions", b'{"model": "sim-model"}', 400, "prompt"),
        ("/v1/completions", b'{"model": "sim-model", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "sim-model", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"model": "sim-model", "prompt": "x", "stream": "yes"}', 400, "stream"),
        ("/v1/completions", b'{"model": "sim-model", "prompt": "x", "temperature": 9}', 400, "temperature"),
        # The decode would refuse these only after a full prefill had leased its KV (review helper-72).
        (
            "/v1/completions",
            b'{"model": "sim-model", "prompt": "x", "min_tokens": 5, "max_tokens": 2}',
            400,
            "min_tokens",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "min_tokens": 5, "max_completion_tokens": 2}',
            400,
            "min_tokens",
        ),
        # Longer than the max_model_len the engines list in /v1/models.
        (
            "/v1/completions",
            b'{"model": "sim-model", "prompt": "x", "max_tokens": 1000000000}',
            400,
            "max_tokens",
        ),
        # beyond a float's range: math.isfinite overflowed (was a 500)
        (
            "/v1/completions",
            b'{"model": "sim-model", "prompt": "x", "top_p": 1' + b"0" * 400 + b"}",
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            b'{"model": "sim-model", "prompt": "x", "stream_options": {"include_usage": true}}',
            400,
            "stream_options",
        ),
        ("/v1/chat/completions", b'{"model": "sim-model", "messages": []}', 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"model": "sim-model", "messages": [{"content": "x"}]}',
            400,
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "kv_transfer_params": {}}',
            400,
            "kv_transfer_params",
        ),
    ],
)
async def test_bad_requests_get_json_4xx_naming_the_field(
    http: aiohttp.ClientSession, path: str, raw: bytes, status: int, param: str | None
) -> None:
    async with stack("vllm") as s:
        async with http.post(
            s.url + path, data=raw, headers={"Content-Type": "application/json", "X-Request-Id": "bad-1"}
        ) as r:
            assert r.status == status
            assert r.headers["X-Request-Id"] == "bad-1"
            err = (await r.json())["error"]
        assert err["param"] == param
        assert err["type"] and err["message"]
        if param is not None:
            assert param.split("[")[0] in err["message"]
        p_text = await text_of(http, s.prefill_url)
        assert sample(p_text, "vllm:prompt_tokens_total") == 0  # nothing reached an engine


async def test_vllm_refuses_several_prompts_and_serves_one_prompt_in_any_of_its_forms(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM's prefill hands back prompt 0's kv_transfer_params only, so several prompts are refused
    before any leg, saying what to do (review helper-72, finding 2). One prompt as a list (of one
    string, of token ids, of one token-id list) is still served through the P/D handshake."""
    seen: list[Any] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"error": {"message": "not expected"}}, status=500)

    app = web.Application()
    app.router.add_post("/v1/completions", record)
    async with serve_app(app) as engine, stack("vllm", prefill=(engine,), decode=(engine,)) as s:
        for prompt in (["a", "b"], [[1], [2]]):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                assert r.status == 400
                err = (await r.json())["error"]
            assert err["param"] == "prompt" and "one prompt per request" in err["message"]
        assert seen == []  # no leg was sent
    async with stack("vllm") as s:
        for prompt in (["one prompt"], [5, 6, 7], [[5, 6, 7]]):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                assert len((await r.json())["choices"]) == 1
        p_text = await text_of(http, s.prefill_url)
        assert sample(p_text, "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_leased"}) == 3


async def test_sglang_request_fanning_out_past_the_room_limit_is_a_400(http: aiohttp.ClientSession) -> None:
    """100k one-letter prompts with n=128: half a megabyte that would need 12.8M bootstrap rooms."""
    async with stack("sglang") as s:
        body = {"model": MODEL, "prompt": ["x"] * 100_000, "n": 128, "max_tokens": 1}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 400
            err = (await r.json())["error"]
        assert err["param"] == "prompt" and "split the prompt list" in err["message"]
        async with http.get(s.url + "/health") as r:
            assert r.status == 200
        d_text = await text_of(http, s.decode_url)
        assert sample(d_text, "sglang:num_requests_total") in (None, 0)  # nothing reached an engine


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
async def test_a_lone_surrogate_escape_is_relayed_not_a_500(
    protocol: str, http: aiohttp.ClientSession
) -> None:
    # Valid JSON ("\\ud800" escapes half a UTF-16 pair) that msgspec could not re-encode.
    for path, raw in (
        ("/v1/completions", b'{"model": "sim-model", "prompt": "hi \\ud800", "max_tokens": 2}'),
        (
            "/v1/chat/completions",
            b'{"model": "sim-model", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        ),
    ):
        async with stack(protocol) as s:
            async with http.post(s.url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"]


async def test_oversized_body_and_openai_client_errors(http: aiohttp.ClientSession) -> None:
    async with stack("vllm", max_body_bytes=4096) as s:
        body = {"model": MODEL, "prompt": "x" * 10_000}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 413
            assert "limit" in (await r.json())["error"]["message"]

        # Chunked upload without Content-Length hits the same limit.
        async def gen() -> AsyncIterator[bytes]:
            yield json.dumps(body).encode()

        async with http.post(
            s.url + "/v1/completions", data=gen(), headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == 413
        c = s.client()
        with pytest.raises(openai.NotFoundError) as nf:
            await c.completions.create(model="other-model", prompt="x", max_tokens=2)
        assert "other-model" in str(nf.value)
        with pytest.raises(openai.BadRequestError) as br:
            await c.completions.create(model=MODEL, prompt="x", max_tokens=-3)
        assert "max_tokens" in str(br.value)


async def test_api_key_required(http: aiohttp.ClientSession) -> None:
    async with stack("vllm", api_key="s3cret") as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            await s.client("wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
        r2 = await s.client("s3cret").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert r2.usage is not None and r2.usage.completion_tokens == 2
        async with http.get(s.url + "/health") as h:  # probes need no key
            assert h.status == 200


# -- resilience ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def failing_server(status: int) -> AsyncIterator[str]:
    """An HTTP server answering every request with ``status``."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "boom"}}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serve_app(app) as url:
        yield url


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
async def test_failing_prefills_are_retried_with_a_fresh_pair(
    protocol: str, http: aiohttp.ClientSession, closed: str
) -> None:
    async with failing_server(503) as broken:
        suffix = "#1" if protocol == "sglang" else ""
        async with stack(
            protocol, extra_prefill=(closed + suffix, broken + suffix), policy="round_robin", max_retries=2
        ) as s:
            c = s.client()
            for i in range(6):
                prompt = f"retry me {i}"
                r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
                assert r.choices[0].text == expected_text(prompt, 3)
            proxy_text = await text_of(http, s.url)
            assert sample(proxy_text, "pdorch_proxy_requests_total", {"status": "200"}) == 6
            assert (
                sample(proxy_text, "pdorch_proxy_retries_total", {"endpoint": closed, "reason": "connect"})
                >= 1
            )
            assert (
                sample(proxy_text, "pdorch_proxy_retries_total", {"endpoint": broken, "reason": "http_503"})
                >= 1
            )
            assert sample(proxy_text, "pdorch_proxy_endpoint_errors_total", {"endpoint": closed}) >= 1


async def test_queue_full_gets_429_with_retry_after(http: aiohttp.ClientSession) -> None:
    slow = replace(FAST, time_scale=1.0)
    async with stack("vllm", sim_config=slow, max_inflight=1, max_queue=0) as s:
        body = {"model": MODEL, "prompt": "hold the slot", "max_tokens": 2000, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as first:
            assert first.status == 200
            await first.content.readany()  # the slot is taken and streaming
            async with http.post(s.url + "/v1/completions", json={**body, "max_tokens": 2}) as second:
                assert second.status == 429
                assert int(second.headers["Retry-After"]) >= 1
                assert (await second.json())["error"]["type"] == "rate_limit_error"
            first.close()
        proxy_text = await text_of(http, s.url)
        assert sample(proxy_text, "pdorch_proxy_rejected_total", {"reason": "queue_full"}) == 1


async def test_vllm_client_disconnect_mid_stream_aborts_decode(http: aiohttp.ClientSession) -> None:
    slow = replace(FAST, time_scale=1.0)
    async with stack("vllm", sim_config=slow) as s:
        body = {"model": MODEL, "prompt": "a long answer please", "max_tokens": 3000, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            assert await r.content.readany()
            r.close()  # client goes away mid-stream

        async def decode_aborted() -> bool:
            return (
                sample(
                    await text_of(http, s.decode_url),
                    "vllm:request_success_total",
                    {"finished_reason": "abort"},
                )
                == 1
            )

        await wait_until(decode_aborted, WAIT_S, "the decode leg to be aborted")
        # The prefill leg had finished and its KV lease was claimed: no prefill work is left behind.
        prefill = s.sim.engine("127.0.0.1", s.sim.ports[0])
        snap = prefill.snapshot()
        assert snap.running == 0 and snap.waiting == 0 and not prefill.leases
        proxy_text = await text_of(http, s.url)
        assert sample(proxy_text, "pdorch_proxy_endpoint_inflight") == 0


async def test_vllm_client_disconnect_during_prefill_aborts_prefill(http: aiohttp.ClientSession) -> None:
    slow = replace(FAST, time_scale=30.0)  # an 8k-token prefill then takes seconds
    async with stack("vllm", sim_config=slow) as s:
        prefill = s.sim.engine("127.0.0.1", s.sim.ports[0])
        body = {"model": MODEL, "prompt": "word " * 8000, "max_tokens": 5, "stream": True}
        task = asyncio.create_task(http.post(s.url + "/v1/completions", json=body))

        async def prefilling() -> bool:
            return prefill.snapshot().running == 1

        await wait_until(prefilling, WAIT_S, "the prefill leg to start")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        async def prefill_aborted() -> bool:
            return (
                sample(
                    await text_of(http, s.prefill_url),
                    "vllm:request_success_total",
                    {"finished_reason": "abort"},
                )
                == 1
            )

        await wait_until(prefill_aborted, WAIT_S, "the prefill leg to be aborted")
        d_text = await text_of(http, s.decode_url)
        assert sample(d_text, "vllm:prompt_tokens_total") == 0  # the decode leg never started


async def test_sglang_client_disconnect_aborts_both_legs(http: aiohttp.ClientSession) -> None:
    slow = replace(FAST, time_scale=30.0)
    async with stack("sglang", sim_config=slow) as s:
        prefill = s.sim.engine("127.0.0.1", s.sim.ports[0])
        body = {"model": MODEL, "prompt": "word " * 8000, "max_tokens": 5, "stream": True}
        task = asyncio.create_task(http.post(s.url + "/v1/completions", json=body))

        async def prefilling() -> bool:
            return prefill.snapshot().running == 1

        await wait_until(prefilling, WAIT_S, "the prefill leg to start")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        async def both_aborted() -> bool:
            p = sample(await text_of(http, s.prefill_url), "sglang:num_aborted_requests_total")
            d = sample(await text_of(http, s.decode_url), "sglang:num_aborted_requests_total")
            return p == 1 and d == 1

        await wait_until(both_aborted, WAIT_S, "both SGLang legs to be aborted")


@contextlib.asynccontextmanager
async def hanging_server() -> AsyncIterator[str]:
    """Accepts connections and reads requests but never answers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()  # until the proxy gives up and closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


async def test_a_failing_model_list_is_fetched_once_for_concurrent_requests(
    http: aiohttp.ClientSession,
) -> None:
    """Engines whose /v1/models never answers: the requests queued behind the first fetch use its
    outcome instead of each running the whole failing fetch again (the k-th waited k timeouts)."""
    fetches = 0
    release = asyncio.Event()

    async def models(_: web.Request) -> web.Response:
        nonlocal fetches
        fetches += 1
        await release.wait()  # until the test ends (the proxy gave up long before)
        return web.Response()

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def completions(_: web.Request) -> web.Response:
        choice = {"index": 0, "text": "hi", "finish_reason": "length"}
        return web.json_response({"id": "x", "object": "text_completion", "choices": [choice]})

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/v1/models", models),
            web.post("/v1/completions", completions),
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with stack("vllm", prefill=(engine,), decode=(engine,), health_timeout_s=0.3) as s:

            async def one() -> int:
                body = {"model": "m", "prompt": "p", "max_tokens": 2}
                async with http.post(s.url + "/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(one() for _ in range(5))) == [200] * 5
        assert fetches == 1
    finally:
        release.set()
        await runner.cleanup()


async def test_a_close_delimited_decode_answer_is_complete_not_a_disconnect(
    http: aiohttp.ClientSession,
) -> None:
    """HTTP/1.1 lets a response with neither Content-Length nor chunking end when the server
    closes; the decode leg's body is whole then, not a ServerDisconnectedError (was a 502)."""
    prefill_body = json.dumps({"id": "x", "choices": [{"text": "a"}], "kv_transfer_params": {}}).encode()
    decode_body = json.dumps(
        {"id": "y", "object": "text_completion", "choices": [{"text": "hello"}]}
    ).encode()

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        length = next((int(h.split(":")[1]) for h in head.split("\r\n") if h.startswith("content-length")), 0)
        body = json.loads(await reader.readexactly(length)) if length else {}
        if head.startswith("get"):  # /v1/models, /health
            data = json.dumps({"data": [{"id": "m"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        elif (body.get("kv_transfer_params") or {}).get("do_remote_decode"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(prefill_body) + prefill_body)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
            writer.write(decode_body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with stack("vllm", prefill=(url,), decode=(url,), max_retries=0) as s:
            body = {"model": "m", "prompt": "p", "max_tokens": 3}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"][0]["text"] == "hello"
    finally:
        server.close()


def _raw_post(path: str, body: dict[str, Any], extra: str = "") -> bytes:
    return post(path, json.dumps(body).encode(), "Content-Type: application/json\r\n" + extra)


def _two_answers(got: bytes) -> bool:
    return got.count(b"HTTP/1.1 ") >= 2


async def test_malformed_bytes_after_a_request_answer_it_first_then_400() -> None:
    """A request followed by garbage in the same write: the request is answered, then the 400,
    then the close (the request was cut off without an answer)."""
    async with stack("vllm") as s:
        req = _raw_post("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4})
        out = await talk(s.proxy.port, req + b"BAD REQUEST\r\n\r\n", _two_answers)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3})", out)
    assert statuses == [b"200", b"400"], out[:300]


async def test_a_chunked_body_broken_midway_gets_a_400_naming_it(http: aiohttp.ClientSession) -> None:
    """The handler is already waiting for the body when a chunk size turns out not to be hex: the
    client gets a JSON 400 that says so, not a silent close, and it counts as invalid input."""
    async with stack("vllm") as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.proxy.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mod\r\n'
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the head is in and its handler waits for the rest of the body
        writer.write(b'zz\r\nel": 1}\r\n0\r\n\r\n')
        async with asyncio.timeout(WAIT_S):
            out = await reader.read()
        writer.close()
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), out[:300]
        assert "malformed HTTP request" in json.loads(body)["error"]["message"], body
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_rejected_total", {"reason": "invalid"}) == 1
        assert sample(text, "pdorch_proxy_client_disconnects_total") in (None, 0)


async def test_expect_continue_behind_a_streaming_answer_waits_for_it_to_end() -> None:
    """Pipelined: a streamed completion, then a request with Expect: 100-continue. The 100 must
    follow the stream's last chunk, not land inside its body."""
    async with stack("vllm", sim_config=replace(FAST, time_scale=0.2)) as s:
        first = _raw_post(
            "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 40, "stream": True}
        )
        second = _raw_post("/v1/completions", {"model": MODEL, "prompt": "b"}, "Expect: 100-continue\r\n")
        head = second.split(b"\r\n\r\n")[0] + b"\r\n\r\n"  # the client waits for the 100
        out = await talk(s.proxy.port, first + head, _two_answers)
    end_of_stream = out.find(b"data: [DONE]")
    assert end_of_stream > 0, out[:300]
    assert out.find(b"HTTP/1.1 100 Continue") > end_of_stream, out[end_of_stream - 100 :]


@pytest.mark.parametrize(("leg", "stream"), [("decode", True), ("prefill", True), ("prefill", False)])
async def test_hanging_engine_gets_504(http: aiohttp.ClientSession, leg: str, stream: bool) -> None:
    async with hanging_server() as hang:
        where: dict[str, Any] = {"decode": (hang,)} if leg == "decode" else {"prefill": (hang,)}
        async with stack("vllm", first_byte_timeout_s=0.5, health_timeout_s=0.3, **where) as s:
            body = {"model": MODEL, "prompt": "anyone there?", "max_tokens": 3, "stream": stream}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                assert r.status == 504
                err = (await r.json())["error"]
            assert err["type"] == "timeout_error" and "first-byte" in err["message"] and leg in err["message"]
            text = await text_of(http, s.url)
            labels = {"endpoint": hang, "role": leg, "reason": "first_byte_timeout"}
            assert sample(text, "pdorch_proxy_endpoint_errors_total", labels) == 1


async def test_a_non_streamed_answer_is_bounded_by_the_request_timeout_not_the_first_byte_one(
    http: aiohttp.ClientSession,
) -> None:
    """A non-streamed answer's first byte is its last: a generation longer than the first-byte
    timeout is served, and a decode silent past the request timeout gets a 504 that is the
    client's budget, not a mark against the engine (five of those used to open its breaker)."""
    slow = replace(FAST, time_scale=1.0)  # ~10 ms per decode step
    async with stack("vllm", sim_config=slow, first_byte_timeout_s=0.3) as s:
        body = {"model": MODEL, "prompt": "a long answer please", "max_tokens": 80, "stream": False}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["completion_tokens"] == 80
    async with hanging_server() as hang:
        async with stack("vllm", decode=(hang,), request_timeout_s=0.5, health_timeout_s=0.3) as s:
            for _ in range(6):
                body = {"model": MODEL, "prompt": "anyone there?", "max_tokens": 3}
                async with http.post(s.url + "/v1/completions", json=body) as r:
                    assert r.status == 504
                    assert "request timeout" in (await r.json())["error"]["message"]
            text = await text_of(http, s.url)
            assert sample(text, "pdorch_proxy_endpoint_errors_total", {"endpoint": hang}) in (None, 0)
            assert sample(text, "pdorch_proxy_request_timeouts_total", {"phase": "before_first_byte"}) == 6
            assert sample(text, "pdorch_proxy_breaker_state", {"endpoint": hang}) in (None, 0)


async def test_health_reports_missing_pairs(http: aiohttp.ClientSession) -> None:
    async with stack("vllm") as s:
        async with http.get(s.url + "/health") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "ok"
    sim = SimServer(FAST, host="127.0.0.1", ports=[0])
    await sim.start()
    try:
        pc = ProxyConfig(engine="vllm", host="127.0.0.1", port=0, decode=(sim.url(),), health_interval_s=60)
        px = ProxyServer(pc, StaticDiscovery(static_endpoints((), pc.decode)))
        await px.start()
        try:
            async with http.get(f"http://127.0.0.1:{px.port}/health") as r:
                assert r.status == 503
                assert "prefill" in (await r.json())["reason"]
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            async with http.post(f"http://127.0.0.1:{px.port}/v1/completions", json=body) as r:
                assert r.status == 503
                assert int(r.headers["Retry-After"]) >= 1
                assert "no_prefill" in (await r.json())["error"]["message"]
        finally:
            await px.stop()
    finally:
        await sim.stop()


async def test_health_is_degraded_not_unready_when_decodes_alone_can_serve_short_prompts(
    http: aiohttp.ClientSession,
) -> None:
    """No prefill, conditional disaggregation on (vLLM): short prompts are still served by a decode
    alone, so /health says 200 degraded (the proxy stays in its Service) and long prompts get 503."""
    async with SimServer(FAST, host="127.0.0.1", ports=[0]) as sim:
        pc = ProxyConfig(
            engine="vllm",
            host="127.0.0.1",
            port=0,
            decode=(sim.url(),),
            min_prompt_tokens=64,
            health_interval_s=60,
        )
        px = ProxyServer(pc, StaticDiscovery(static_endpoints((), pc.decode)))
        await px.start()
        base = f"http://127.0.0.1:{px.port}"
        try:
            async with http.get(base + "/health") as r:
                assert r.status == 200
                health = await r.json()
            assert health["status"] == "degraded"
            assert health["reason"].startswith("decode-only: no healthy prefill endpoint")
            assert (health["prefill"], health["decode"]) == (0, 1)
            short = {"model": MODEL, "prompt": "short", "max_tokens": 3}
            async with http.post(base + "/v1/completions", json=short) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"][0]["text"] == expected_text("short", 3)
            # Prompts under the threshold that the ratio could underestimate are sampled through a
            # prefill to learn it (all of them while fewer than 16 were counted): with none, they
            # are served alone too (they got 503 no_prefill).
            for chars in (32, 100, 160, 250):
                prompt = "x" * chars
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
                async with http.post(base + "/v1/completions", json=body) as r:
                    assert r.status == 200, (chars, await r.text())
                    assert (await r.json())["choices"][0]["text"] == expected_text(prompt, 3)
            long = {"model": MODEL, "prompt": "a long prompt " * 100, "max_tokens": 3}
            async with http.post(base + "/v1/completions", json=long) as r:
                assert r.status == 503
                assert "no_prefill" in (await r.json())["error"]["message"]
            # The decode's breaker opens (as failed requests would open it): nothing can serve now.
            for _ in range(pc.breaker_failures):
                px._outcome(px.discovery.current().decodes()[0], ok=False)
            async with http.get(base + "/health") as r:
                assert r.status == 503
                assert (await r.json()) | {"revisions": None} == {
                    "status": "unavailable",
                    "reason": "no healthy decode endpoint",
                    "prefill": 0,
                    "decode": 1,
                    "revisions": None,
                }
        finally:
            await px.stop()


# -- the command ---------------------------------------------------------------------------------------


async def test_pdorch_proxy_command_serves_and_stops_on_sigterm(
    tmp_path: Any, http: aiohttp.ClientSession
) -> None:
    async with SimServer(FAST, host="127.0.0.1", ports=[0, 0]) as sim:
        sim.roles = {f"127.0.0.1:{sim.ports[0]}": Role.PREFILL, f"127.0.0.1:{sim.ports[1]}": Role.DECODE}
        port, metrics_port = free_port(), free_port()
        log = tmp_path / "proxy.log"
        router_config = {"policy": "power_of_two", "retries": {"maxRetries": 1}}
        cmd = [
            sys.executable, "-m", "pdorch.cli", "proxy", "--engine", "vllm", "--host", "127.0.0.1",
            "--port", str(port), "--prefill", sim.url(0), "--decode", sim.url(1), "--shutdown-grace", "5",
            "--shutdown-drain-delay", "2", "--metrics-port", str(metrics_port),
        ]  # fmt: skip
        os.environ["PDORCH_ROUTER_CONFIG"] = json.dumps(router_config)
        try:
            proc = spawn(cmd, log)
        finally:
            del os.environ["PDORCH_ROUTER_CONFIG"]
        try:
            await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/health", 30, proc, log)
            c = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=WAIT_S
            )
            async with c:
                r = await c.completions.create(model=MODEL, prompt="via the command", max_tokens=4)
            assert r.choices[0].text == expected_text("via the command", 4)
            # /metrics lives on its own port; the client port does not serve it.
            text = await text_of(http, f"http://127.0.0.1:{metrics_port}")
            assert sample(text, "pdorch_proxy_policy_picks_total", {"policy": "power_of_two"}) == 1
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 404
            # SIGTERM: for the drain delay the proxy still answers, unready, then exits in its grace.
            t0 = asyncio.get_running_loop().time()
            os.killpg(proc.pid, signal.SIGTERM)

            async def draining() -> bool:
                async with http.get(f"http://127.0.0.1:{port}/health") as r:
                    return r.status == 503 and (await r.json())["status"] == "draining"

            await wait_until(draining, 1.5, "/health to answer 503 draining")
            await asyncio.to_thread(proc.wait, 10)
            assert asyncio.get_running_loop().time() - t0 <= 5.5
        finally:
            await asyncio.to_thread(stop, proc)
        assert proc.returncode == 0, log.read_text()[-2000:]


async def test_graceful_stop_finishes_in_flight_streams(http: aiohttp.ClientSession) -> None:
    slow = replace(FAST, time_scale=0.5)
    async with stack("vllm", sim_config=slow, shutdown_grace_s=15) as s:
        body = {"model": MODEL, "prompt": "finish me", "max_tokens": 150, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            first = await r.content.readany()
            stopping = asyncio.create_task(s.proxy.stop())
            rest = await r.read()
        await asyncio.wait_for(stopping, WAIT_S)
        raw = first + rest
        assert raw.endswith(b"data: [DONE]\n\n")
        assert raw.count(b'"text"') == 150
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(s.url + "/health"):
                pass


async def test_a_stopping_proxy_frees_both_ports_while_its_streams_finish(
    http: aiohttp.ClientSession,
) -> None:
    """A replaced proxy pod finishes its streams for the rest of its grace while its successor may
    get the same IP (kwok reuses them; so may a CNI): the metrics listener stayed bound until the
    grace ended, so the successor could not bind it and exited (helper-82)."""
    slow = replace(FAST, time_scale=0.5)
    async with stack("vllm", sim_config=slow, shutdown_grace_s=15, metrics_port=0) as s:
        body = {"model": MODEL, "prompt": "finish me", "max_tokens": 150, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            first = await r.content.readany()
            stopping = asyncio.create_task(s.proxy.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done(), "the stream should still be running"
            successor = ProxyServer(
                s.proxy.config.model_copy(
                    update={"port": s.proxy.port, "metrics_port": s.proxy.metrics_port}
                ),
                StaticDiscovery(static_endpoints(s.proxy.config.prefill, s.proxy.config.decode, None)),
            )
            await successor.start()  # binds both ports of the stopping proxy
            await successor.stop()
            rest = await r.read()
        await asyncio.wait_for(stopping, WAIT_S)
    assert (first + rest).count(b'"text"') == 150  # the old proxy's stream ran to its end


async def test_shutdown_drains_visibly_then_ends_what_is_left_with_explicit_errors(
    http: aiohttp.ClientSession,
) -> None:
    """Review helper-72 (finding 5) and helper-71 (finding C): on stop the listener closed at once,
    so /health never answered its documented 503 "draining" and new clients were refused; a request
    waiting for admission waited the whole grace for a bare disconnect; a stream still open at the
    end of the grace was cut without an error event."""

    async def post(body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
        t = loop.time()
        async with http.post(s.url + "/v1/completions", json=body) as r:
            return r.status, await r.json(), loop.time() - t

    loop = asyncio.get_running_loop()
    slow = replace(FAST, time_scale=1.0)  # ~10 ms per token: the stream below lasts ~20 s
    grace, delay = 3.0, 1.0
    async with stack("vllm", sim_config=slow, max_inflight=1, shutdown_grace_s=grace) as s:
        short = {"model": MODEL, "prompt": "short", "max_tokens": 2}
        long = {"model": MODEL, "prompt": "a long one", "max_tokens": 2000, "stream": True}
        async with http.post(s.url + "/v1/completions", json=long) as r:
            assert r.status == 200
            first = await r.content.readany()
            queued = asyncio.create_task(post(short))  # waits for the one admission slot

            async def waiting() -> bool:
                return s.proxy._admission.waiting == 1

            await wait_until(waiting, WAIT_S, "a request waiting for admission")
            with pytest.raises(TimeoutError):  # a client giving up while it waits is forgotten
                async with asyncio.timeout(0.3):
                    await post(short)

            async def forgotten() -> bool:
                return len(s.proxy._waiting) == 1 and s.proxy._admission.waiting == 1

            await wait_until(forgotten, WAIT_S, "the waiter that gave up to be forgotten")
            t0 = loop.time()
            stopping = asyncio.create_task(s.proxy.stop(drain_delay_s=delay))
            status, body, _ = await queued
            assert status == 503 and body["error"]["code"] == "shutting_down"
            assert loop.time() - t0 < delay  # at once, not after the grace
            # The listener is still open: readiness says draining, new requests get a 503.
            async with http.get(s.url + "/health") as h:
                assert h.status == 503 and (await h.json())["status"] == "draining"
            status, body, _ = await post(short)
            assert status == 503 and body["error"]["message"] == "proxy is shutting down"
            rest = await r.read()  # the stream goes on until the grace is over
        await asyncio.wait_for(stopping, WAIT_S)
        took = loop.time() - t0
        assert grace - 1.0 <= took <= grace + 0.5, took
        events = [e for e in (first + rest).split(b"\n\n") if e.strip()]
        assert len(events) > 10  # tokens flowed during the drain
        assert events[-1] == b"data: [DONE]"  # after the error event, as vLLM ends its streams
        last = json.loads(events[-2].removeprefix(b"data: "))
        assert last["error"]["code"] == "shutting_down" and "shutting down" in last["error"]["message"]
        with pytest.raises(aiohttp.ClientConnectionError):  # after the drain delay: refused
            async with http.get(s.url + "/health"):
                pass


async def test_health_checks_open_the_breaker_of_a_dead_prefill(
    http: aiohttp.ClientSession, closed: str
) -> None:
    async with stack(
        "vllm",
        extra_prefill=(closed,),
        policy="round_robin",
        breaker_failures=2,
        health_interval_s=0.05,
        health_timeout_s=0.5,
    ) as s:

        async def opened() -> bool:
            text = await text_of(http, s.url)
            return sample(text, "pdorch_proxy_breaker_state", {"endpoint": closed}) == 1

        await wait_until(opened, WAIT_S, "the dead prefill's breaker to open")
        c = s.client()
        for i in range(4):
            await c.completions.create(model=MODEL, prompt=f"after {i}", max_tokens=2)
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_retries_total") == 0  # the open breaker kept traffic away
        assert sample(text, "pdorch_proxy_breaker_state", {"endpoint": s.prefill_url}) == 0

        # The dead pod leaves discovery: its breaker series goes too (no open breaker on the
        # dashboards for a pod that no longer exists).
        s.proxy.discovery = StaticDiscovery(static_endpoints((s.prefill_url,), (s.decode_url,)))

        async def series_gone() -> bool:
            return f'endpoint="{closed}"' not in await text_of(http, s.url)

        await wait_until(series_gone, WAIT_S, "the departed prefill's metric series to go")


def engine_pod(role: str, port: int, uid: str, revision: str = "r1") -> Endpoint:
    """The endpoint discovery makes of a Ready pod of the group serving on 127.0.0.1:`port`."""
    ep = endpoint_from_pod(
        {
            "metadata": {
                "name": f"g-{role}-0",
                "uid": uid,
                "labels": {"pdorch.io/role-type": role, "pdorch.io/revision": revision},
                "annotations": {"pdorch.io/port": str(port)},
            },
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }
    )
    assert ep is not None
    return ep


async def test_a_pod_reusing_a_deleted_pods_address_does_not_inherit_its_breaker(
    http: aiohttp.ClientSession,
) -> None:
    """A decode pod dies and a new pod comes up at its IP and port before the health loop saw the
    address go. It is another pod (another UID): it starts with a closed breaker, while the old
    pod's open breaker survived a discovery refresh that still showed the old pod."""
    port = free_port()
    async with SimServer(FAST, host="127.0.0.1", ports=[0], role=Role.PREFILL) as pre:
        prefill = engine_pod("prefill", pre.ports[0], "prefill-uid")
        old = engine_pod("decode", port, "old-uid")
        pc = ProxyConfig(
            engine="vllm",
            host="127.0.0.1",
            port=0,
            prefill=(prefill.url,),
            decode=(old.url,),
            breaker_failures=1,
            breaker_cooldown_s=600,  # the old pod's breaker stays open for the whole test
            health_interval_s=600,  # one round of checks, at start: the old pod is dead by then
            health_timeout_s=1.0,
        )
        px = ProxyServer(pc, StaticDiscovery(EndpointSet((prefill, old))))
        await px.start()
        base = f"http://127.0.0.1:{px.port}"
        try:

            async def health() -> int:
                async with http.get(base + "/health") as r:
                    return r.status

            async def unready() -> bool:
                return await health() == 503

            await wait_until(unready, WAIT_S, "the dead decode's breaker to open")
            # The same pod in a fresh snapshot (a discovery refresh) keeps its open breaker.
            px.discovery = StaticDiscovery(EndpointSet((prefill, engine_pod("decode", port, "old-uid"))))
            assert await health() == 503
            # LWS recreates the pod (same name, new UID) on the same IP and port.
            async with SimServer(FAST, host="127.0.0.1", ports=[port], role=Role.DECODE):
                px.discovery = StaticDiscovery(EndpointSet((prefill, engine_pod("decode", port, "new-uid"))))
                assert await health() == 200
                body = {"model": MODEL, "prompt": "after the replacement", "max_tokens": 3}
                async with http.post(base + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["choices"][0]["text"] == expected_text(body["prompt"], 3)
                text = await text_of(http, base)
                # Series stay labelled by URL; the departed pod's open breaker is not exported for it.
                assert f'endpoint="{old.url}#' not in text
                assert sample(text, "pdorch_proxy_breaker_state", {"endpoint": old.url}) == 0
        finally:
            await px.stop()


@contextlib.asynccontextmanager
async def dying_stream_server() -> AsyncIterator[str]:
    """A 'decode' that starts an SSE stream, sends one event, then drops the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices": [{"index": 0, "text": "partial"}]}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return out

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    async with serve_app(app) as url:
        yield url


async def test_stream_cut_after_first_bytes_ends_with_an_error_event(http: aiohttp.ClientSession) -> None:
    async with dying_stream_server() as dying, stack("vllm", decode=(dying,), health_timeout_s=0.3) as s:
        body = {"model": MODEL, "prompt": "cut me off", "max_tokens": 50, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            raw = await r.read()
        assert raw.startswith(b'data: {"choices": [{"index": 0, "text": "partial"}]}\n\n')
        *_, last, end = raw.strip().split(b"\n\n")
        assert last.startswith(b"data: ") and end == b"data: [DONE]"
        err = json.loads(last[len(b"data: ") :])["error"]
        assert "interrupted" in err["message"]
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_retries_total") == 0  # never retried once bytes were sent
        assert sample(text, "pdorch_proxy_endpoint_errors_total", {"reason": "mid_stream"}) == 1


async def test_request_timeout_is_explicit(http: aiohttp.ClientSession) -> None:
    slow = replace(FAST, time_scale=1.0)
    async with stack("vllm", sim_config=slow, request_timeout_s=0.6) as s:
        body = {"model": MODEL, "prompt": "too long an answer", "max_tokens": 5000}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 504  # nothing was sent yet: a plain JSON error
            assert (await r.json())["error"]["type"] == "timeout_error"
        async with http.post(s.url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status == 200
            raw = await r.read()
        *_, last, end = raw.strip().split(b"\n\n")
        # The stream ends with an error event, then [DONE].
        assert json.loads(last[len(b"data: ") :])["error"]["code"] == 504 and end == b"data: [DONE]"

        async def decode_aborted() -> bool:
            text = await text_of(http, s.decode_url)
            return sample(text, "vllm:request_success_total", {"finished_reason": "abort"}) == 2

        await wait_until(decode_aborted, WAIT_S, "both timed-out decodes to be aborted")
