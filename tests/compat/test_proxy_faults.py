"""The proxy under engine and client faults: every failure reaches the client as an explicit error.

Faults are real where they can be (a `pdorch sim` process SIGKILLed mid-stream, raw sockets that
trickle headers, 10,000 real idle TCP connections to a `pdorch proxy` process) and injected through the
sim's fault knobs otherwise (`pdorch.sim.faults`: error status, hang, stall mid-stream). Every wait is
bounded; times printed with ``-s`` are informational (docs/reliability.md), never asserted as speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pdorch.proxy.config import ProxyConfig
from pdorch.proxy.discovery import StaticDiscovery, static_endpoints
from pdorch.proxy.endpoints import EndpointSet
from pdorch.proxy.server import ProxyServer
from pdorch.sim.engine import Role
from pdorch.sim.faults import Faults
from pdorch.sim.server import SimServer
from tests.compat.helpers import free_port, sample, serve_app, spawn, stop, wait_http_ok, wait_until
from tests.compat.test_proxy import FAST, MODEL, WAIT_S, expected_text, stack, text_of

pytestmark = pytest.mark.compat

SLOW = replace(FAST, time_scale=1.0)  # ~10 ms per decode step: a 2000-token stream lasts ~20 s


def report(what: str, **numbers: float | int | str) -> None:
    """One greppable line of measured numbers (informational; see docs/reliability.md)."""
    print(f"[reliability] {what}: " + json.dumps(numbers), flush=True)


def sse_events(raw: bytes) -> list[bytes]:
    """The data payloads of an SSE byte stream."""
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


def error_events(raw: bytes) -> list[dict[str, object]]:
    """The error objects among an SSE stream's events."""
    out = []
    for ev in sse_events(raw):
        if ev.startswith(b"{") and b'"error"' in ev:
            out.append(json.loads(ev)["error"])
    return out


async def answered_in_full(http: aiohttp.ClientSession, url: str, prompts: list[str]) -> None:
    """Each prompt, one after the other, gets a 200 with the simulated engine's text for it."""
    for prompt in prompts:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
        async with http.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["text"] == expected_text(prompt, 3)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as s:
        yield s


@contextlib.asynccontextmanager
async def sim_process(
    tmp_path: Path, ports: tuple[int, int], name: str
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A `pdorch sim` process (vLLM) with a prefill and a decode port, slow enough to catch mid-stream."""
    p, d = ports
    roles = tmp_path / f"{name}-roles.json"
    roles.write_text(json.dumps({f"127.0.0.1:{p}": "prefill", f"127.0.0.1:{d}": "decode"}))
    cmd = [sys.executable, "-m", "pdorch.cli", "sim", "--host", "127.0.0.1", "--model", MODEL]
    cmd += ["--port", str(p), "--port", str(d), "--role-map", str(roles), "--time-scale", "1.0"]
    log = tmp_path / f"{name}.log"
    proc = spawn(cmd, log)
    try:
        for port in ports:
            wait_http_ok(f"http://127.0.0.1:{port}/health", WAIT_S, proc, log)
        yield proc
    finally:
        stop(proc)


# -- an engine killed mid-stream -------------------------------------------------------------------------


async def test_engine_killed_mid_stream_ends_the_stream_with_an_error_event(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    ports = (free_port(), free_port())
    urls = tuple(f"http://127.0.0.1:{p}" for p in ports)
    pc = ProxyConfig(
        engine="vllm",
        host="127.0.0.1",
        port=0,
        prefill=(urls[0],),
        decode=(urls[1],),
        health_interval_s=0.5,
        breaker_cooldown_s=1.0,
    )
    px = ProxyServer(pc, StaticDiscovery(static_endpoints(pc.prefill, pc.decode, None)))
    await px.start()
    base = f"http://127.0.0.1:{px.port}"
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 2000, "stream": True}
    try:
        async with sim_process(tmp_path, ports, "sim-a") as proc:
            async with http.post(base + "/v1/completions", json=body) as r:
                assert r.status == 200
                got = await r.content.readany()
                assert got.startswith(b"data: ")
                os.killpg(proc.pid, signal.SIGKILL)
                t_kill = time.monotonic()
                async with asyncio.timeout(10):
                    rest = await r.read()  # must end, not hang
                t_err = time.monotonic() - t_kill
            errs = error_events(got + rest)
            assert len(errs) == 1, (got + rest)[-500:]
            assert errs[0]["code"] == 502 and "decode stream interrupted" in str(errs[0]["message"])
            # Then the stream's end, as vLLM ends its own streams on an error.
            events = sse_events(got + rest)
            assert events[-1] == b"[DONE]" and b'"error"' in events[-2], events[-2:]

        # With the only pair dead, new requests fail fast with a JSON error (no hang).
        t0 = time.monotonic()
        async with http.post(base + "/v1/completions", json={**body, "stream": False}) as r:
            assert r.status in (502, 503)
            err = (await r.json())["error"]
            assert err["message"] and err["type"] in ("upstream_error", "service_unavailable")
        t_fail = time.monotonic() - t0

        # Restart the engine on the same ports: the proxy recovers without a restart of its own.
        async with sim_process(tmp_path, ports, "sim-b"):
            t_up = time.monotonic()
            ok = False
            while time.monotonic() - t_up < WAIT_S:
                async with http.post(
                    base + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}
                ) as r:
                    if r.status == 200:
                        ok = True
                        break
                await asyncio.sleep(0.1)
            t_recover = time.monotonic() - t_up
            assert ok, "proxy did not recover after the engine came back"
        report(
            "engine SIGKILL mid-stream",
            error_event_after_s=round(t_err, 3),
            next_request_error_after_s=round(t_fail, 3),
            recovered_after_restart_s=round(t_recover, 3),
        )
    finally:
        await px.stop()


# -- a prefill answering 5xx ------------------------------------------------------------------------------


async def test_prefill_5xx_is_retried_on_another_pair_or_answered_502(http: aiohttp.ClientSession) -> None:
    good = SimServer(replace(FAST, protocol="vllm"), host="127.0.0.1", ports=[0], role=Role.PREFILL)
    await good.start()
    failing = replace(FAST, faults=Faults(roles=frozenset({"prefill"}), status=500))
    try:
        async with stack(
            "vllm", sim_config=failing, extra_prefill=(good.url(0),), policy="round_robin", max_retries=2
        ) as s:
            await answered_in_full(http, s.url, [f"retry me {i}" for i in range(8)])
            text = await text_of(http, s.url)
            retried = sample(
                text, "pdorch_proxy_retries_total", {"endpoint": s.prefill_url, "reason": "http_500"}
            )
            assert retried >= 1
            assert sample(text, "pdorch_proxy_requests_total", {"status": "200"}) == 8
            report("prefill HTTP 500 (one of two prefills)", requests=8, ok=8, retries=int(retried))
    finally:
        await good.stop()

    # Every prefill failing: an explicit 502 JSON naming the upstream failure, after the retries.
    async with stack("vllm", sim_config=failing, max_retries=1) as s:
        t0 = time.monotonic()
        async with http.post(
            s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}
        ) as r:
            assert r.status == 502
            err = (await r.json())["error"]
        assert err["code"] == "upstream_failed" and "HTTP 500" in err["message"]
        report("every prefill HTTP 500", status=502, answered_after_s=round(time.monotonic() - t0, 3))


async def test_a_half_open_vllm_decode_takes_one_probe_not_every_request_routed_meanwhile(
    http: aiohttp.ClientSession,
) -> None:
    """A vLLM decode leg starts only after its prefill. A decode whose breaker just turned half-open
    must still count the probe routed to it from the moment it is chosen: otherwise every request
    routed during that probe's prefill is a probe too, and fails with it."""
    sick = replace(FAST, time_scale=30.0, faults=Faults(roles=frozenset({"decode"}), status=500))
    async with stack("vllm", sim_config=sick, breaker_failures=1, breaker_cooldown_s=0.5, max_retries=0) as s:
        body = {"model": MODEL, "prompt": " ".join(["abc"] * 1000), "max_tokens": 2}

        async def post() -> int:
            async with http.post(s.url + "/v1/completions", json=body) as r:
                await r.read()
                return r.status

        assert await post() == 502  # opens the decode's breaker
        await asyncio.sleep(0.6)  # its cooldown is over: one probe at a time
        statuses = await asyncio.gather(*(post() for _ in range(8)))
        errors = sample(
            await text_of(http, s.url), "pdorch_proxy_endpoint_errors_total", {"endpoint": s.decode_url}
        )
        assert errors == 2, (errors, statuses)  # the first request's and the probe's
        assert sorted(statuses) == [502] + [503] * 7, statuses


@contextlib.asynccontextmanager
async def raw_engine(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A loopback TCP server whose every connection `handle` answers byte by byte: its URL."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@contextlib.asynccontextmanager
async def head_then_silence_server() -> AsyncIterator[str]:
    """Answers every request with a 200 head announcing a body, then sends nothing more."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            await writer.drain()
            await reader.read()  # until the proxy gives up and closes
        writer.close()

    async with raw_engine(handle) as url:
        yield url


async def test_a_decode_silent_after_its_head_is_failed_at_the_idle_limit_and_retried(
    http: aiohttp.ClientSession,
) -> None:
    """A non-streamed answer's head means its body is due: a decode that then goes silent is an
    engine failure after the stream idle limit (marked against it, retried on another decode), not
    a wait for the whole request timeout charged to the client."""
    async with (
        head_then_silence_server() as silent,
        stack(
            "vllm",
            extra_decode=(silent,),
            policy="round_robin",
            stream_idle_timeout_s=0.5,
            request_timeout_s=60.0,
            health_timeout_s=0.3,
            max_retries=2,
        ) as s,
    ):
        await answered_in_full(http, s.url, [f"say something {i}" for i in range(4)])
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_retries_total", {"endpoint": silent, "reason": "idle_timeout"}) >= 1
        assert sample(text, "pdorch_proxy_request_timeouts_total", {"phase": "before_first_byte"}) in (
            None,
            0,
        )


@pytest.mark.parametrize("how", ["http_500", "first_byte_timeout"])
async def test_an_sglang_prefill_failing_after_its_decode_answered_counts_against_it(
    http: aiohttp.ClientSession, how: str
) -> None:
    """SGLang runs both legs at once, and the client's answer comes from the decode. A prefill that
    pushed its KV and then answered 500, or went silent past its first-byte budget, did not hurt
    this request, but it is a failing engine: its failure is counted, and feeds its breaker, like
    any other."""
    prefill = SimServer(
        replace(FAST, protocol="sglang"), host="127.0.0.1", ports=[0], role=Role.PREFILL, bootstrap_port=0
    )
    await prefill.start()

    async def forward_then_500(request: web.Request) -> web.Response:
        async with http.post(prefill.url(0) + request.path, data=await request.read()) as r:
            await r.read()
        await asyncio.sleep(0.5 if how == "http_500" else 3)  # the decode (3 tokens) answered by then
        return web.json_response({"error": {"message": "failed after the KV went out"}}, status=500)

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward_then_500)
    try:
        async with (
            serve_app(app) as late,
            stack(
                "sglang",
                prefill=(f"{late}#{prefill.bootstrap_port}",),
                breaker_failures=100,
                first_byte_timeout_s=1.0,
            ) as s,
        ):
            await answered_in_full(http, s.url, [f"late failure {i}" for i in range(3)])

            async def counted() -> bool:
                text = await text_of(http, s.url)
                return (
                    sample(text, "pdorch_proxy_endpoint_errors_total", {"endpoint": late, "reason": how}) == 3
                )

            await wait_until(counted, WAIT_S, "three prefill failures counted")
    finally:
        await prefill.stop()


@pytest.mark.parametrize("stream", [True, False])
async def test_a_decode_answering_200_with_nothing_is_retried_not_relayed(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    """An empty 2xx body is no completion and no event stream: the client would get an empty
    success (no data, no [DONE], no error). It is a failed leg, retried on another decode."""

    async def empty(_: web.Request) -> web.Response:
        return web.Response(
            status=200, body=b"", content_type="text/event-stream" if stream else "application/json"
        )

    app = web.Application()
    app.router.add_post("/{tail:.*}", empty)
    async with serve_app(app) as hollow, stack("vllm", extra_decode=(hollow,), policy="round_robin") as s:
        for i in range(4):
            prompt = f"anything {i}"
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": stream}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                raw = await r.read()
            if stream:
                assert sse_events(raw)[-1] == b"[DONE]", raw
            else:
                assert json.loads(raw)["choices"][0]["text"] == expected_text(prompt, 3)
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_retries_total", {"endpoint": hollow, "reason": "empty"}) >= 1


@pytest.mark.parametrize("stream", [True, False])
async def test_an_engines_non_json_4xx_reaches_the_client_as_a_json_error(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    """A 404 page from whatever answers in front of an engine (an ingress, a wrong path) was relayed
    as HTML, which clients that parse every error as JSON choke on (review helper-72). The proxy now
    wraps it in its JSON error, keeping the status and the page's text; a JSON 4xx is relayed as is."""

    async def html_404(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        if "nested" in prompt:  # valid JSON a recursive parser cannot read: was an uncaught error
            return web.Response(
                status=400, body=b"[" * 30_000 + b"]" * 30_000, content_type="application/json"
            )
        if "json" in prompt:
            return web.json_response({"detail": "engine's own refusal"}, status=422)
        return web.Response(
            status=404, text="<html><body><h1>404 Not Found</h1></body></html>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_post("/{tail:.*}", html_404)
    async with serve_app(app) as wrong, stack("vllm", decode=(wrong,)) as s:
        body = {"model": MODEL, "prompt": "anything", "max_tokens": 3, "stream": stream}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 404
            assert r.content_type == "application/json"
            err = (await r.json())["error"]
        assert err["code"] == "upstream_error" and "404 Not Found" in err["message"], err
        assert "decode engine answered HTTP 404" in err["message"], err
        body["prompt"] = "a nested answer"
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 400 and r.content_type == "application/json"
            assert (await r.json())["error"]["code"] == "upstream_error"
        # A JSON 4xx of the engine itself passes unchanged.
        body["prompt"] = "a json answer"
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 422 and await r.json() == {"detail": "engine's own refusal"}


@contextlib.asynccontextmanager
async def close_delimited_decode(
    cut: bool, end: tuple[bytes, ...] = (b"data: [DONE]\n\n",)
) -> AsyncIterator[str]:
    """A decode answering HTTP/1.1 200 with neither Content-Length nor chunking (the body ends at
    its close, as an HTTP/1.0-style hop sends it): whole, or cut after the first event or a prefix
    of the JSON with a clean close, which is how a crashed engine's answer ends on such a hop. A
    whole stream ends with `end`, each part written (and flushed) on its own."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                stream = json.loads(await reader.readexactly(length)).get("stream", False)
                event = b'data: {"choices":[{"index":0,"text":"one","finish_reason":null}]}\n\n'
                answer = (
                    b'{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"one two"}]}'
                )
                if stream:
                    body = event
                else:
                    body = answer[:40] if cut else answer
                ct = b"text/event-stream" if stream else b"application/json"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: " + ct + b"\r\nConnection: close\r\n\r\n" + body
                )
                for part in end if stream and not cut else ():
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(part)
            await writer.drain()
        writer.close()

    async with raw_engine(handle) as url:
        yield url


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("cut", [True, False])
async def test_an_answer_ended_by_the_engines_close_is_relayed_only_when_whole(
    http: aiohttp.ClientSession, stream: bool, cut: bool
) -> None:
    """Without a length or chunking, only the body tells a whole answer from a cut one (helper-85:
    a cut one was relayed as a 200 success). A whole one is relayed; a cut stream ends with an
    error event, a cut JSON answer is a 502."""
    async with close_delimited_decode(cut) as decode, stack("vllm", decode=(decode,), max_retries=0) as s:
        body = {"model": MODEL, "prompt": "anything", "max_tokens": 2, "stream": stream}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            raw = await r.read()
            status = r.status
    if stream:
        assert status == 200
        assert sse_events(raw)[-1] == b"[DONE]", raw
        errors = error_events(raw)
        if cut:
            assert len(errors) == 1 and "closed the connection before the end" in str(errors[0]["message"])
        else:
            assert errors == [] and b'"text":"one"' in raw
    elif cut:
        assert status == 502 and "closed the connection before the end" in json.loads(raw)["error"]["message"]
    else:
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == "one two"


@pytest.mark.parametrize(
    "end",
    [(b"data: ", b"[DONE]", b"\n\n"), (b"data:[DONE]\n\n",)],
    ids=["marker in three writes", "marker without a space"],
)
async def test_a_whole_stream_ended_by_the_engines_close_is_relayed_whatever_its_writes(
    http: aiohttp.ClientSession, end: tuple[bytes, ...]
) -> None:
    """The end marker split over writes, or written without the optional space, is still the end
    (helper-88: the check read the last two chunks only, and needed the space, and sent a false
    error event after a whole answer)."""
    async with (
        close_delimited_decode(False, end) as decode,
        stack("vllm", decode=(decode,), max_retries=0) as s,
    ):
        body = {"model": MODEL, "prompt": "anything", "max_tokens": 2, "stream": True}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            raw = await r.read()
            assert r.status == 200
    assert error_events(raw) == [] and raw.endswith(b"".join(end)), raw


# -- a decode that hangs ------------------------------------------------------------------------------------


async def test_decode_hanging_before_headers_gets_504(http: aiohttp.ClientSession) -> None:
    # Streamed, the first-byte timeout applies. Non-streamed, the first byte is its last; the decode's
    # standing token counters fail it after that timeout (-k wedged), else the request timeout would
    # (tests/compat/test_proxy.py -k non_streamed_answer_is_bounded).
    hang = replace(FAST, faults=Faults(roles=frozenset({"decode"}), hang=True))
    async with stack("vllm", sim_config=hang, first_byte_timeout_s=1.0) as s:
        async with http.post(
            s.url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 5}
        ) as r:
            assert r.status == 502  # after the retries, each on the only (wedged) decode
            err = (await r.json())["error"]
        assert err["code"] == "upstream_failed" and "token counters stood still" in err["message"]
        for stream in (True,):
            t0 = time.monotonic()
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 5, "stream": stream}
            async with http.post(s.url + "/v1/completions", json=body) as r:
                assert r.status == 504
                err = (await r.json())["error"]
            took = time.monotonic() - t0
            assert err["code"] == "upstream_timeout" and "decode" in err["message"]
            assert took < 10
            report(
                "decode hangs before headers", stream=str(stream), status=504, answered_after_s=round(took, 3)
            )
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_endpoint_errors_total", {"reason": "first_byte_timeout"}) == 1
        assert sample(text, "pdorch_proxy_endpoint_errors_total", {"reason": "no_progress"}) == 3


async def test_a_non_streamed_answer_from_a_wedged_vllm_decode_is_retried_on_another(
    http: aiohttp.ClientSession,
) -> None:
    """A decode that accepts requests and never answers, while its /health and /metrics still do: a
    non-streamed answer sends nothing until it is done, so only the engine's standing token counters
    show it is wedged. Without the progress check these requests wait for the 30 s request timeout
    (and the client gives up first). A draining decode leaves discovery but still serves its answers:
    its progress is still read (from the URL the wait was registered with)."""
    hung = SimServer(replace(FAST, faults=Faults(hang=True)), host="127.0.0.1", ports=[0])
    await hung.start()
    try:
        async with stack(
            "vllm", extra_decode=(hung.url(0),), first_byte_timeout_s=0.5, request_timeout_s=30.0
        ) as s:

            async def one(i: int) -> tuple[int, str]:
                body = {"model": MODEL, "prompt": f"wedged {i}", "max_tokens": 4, "stream": False}
                async with http.post(s.url + "/v1/completions", json=body) as r:
                    return r.status, (await r.json())["choices"][0]["text"] if r.status == 200 else ""

            t0 = time.monotonic()
            got = await asyncio.gather(*(one(i) for i in range(4)))
            took = time.monotonic() - t0
            assert got == [(200, expected_text(f"wedged {i}", 4)) for i in range(4)]
            text = await text_of(http, s.url)
            stalled = {"endpoint": hung.url(0), "reason": "no_progress"}
            assert (sample(text, "pdorch_proxy_endpoint_errors_total", stalled) or 0) >= 1
            assert (sample(text, "pdorch_proxy_retries_total", stalled) or 0) >= 1
            assert sample(text, "pdorch_proxy_endpoint_inflight") == 0
            report("non-streamed answer on a wedged decode", retried_and_answered_after_s=round(took, 3))
    finally:
        await hung.stop()


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
async def test_a_long_non_streamed_generation_that_progresses_is_not_cut(
    http: aiohttp.ClientSession, protocol: str
) -> None:
    """The progress check must not fail a generation that keeps making tokens, however much longer
    than the limit it runs (the engine's counters move while it works)."""
    async with stack(protocol, sim_config=SLOW, first_byte_timeout_s=0.4) as s:
        body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 500, "stream": False}
        t0 = time.monotonic()
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["completion_tokens"] == 500
        took = time.monotonic() - t0
        assert took > 3 * 0.4  # it did outlast the limit several times over (a check of the setup)
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_endpoint_errors_total") in (None, 0)
        report(
            "long non-streamed generation under a 0.4 s limit",
            protocol=protocol,
            answered_after_s=round(took, 3),
        )


async def test_a_non_streamed_answer_on_an_sglang_decode_that_stalls_is_failed(
    http: aiohttp.ClientSession,
) -> None:
    """SGLang: the prefill answered, then the decode stopped making tokens (its /health and /metrics
    still answer). Its `sglang:realtime_tokens_total` stands still, so the leg fails and is retried;
    with the only decode stalling every time, the client gets a 502 well before the request timeout
    (30 s, which the client's own 20 s limit would not wait for)."""
    stall = replace(FAST, faults=Faults(roles=frozenset({"decode"}), stall_after_tokens=3))
    async with stack("sglang", sim_config=stall, first_byte_timeout_s=0.5, request_timeout_s=30.0) as s:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 50, "stream": False}
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 502, await r.text()
            assert "token counters stood still" in (await r.json())["error"]["message"]
        text = await text_of(http, s.url)
        stalled = {"endpoint": s.decode_url, "reason": "no_progress"}
        assert sample(text, "pdorch_proxy_endpoint_errors_total", stalled) == 3
        assert sample(text, "pdorch_proxy_endpoint_inflight") == 0


async def test_a_long_non_streamed_generation_on_a_draining_decode_is_not_cut(
    http: aiohttp.ClientSession,
) -> None:
    """A decode the scaler drains leaves discovery while its answers finish there: its progress must
    still be read (from the URL its waits were registered with), not taken for a stand-still."""
    other = SimServer(SLOW, host="127.0.0.1", ports=[0])
    await other.start()
    try:
        async with stack(
            "vllm", sim_config=SLOW, extra_decode=(other.url(0),), first_byte_timeout_s=0.4
        ) as s:
            px = s.proxy
            body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 500, "stream": False}
            pending = asyncio.ensure_future(http.post(s.url + "/v1/completions", json=body))

            async def on_a_decode() -> bool:
                return any(px.loads.get(e.key) for e in px.discovery.current().decodes())

            await wait_until(on_a_decode, 5.0, "the decode leg")
            await asyncio.sleep(0.3)  # past half the limit: the decode's counters have been read
            (busy,) = [e for e in px.discovery.current().decodes() if px.loads.get(e.key)]
            assert isinstance(px.discovery, StaticDiscovery)
            px.discovery._endpoints = EndpointSet(
                tuple(e for e in px.discovery.current().endpoints if e != busy)
            )
            async with await pending as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["usage"]["completion_tokens"] == 500
            text = await text_of(http, s.url)
            assert sample(text, "pdorch_proxy_endpoint_errors_total") in (None, 0)
    finally:
        await other.stop()


async def test_the_progress_check_reads_engines_that_would_compress_their_metrics() -> None:
    """prometheus_client's own exporters gzip /metrics when the client accepts it; the proxy's
    session does not decompress, so it must ask for the page uncompressed (else it reads nothing and
    never judges the engine)."""
    seen: list[str] = []

    async def metrics(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        page = b"# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total 42.0\n"
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(page), headers={"Content-Encoding": "gzip"})
        return web.Response(body=page)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with serve_app(app) as url, stack("vllm") as s:
        assert await s.proxy._step_tokens(url) == 42.0, seen


@pytest.mark.parametrize(
    ("timeouts", "non_stream_status", "engine_blamed"),
    [
        # Silence between chunks; non-streamed, the decode sends no headers either: a retryable leg
        # failure, so a 502 after the retries.
        ({"upstream_idle_timeout_s": 1.0}, 502, True),
        # The silence watchdog (on by default, 60 s) ends the stream; the non-streamed answer, whose
        # first byte would be its last, is bounded by the request timeout.
        ({"stream_idle_timeout_s": 1.0, "request_timeout_s": 3.0}, 504, True),
        # Only the whole-request deadline: the client's budget, never a mark against the engine.
        ({"request_timeout_s": 2.0}, 504, False),
    ],
)
async def test_decode_stalling_mid_stream_gets_an_error_event(
    http: aiohttp.ClientSession, timeouts: dict[str, float], non_stream_status: int, engine_blamed: bool
) -> None:
    stall = replace(FAST, faults=Faults(roles=frozenset({"decode"}), stall_after_tokens=3))
    async with stack("vllm", sim_config=stall, **timeouts) as s:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 50, "stream": True}
        t0 = time.monotonic()
        async with http.post(s.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            raw = await r.read()
        took = time.monotonic() - t0
        errs = error_events(raw)
        assert len(errs) == 1 and errs[0]["code"] == 504, raw[-400:]
        tokens = [e for e in sse_events(raw) if b'"choices"' in e]
        assert len(tokens) == 3  # what the decode produced before it stalled was relayed
        # Non-streaming: a JSON error instead of a half answer.
        async with http.post(s.url + "/v1/completions", json={**body, "stream": False}) as r:
            assert r.status == non_stream_status
            assert (await r.json())["error"]["message"]

        # The stalled legs were dropped, and blamed on the decode unless the client's budget ran out
        # first; nothing is left in flight.
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_endpoint_inflight") == 0
        errors = sample(text, "pdorch_proxy_endpoint_errors_total", {"endpoint": s.decode_url}) or 0
        assert errors >= 1 if engine_blamed else errors == 0, errors
        if not engine_blamed:
            assert sample(text, "pdorch_proxy_request_timeouts_total", {"phase": "mid_response"}) == 1
            assert sample(text, "pdorch_proxy_request_timeouts_total", {"phase": "before_first_byte"}) == 1
        report("decode stalls mid-stream", timeouts=json.dumps(timeouts), error_event_after_s=round(took, 3))


# -- slow clients ------------------------------------------------------------------------------------------


async def _closed_by_peer(reader: asyncio.StreamReader, within: float) -> tuple[bool, bytes]:
    """Read until EOF; (True, bytes) if the server closed within ``within`` seconds."""
    buf = b""
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                buf += chunk
        return True, buf
    except TimeoutError:
        return False, buf
    except ConnectionError:
        return True, buf


async def test_slowloris_clients_are_cut_off_and_do_not_block_others(http: aiohttp.ClientSession) -> None:
    async with stack("vllm", client_idle_timeout_s=2.0, body_timeout_s=2.0) as s:
        port = s.proxy.port
        assert port is not None
        n = 100
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(n):
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        heads, bodies = conns[: n // 2], conns[n // 2 :]
        for _, w in heads:  # an incomplete request head
            w.write(b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\n")
        for _, w in bodies:  # a complete head, then a body that never completes
            w.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model": '
            )
        t0 = time.monotonic()

        head_writers = {id(w) for _, w in heads}

        async def trickle() -> None:  # keep dribbling bytes: must not extend the deadlines
            for _ in range(40):
                await asyncio.sleep(0.25)
                for _, w in conns:
                    if not w.is_closing():
                        with contextlib.suppress(ConnectionError):
                            w.write(b"X" if id(w) in head_writers else b" ")

        trickler = asyncio.create_task(trickle())
        # Meanwhile ordinary clients are served normally.
        served = 0
        for i in range(10):
            async with http.post(
                s.url + "/v1/completions", json={"model": MODEL, "prompt": f"normal {i}", "max_tokens": 2}
            ) as r:
                assert r.status == 200
                served += 1
        results = await asyncio.gather(*(_closed_by_peer(r, 8.0) for r, _ in conns))
        took = time.monotonic() - t0
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickler
        for _, w in conns:
            w.close()
        head_closed = [c for c, _ in results[: n // 2]]
        body_results = results[n // 2 :]
        assert all(head_closed), f"{head_closed.count(False)} partial-header connections still open"
        assert all(c for c, _ in body_results), f"trickled-body connections still open: {body_results[0]}"
        for _, data in body_results:
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert b'"body_timeout"' in data
        text = await text_of(http, s.url)
        assert sample(text, "pdorch_proxy_rejected_total", {"reason": "body_timeout"}) == n // 2
        report("slowloris", connections=n, normal_requests_served=served, all_closed_within_s=round(took, 3))


# -- 10,000 idle connections ------------------------------------------------------------------------------


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _tcp_conns(*, local: int | None = None, remote: frozenset[int] = frozenset()) -> int:
    """Loopback TCP sockets not yet closed (any state but LISTEN/TIME_WAIT) with local port ``local``
    or a remote port in ``remote`` (from /proc/net/tcp)."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            lport, rport, state = (
                int(fields[1].split(":")[1], 16),
                int(fields[2].split(":")[1], 16),
                fields[3],
            )
            if state not in ("0A", "06") and (lport == local or rport in remote):
                n += 1
    return n


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_ten_thousand_idle_connections(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    n = 10_000
    need = n + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {need}: raise it (ulimit -Hn) to run this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))  # inherited by the proxy
    sim = SimServer(replace(FAST, protocol="vllm"), host="127.0.0.1", ports=[0, 0])
    await sim.start()
    sim.roles = {f"127.0.0.1:{sim.ports[0]}": Role.PREFILL, f"127.0.0.1:{sim.ports[1]}": Role.DECODE}
    port = free_port()
    cmd = [sys.executable, "-m", "pdorch.cli", "proxy", "--engine", "vllm", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--prefill", sim.url(0), "--decode", sim.url(1), "--metrics-port", "0"]
    cmd += ["--client-idle-timeout", "600"]  # idle connections stay until the clients close them
    log = tmp_path / "proxy.log"
    proc = spawn(cmd, log)
    socks: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(base + "/health", WAIT_S, proc, log)
        body = {"model": MODEL, "prompt": "warm up", "max_tokens": 2}

        async def burst() -> list[int]:
            """50 concurrent completions on a fresh client session, closed afterwards."""
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as c:

                async def one(i: int) -> int:
                    b = {"model": MODEL, "prompt": f"busy {i}", "max_tokens": 3}
                    async with c.post(base + "/v1/completions", json=b) as r:
                        assert (await r.json())["choices"][0]["text"] == expected_text(f"busy {i}", 3)
                        return r.status

                return await asyncio.gather(*(one(i) for i in range(50)))

        # Warm up with the same burst as below, so the upstream pool is already at its size.
        assert await burst() == [200] * 50

        engine_ports = frozenset(sim.ports)

        def own_fds() -> int:
            # The proxy's fds minus its pooled keep-alive connections to the engines (whose number
            # depends on how a burst happened to overlap; the pool expires them after 60 s idle).
            return _fd_count(proc.pid) - _tcp_conns(remote=engine_ports)

        async def no_client_conns() -> bool:
            return _tcp_conns(local=port) == 0

        await wait_until(no_client_conns, WAIT_S, "the warm-up client connections to close")
        baseline, rss0 = own_fds(), _rss_mib(proc.pid)

        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            await loop.sock_connect(s, ("127.0.0.1", port))
            if i % 500 == 499:
                await asyncio.sleep(0)

        async def all_accepted() -> bool:
            return own_fds() >= baseline + n

        await wait_until(all_accepted, 60, f"the proxy to hold {n} connections")
        t_open = time.monotonic() - t0
        held, rss1 = own_fds(), _rss_mib(proc.pid)

        t1 = time.monotonic()
        statuses = await burst()  # still serving while 10k connections sit idle
        t_serve = time.monotonic() - t1
        assert statuses == [200] * 50

        for s in socks:
            s.close()
        socks.clear()
        t2 = time.monotonic()

        trace: list[tuple[float, int, int]] = []

        async def back_to_baseline() -> bool:
            trace.append((round(time.monotonic() - t2, 1), own_fds(), _tcp_conns(local=port)))
            return _tcp_conns(local=port) == 0 and own_fds() <= baseline

        try:
            await wait_until(back_to_baseline, 60, "the proxy's fd count to return to its baseline")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: baseline {baseline}, trace {trace[::20]}") from None
        t_release = time.monotonic() - t2
        after = own_fds()
        async with http.post(base + "/v1/completions", json={**body, "max_tokens": 2}) as r:
            assert r.status == 200
        assert proc.poll() is None
        report(
            "10k idle connections",
            fds_baseline=baseline,
            fds_held=held,
            fds_after=after,
            rss_mib_before=round(rss0, 1),
            rss_mib_held=round(rss1, 1),
            open_s=round(t_open, 2),
            fifty_requests_s=round(t_serve, 3),
            release_s=round(t_release, 2),
        )
    finally:
        for s in socks:
            s.close()
        stop(proc)
        await sim.stop()
