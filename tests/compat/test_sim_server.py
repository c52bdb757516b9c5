"""The simulated engines over real HTTP on loopback, in-process: API shapes, P/D handshakes, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from pdorch.sim import bootstrap, sse, tokens
from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Role
from pdorch.sim.latency import BLIS_LLAMA31_8B_H100
from pdorch.sim.server import SimServer
from tests.compat.helpers import sample, wait_until

pytestmark = pytest.mark.compat

MODEL = "sim-model"
FAST = SimConfig(model=MODEL, time_scale=0.01)


def expected_text(prompt: str, n: int) -> str:
    return tokens.generated_text(tokens.prompt_seed(tokens.tokenize(prompt)), 0, n)


def chat_text(messages: list[dict[str, Any]], n: int) -> str:
    return tokens.generated_text(tokens.prompt_seed(tokens.tokenize(tokens.render_chat(messages))), 0, n)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


@pytest.fixture
async def vllm_pd() -> AsyncIterator[SimServer]:
    """One process, two ports: prefill on the first, decode on the second."""
    server = SimServer(FAST, host="127.0.0.1", ports=[0, 0])
    await server.start()
    server.roles = {f"127.0.0.1:{server.ports[0]}": Role.PREFILL, f"127.0.0.1:{server.ports[1]}": Role.DECODE}
    yield server
    await server.stop()


async def metrics(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def test_completion_exact_tokens_and_request_id(
    vllm_pd: SimServer, http: aiohttp.ClientSession
) -> None:
    base = vllm_pd.url(1)
    body = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 12,
        # fields routers add: accepted and ignored
        "echo": False,
        "no_stop_trim": False,
        "ignore_eos": False,
        "skip_special_tokens": True,
        "return_hidden_states": False,
        "min_tokens": 1,
    }
    async with http.post(base + "/v1/completions", json=body, headers={"X-Request-Id": "req-1"}) as r:
        assert r.status == 200
        data = await r.json()
    assert data["id"] == "cmpl-req-1"
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"] == expected_text(body["prompt"], 12)
    assert data["usage"] == {
        "prompt_tokens": tokens.count_tokens(body["prompt"]),
        "completion_tokens": 12,
        "total_tokens": tokens.count_tokens(body["prompt"]) + 12,
        "prompt_tokens_details": None,
    }
    text = await metrics(http, base)
    assert sample(text, "vllm:generation_tokens_total", {"model_name": MODEL}) == 12
    assert sample(text, "vllm:request_success_total", {"finished_reason": "length"}) == 1
    assert sample(text, "vllm:time_to_first_token_seconds_count") == 1


async def test_chat_stream_with_usage(vllm_pd: SimServer, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "user", "content": "Say something"}]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(vllm_pd.url(1) + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    assert raw.endswith(sse.DONE)
    events = sse.parse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]][1:]
    assert len(content) == 7
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == chat_text(messages, 7)
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 6 + ["length"]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 7
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_chat_without_limit_stops_naturally(vllm_pd: SimServer, http: aiohttp.ClientSession) -> None:
    messages = [{"role": "user", "content": "free length"}]
    async with http.post(vllm_pd.url(1) + "/v1/chat/completions", json={"messages": messages}) as r:
        data = await r.json()
    n = tokens.natural_length(tokens.prompt_seed(tokens.tokenize(tokens.render_chat(messages))))
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == n
    assert data["choices"][0]["message"]["content"] == chat_text(messages, n)


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (b'{"prompt": ', 400, None),
        (b'{"prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
        (b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options"),
        (b'{"prompt": "x", "model": "other"}', 404, "model"),
        (b"[1, 2]", 400, None),
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),  # deeper than json.loads recurses
    ],
)
async def test_bad_requests_vllm_error_shape(
    vllm_pd: SimServer, http: aiohttp.ClientSession, raw: bytes, status: int, param: str | None
) -> None:
    async with http.post(
        vllm_pd.url(1) + "/v1/completions", data=raw, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == status
        err = (await r.json())["error"]
    assert err["code"] == status and err["param"] == param and isinstance(err["message"], str)
    assert err["type"] == ("BadRequestError" if status == 400 else "NotFoundError")


async def test_tokenize_render_models(vllm_pd: SimServer, http: aiohttp.ClientSession) -> None:
    base = vllm_pd.url(0)
    async with http.post(base + "/tokenize", json={"model": MODEL, "prompt": "hello there world"}) as r:
        tok = await r.json()
    assert tok["tokens"] == tokens.tokenize("hello there world") and tok["count"] == len(tok["tokens"])
    async with http.post(base + "/v1/completions/render", json={"model": MODEL, "prompt": "abc"}) as r:
        assert r.status == 200
        assert (await r.json())[0]["prompt_token_ids"] == tokens.tokenize("abc")
    async with http.get(base + "/v1/models") as r:
        assert (await r.json())["data"][0]["id"] == MODEL


async def test_nixl_handshake_in_process(vllm_pd: SimServer, http: aiohttp.ClientSession) -> None:
    p_url, d_url = vllm_pd.url(0), vllm_pd.url(1)
    prompt = "word " * 40  # 40 tokens -> 3 blocks of 16
    prefill_body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    async with http.post(p_url + "/v1/completions", json=prefill_body, headers={"X-Request-Id": "x1"}) as r:
        assert r.status == 200
        pre = await r.json()
    params = pre["kv_transfer_params"]
    p_engine = vllm_pd.engine("127.0.0.1", vllm_pd.ports[0])
    assert pre["choices"][0]["finish_reason"] == "length" and pre["usage"]["completion_tokens"] == 1
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == p_engine.engine_id
    # The side channel it serves (vLLM's default 5600 unless another process on this host holds it).
    assert params["remote_port"] == vllm_pd.side_channel_port
    assert params["remote_host"] == "127.0.0.1" and params["tp_size"] == 1
    assert len(params["remote_block_ids"][0]) == math.ceil(40 / 16)
    assert params["remote_request_id"].startswith("x1-")
    assert list(p_engine.leases) == [params["remote_request_id"]]
    assert p_engine.pool.used == 3
    text = await metrics(http, p_url)
    assert sample(text, "vllm:kv_cache_usage_perc") == pytest.approx(3 / BLIS_LLAMA31_8B_H100.num_kv_blocks)

    decode_body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, "kv_transfer_params": params}
    async with http.post(d_url + "/v1/completions", json=decode_body, headers={"X-Request-Id": "x1"}) as r:
        assert r.status == 200
        dec = await r.json()
    assert dec["choices"][0]["text"] == expected_text(prompt, 5)
    assert dec["id"] == "cmpl-x1"
    assert p_engine.leases == {} and p_engine.pool.used == 0
    d_text = await metrics(http, d_url)
    assert sample(d_text, "pdorch_sim_pd_handshakes_total", {"outcome": "kv_pulled"}) == 1
    assert sample(d_text, "vllm:nixl_xfer_time_seconds_count") == 1
    # Pulling the same blocks twice fails like vLLM's default kv_load_failure_policy=fail.
    async with http.post(d_url + "/v1/completions", json=decode_body) as r:
        assert r.status == 500


async def test_invalid_kv_params_fall_back_to_local_prefill(
    vllm_pd: SimServer, http: aiohttp.ClientSession
) -> None:
    body = {
        "prompt": "abc",
        "max_tokens": 3,
        "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": []},
    }
    async with http.post(vllm_pd.url(1) + "/v1/completions", json=body) as r:
        assert r.status == 200
        assert (await r.json())["choices"][0]["text"] == expected_text("abc", 3)
    text = await metrics(http, vllm_pd.url(1))
    assert sample(text, "pdorch_sim_pd_handshakes_total", {"outcome": "invalid_params"}) == 1
    assert sample(text, "pdorch_sim_pd_handshakes_total", {"outcome": "kv_pulled"}) == 0


async def test_unclaimed_lease_expires(http: aiohttp.ClientSession) -> None:
    async with SimServer(replace(FAST, kv_lease_s=0.2), host="127.0.0.1", ports=[0]) as server:
        body = {"prompt": "lease me", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        async with http.post(server.url() + "/v1/completions", json=body) as r:
            params = (await r.json())["kv_transfer_params"]
        engine = server.engine("127.0.0.1", server.ports[0])
        assert engine.pool.used > 0

        async def freed() -> bool:
            return engine.pool.used == 0 and not engine.leases

        await wait_until(freed, 10, "the lease to expire")
        async with http.post(
            server.url() + "/v1/completions",
            json={"prompt": "lease me", "max_tokens": 2, "kv_transfer_params": params},
        ) as r:
            assert r.status == 500
            assert "KV load failed" in (await r.json())["error"]["message"]


async def test_client_disconnect_aborts_and_frees(http: aiohttp.ClientSession) -> None:
    async with SimServer(replace(FAST, time_scale=1.0), host="127.0.0.1", ports=[0]) as server:
        body = {"prompt": "long one", "max_tokens": 5000, "stream": True}
        r = await http.post(server.url() + "/v1/completions", json=body)
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        r.close()  # drop the connection mid-stream
        engine = server.engine("127.0.0.1", server.ports[0])

        async def aborted() -> bool:
            text = await metrics(http, server.url())
            return sample(text, "vllm:request_success_total", {"finished_reason": "abort"}) == 1

        await wait_until(aborted, 10, "the abort to be counted")
        assert engine.pool.used == 0
        text = await metrics(http, server.url())
        assert sample(text, "vllm:num_requests_running") == 0


async def test_client_disconnect_non_streaming_aborts(http: aiohttp.ClientSession) -> None:
    async with SimServer(replace(FAST, time_scale=1.0), host="127.0.0.1", ports=[0]) as server:
        engine = server.engine("127.0.0.1", server.ports[0])
        task = asyncio.create_task(
            http.post(server.url() + "/v1/completions", json={"prompt": "p", "max_tokens": 5000})
        )

        async def running() -> bool:
            return engine.snapshot().running == 1

        await wait_until(running, 10, "the request to run")
        task.cancel()  # closes the connection; the server cancels the handler
        with pytest.raises(asyncio.CancelledError):
            await task

        async def aborted() -> bool:
            text = await metrics(http, server.url())
            return sample(text, "vllm:request_success_total", {"finished_reason": "abort"}) == 1

        await wait_until(aborted, 10, "the abort to be counted")
        assert engine.snapshot().running == 0 and engine.pool.used == 0


async def test_one_engine_per_local_ip(http: aiohttp.ClientSession) -> None:
    async with SimServer(FAST, host="0.0.0.0", ports=[0], roles={"127.0.0.2": Role.PREFILL}) as server:
        port = server.ports[0]
        for host in ("127.0.0.1", "127.0.0.2", "127.0.0.2"):
            async with http.post(
                f"http://{host}:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}
            ) as r:
                assert r.status == 200
        assert set(server.engines) == {f"127.0.0.1:{port}", f"127.0.0.2:{port}"}
        assert server.engines[f"127.0.0.2:{port}"].role is Role.PREFILL
        one = await metrics(http, f"http://127.0.0.1:{port}")
        two = await metrics(http, f"http://127.0.0.2:{port}")
        assert sample(one, "vllm:generation_tokens_total") == 2
        assert sample(two, "vllm:generation_tokens_total") == 4
        body = {"prompt": "hi", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        async with http.post(f"http://127.0.0.2:{port}/v1/completions", json=body) as r:
            assert (await r.json())["kv_transfer_params"]["remote_host"] == "127.0.0.2"


async def test_kv_capacity_makes_requests_wait(http: aiohttp.ClientSession) -> None:
    small = replace(BLIS_LLAMA31_8B_H100, num_kv_blocks=4)  # 64 tokens
    async with SimServer(
        replace(FAST, coefficients=small, time_scale=0.5), host="127.0.0.1", ports=[0]
    ) as server:
        body = {"prompt": "a b c d e f g h", "max_tokens": 40}  # 48 tokens -> 3 blocks
        engine = server.engine("127.0.0.1", server.ports[0])
        tasks = [
            asyncio.create_task(http.post(server.url() + "/v1/completions", json=body)) for _ in range(2)
        ]

        async def one_waits() -> bool:
            snap = engine.snapshot()
            return snap.running == 1 and snap.waiting == 1

        await wait_until(one_waits, 10, "the second request to queue for KV")
        for t in tasks:
            resp = await t
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 40
        async with http.post(server.url() + "/v1/completions", json={"prompt": "x", "max_tokens": 100}) as r:
            assert r.status == 400  # can never fit in 64 KV tokens


# -- SGLang ---------------------------------------------------------------------------------------------


@pytest.fixture
async def sglang_pd() -> AsyncIterator[SimServer]:
    cfg = replace(FAST, protocol="sglang", bootstrap_timeout_s=0.3, waiting_timeout_s=0.3)
    server = SimServer(
        cfg, host="127.0.0.1", ports=[0, 0], role=Role.DECODE, bootstrap_port=0, serve_bootstrap=True
    )
    await server.start()
    server.roles = {f"127.0.0.1:{server.ports[0]}": Role.PREFILL}
    yield server
    await server.stop()


def room_body(server: SimServer, room: int, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": server.bootstrap_port,
        "bootstrap_room": room,
        **extra,
    }


async def test_sglang_bootstrap_pair(sglang_pd: SimServer, http: aiohttp.ClientSession) -> None:
    p_url, d_url = sglang_pd.url(0), sglang_pd.url(1)
    body = room_body(sglang_pd, 12345, prompt="sglang prompt here", max_tokens=6, stream=True)
    p_req = http.post(p_url + "/v1/completions", json=body)
    d_req = http.post(d_url + "/v1/completions", json=body)
    p_resp, d_resp = await asyncio.gather(p_req, d_req)
    assert p_resp.status == 200 and d_resp.status == 200
    d_events = sse.parse_events(await d_resp.read())
    p_events = sse.parse_events(await p_resp.read())
    assert d_events[-1] == "[DONE]" and p_events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in d_events[:-1]) == expected_text(body["prompt"], 6)
    assert len(p_events) == 2  # the prefill answers with its single token
    p_text, d_text = await metrics(http, p_url), await metrics(http, d_url)
    assert sample(p_text, "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_pushed"}) == 1
    assert sample(d_text, "pdorch_sim_pd_handshakes_total", {"outcome": "decode_matched"}) == 1
    assert sample(p_text, "sglang:prompt_tokens_total", {"engine_type": "prefill"}) == tokens.count_tokens(
        body["prompt"]
    )
    assert sample(d_text, "sglang:generation_tokens_total", {"engine_type": "decode"}) == 6
    # The room is spent: reusing it is refused.
    async with http.post(p_url + "/v1/completions", json=body) as r:
        assert r.status == 400
        assert (await r.json())["object"] == "error"


async def test_sglang_prefill_times_out_without_decode(
    sglang_pd: SimServer, http: aiohttp.ClientSession
) -> None:
    body = room_body(sglang_pd, 1, prompt="alone", max_tokens=3)
    async with http.post(sglang_pd.url(0) + "/v1/completions", json=body) as r:
        assert r.status == 500
        assert "timed out" in (await r.json())["message"]
    text = await metrics(http, sglang_pd.url(0))
    assert sample(text, "sglang:num_bootstrap_failed_reqs_total") == 1
    assert sample(text, "sglang:num_aborted_requests_total") == 1


async def test_sglang_prefill_cancelled_while_bootstrapping(http: aiohttp.ClientSession) -> None:
    cfg = replace(FAST, protocol="sglang", bootstrap_timeout_s=60)
    async with SimServer(cfg, host="127.0.0.1", ports=[0], role=Role.PREFILL, bootstrap_port=0) as server:
        body = room_body(server, 3, prompt="leave early", max_tokens=3)
        engine = server.engine("127.0.0.1", server.ports[0])
        task = asyncio.create_task(http.post(server.url() + "/v1/completions", json=body))

        async def waiting() -> bool:
            return engine.bootstrap_waiting == 1

        await wait_until(waiting, 10, "the prefill to wait for its decode")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def aborted() -> bool:
            return sample(await metrics(http, server.url()), "sglang:num_aborted_requests_total") == 1

        await wait_until(aborted, 10, "the abort to be counted")
        room = bootstrap.RENDEZVOUS.rooms[("127.0.0.1", server.bootstrap_port or 0, 3)]
        assert room.status == "failed"  # a decode arriving now fails fast instead of waiting
        text = await metrics(http, server.url())
        assert sample(text, "sglang:num_bootstrap_failed_reqs_total") == 0  # cancelled, not timed out


async def test_sglang_decode_times_out_without_prefill(
    sglang_pd: SimServer, http: aiohttp.ClientSession
) -> None:
    body = room_body(sglang_pd, 2, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    async with http.post(sglang_pd.url(1) + "/v1/chat/completions", json=body) as r:
        assert r.status == 500
    text = await metrics(http, sglang_pd.url(1))
    assert sample(text, "sglang:num_bootstrap_failed_reqs_total") == 1
    assert sample(text, "sglang:num_aborted_requests_total") == 1


async def test_sglang_pd_roles_refuse_requests_without_a_room(
    sglang_pd: SimServer, http: aiohttp.ClientSession
) -> None:
    # SGLang's scheduler in disaggregation mode aborts such a request with 400 at once: no wait.
    for i in (0, 1):
        async with http.post(
            sglang_pd.url(i) + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
        ) as r:
            assert r.status == 400
            err = await r.json()  # SGLang's error shape: no "error" wrapper
        assert "without bootstrap room id" in err["message"] and err["param"] == "bootstrap_room"


async def test_sglang_bootstrap_server_routes(sglang_pd: SimServer, http: aiohttp.ClientSession) -> None:
    base = f"http://127.0.0.1:{sglang_pd.bootstrap_port}"
    async with http.get(base + "/health") as r:
        assert r.status == 200
    async with http.get(base + "/route") as r:
        assert (await r.json())["page_size"] == 16


async def test_sglang_rendezvous_over_the_websocket(sglang_pd: SimServer) -> None:
    # The WebSocket rendezvous a decode in another process uses (called directly: in this process the
    # decode would take the in-process path).
    port = sglang_pd.bootstrap_port or 0
    client = bootstrap.RendezvousClient()
    try:
        # Nobody prefills room 99: the decode's wait times out, and the room stays connected.
        with pytest.raises(bootstrap.BootstrapError, match="timed out"):
            await client.connect_and_wait(("127.0.0.1", port, 99), 0.05)
        with pytest.raises(bootstrap.BootstrapError, match="duplicate") as refused:
            await client.connect_and_wait(("127.0.0.1", port, 99), 1.0)
        assert refused.value.status == 400
        # A room the prefill pushes: the wait returns; one it fails: the error names the prefill's reason.
        for room, error in ((100, None), (101, "prefill aborted")):
            key = ("127.0.0.1", port, room)
            bootstrap.RENDEZVOUS.register_prefill(key)
            waiting = asyncio.create_task(client.connect_and_wait(key, 5.0))

            async def connected(k: bootstrap.RoomKey = key) -> bool:
                return bootstrap.RENDEZVOUS.rooms[k].decode_connected.is_set()

            await wait_until(connected, 5.0, "the decode to connect")
            assert not waiting.done()
            bootstrap.RENDEZVOUS.finish(key, error)
            if error is None:
                await waiting
            else:
                with pytest.raises(bootstrap.BootstrapError, match="prefill aborted"):
                    await waiting
        # A room that ended before its decode connected is answered at once.
        key = ("127.0.0.1", port, 102)
        bootstrap.RENDEZVOUS.register_prefill(key)
        bootstrap.RENDEZVOUS.finish(key, "bootstrap timed out")
        with pytest.raises(bootstrap.BootstrapError, match="bootstrap timed out"):
            await client.connect_and_wait(key, 5.0)
    finally:
        await client.close()
    # A server that is not there is named in the error.
    nowhere = bootstrap.RendezvousClient()
    with pytest.raises(bootstrap.BootstrapError, match="unreachable"):
        await nowhere.connect_and_wait(("127.0.0.1", 9, 1), 2.0)
    await nowhere.close()


async def test_an_engine_stopped_with_no_grace_cuts_its_streams(http: aiohttp.ClientSession) -> None:
    """PodBackends stops a deleted pod's engine with shutdown_timeout_s=0 to kill it at once; aiohttp
    read 0 as "wait for every handler", so the engine served its streams to the end and no test
    could see a request that a kill or a scale-down cut."""
    server = SimServer(
        replace(FAST, time_scale=1.0), host="127.0.0.1", ports=[0], role=Role.BOTH, shutdown_timeout_s=0.0
    )
    await server.start()
    got: list[str] = []

    async def stream() -> None:
        body = {"model": MODEL, "prompt": "x " * 20, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with http.post(server.url(0) + "/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    got.append(line.decode())

    task = asyncio.create_task(stream())

    async def streaming() -> bool:
        return len(got) >= 3

    await wait_until(streaming, 10, "the stream under way")
    await asyncio.wait_for(server.stop(), 5)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(task, 5)
    assert len(got) < 2000


async def test_an_engine_with_a_shutdown_timeout_finishes_its_streams_behind_a_closed_listener(
    http: aiohttp.ClientSession,
) -> None:
    """vLLM's --shutdown-timeout, as a replaced dev-cluster pod's engine uses it: `stop` closes the
    listener at once, so a successor binds the same address (kwok hands the IP on), while the stream
    in flight runs to its end on its open connection; a drain shorter than the stream cuts it."""
    cfg = replace(FAST, time_scale=1.0)
    server = SimServer(cfg, host="127.0.0.1", ports=[0], role=Role.BOTH, shutdown_timeout_s=30.0)
    await server.start()
    port = server.ports[0]
    got: list[bytes] = []

    async def stream(base: str, max_tokens: int) -> None:
        body = {
            "model": MODEL,
            "prompt": "x " * 20,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        async with http.post(base + "/v1/completions", json=body) as r:
            assert r.status == 200
            async for line in r.content:
                if line.startswith(b"data: "):
                    got.append(line.strip())

    task = asyncio.create_task(stream(server.url(0), 60))

    async def streaming() -> bool:
        return len(got) >= 3

    await wait_until(streaming, 10, "the stream under way")
    stopping = asyncio.create_task(server.stop())

    async def refused() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionError:  # refused, or reset while the listener closed
            return True
        writer.close()
        return False

    await wait_until(refused, 5, "the listener closed")
    successor = SimServer(FAST, host="127.0.0.1", ports=[port], role=Role.BOTH)
    await successor.start()
    try:
        async with http.post(
            successor.url(0) + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
        ) as r:
            assert r.status == 200
        assert successor.engines, "the successor served the new request"
        await asyncio.wait_for(task, 20)
        await asyncio.wait_for(stopping, 5)
    finally:
        await successor.stop()
    assert got[-1] == b"data: [DONE]" and len(got) == 60 + 1  # every token, then the end

    short = SimServer(cfg, host="127.0.0.1", ports=[0], role=Role.BOTH, shutdown_timeout_s=0.3)
    await short.start()
    got.clear()
    task = asyncio.create_task(stream(short.url(0), 2000))
    await wait_until(streaming, 10, "the long stream under way")
    await asyncio.wait_for(short.stop(), 5)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(task, 5)
    assert b"data: [DONE]" not in got


async def test_a_draining_engine_closes_its_idle_keep_alive_connections_at_once(
    http: aiohttp.ClientSession,
) -> None:
    """A request sent on an idle kept-alive connection of a draining engine gets a closed connection
    at once, so its client reconnects (to the pod's successor): aiohttp's `pre_shutdown` left the
    socket open and swallowed the request until the drain ended (review helper-77)."""
    cfg = replace(FAST, time_scale=1.0)
    server = SimServer(cfg, host="127.0.0.1", ports=[0], role=Role.BOTH, shutdown_timeout_s=60.0)
    await server.start()
    req = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    raw = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    raw += b"Content-Length: %d\r\n\r\n" % len(req) + req
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports[0])
    writer.write(raw)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    long = await http.post(server.url(0) + "/v1/completions", json=body)  # keeps the drain going ~40 s
    stopping = asyncio.create_task(server.stop())
    try:
        await asyncio.sleep(0.2)
        assert server.in_flight == 1
        with contextlib.suppress(ConnectionError):
            writer.write(raw)
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF long before the drain's end
        assert b"HTTP/1.1 200" not in rest.split(b"\r\n\r\n", 1)[-1], (
            "the draining engine served a new request"
        )
    finally:
        long.close()
        await asyncio.wait_for(stopping, 10)
        writer.close()


def test_a_bootstrap_address_shared_by_a_draining_engine_and_its_successor_stays_known() -> None:
    bootstrap.add_local_server("127.9.0.1", 8998)  # the draining engine
    bootstrap.add_local_server("127.9.0.1", 8998)  # its successor on the same pod IP
    bootstrap.remove_local_server("127.9.0.1", 8998)  # the drain ends
    assert bootstrap.is_local("127.9.0.1", 8998)
    bootstrap.remove_local_server("127.9.0.1", 8998)
    assert not bootstrap.is_local("127.9.0.1", 8998)
