"""Real vllm-router 0.1.17 and sglang-router 0.3.2 route P/D traffic through `pdorch sim` processes.

This checks the simulated engines against the peers' actual wire behaviour: vllm-router's NIXL flow
(prefill leg with ``kv_transfer_params.do_remote_decode``, decode leg with the prefill's params) and
sglang-router's bootstrap flow (same body with ``bootstrap_host/port/room`` to both, in parallel). The
vLLM sims run as one process on two ports (in-process lease registry); the SGLang prefill and decode are
two processes, so the decode reaches the prefill through its bootstrap HTTP server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdorch.sim import sse, tokens
from tests.compat.helpers import free_port, sample, sim_argv, spawn, stop, wait_http_ok

pytestmark = pytest.mark.compat

MODEL = "sim-model"
SIM = sim_argv("--model", MODEL, "--time-scale", "0.01")
STARTUP_S = 40.0


@dataclass
class Stack:
    """A router in front of one prefill and one decode sim."""

    router: str
    prefill: str
    decode: str
    protocol: str
    logs: list[Path]

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.logs)


def _binary(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: pip install -e '.[dev]'"
    return path


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("vllm-router")
    p_port, d_port, r_port, prom = free_port(), free_port(), free_port(), free_port()
    role_map = tmp / "roles.json"
    role_map.write_text(json.dumps({f"127.0.0.1:{p_port}": "prefill", f"127.0.0.1:{d_port}": "decode"}))
    procs: list[subprocess.Popen[bytes]] = []
    sim_log, router_log = tmp / "sim.log", tmp / "router.log"
    try:
        sim = spawn(
            [
                *SIM,
                "--protocol",
                "vllm",
                "--port",
                str(p_port),
                "--port",
                str(d_port),
                "--role-map",
                str(role_map),
            ],
            sim_log,
        )
        procs.append(sim)
        wait_http_ok(f"http://127.0.0.1:{p_port}/health", STARTUP_S, sim, sim_log)
        wait_http_ok(f"http://127.0.0.1:{d_port}/health", STARTUP_S, sim, sim_log)
        router = spawn(
            [
                _binary("vllm-router"),
                "--host",
                "127.0.0.1",
                "--port",
                str(r_port),
                "--vllm-pd-disaggregation",
                "--kv-connector",
                "nixl",
                "--prefill",
                f"http://127.0.0.1:{p_port}",
                "--decode",
                f"http://127.0.0.1:{d_port}",
                "--prometheus-port",
                str(prom),
                "--worker-startup-timeout-secs",
                "10",
            ],
            router_log,
        )
        procs.append(router)
        wait_http_ok(f"http://127.0.0.1:{r_port}/health", STARTUP_S, router, router_log)
        yield Stack(
            f"http://127.0.0.1:{r_port}",
            f"http://127.0.0.1:{p_port}",
            f"http://127.0.0.1:{d_port}",
            "vllm",
            [sim_log, router_log],
        )
    finally:
        for proc in reversed(procs):
            stop(proc)


@pytest.fixture(scope="module")
def sglang_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("sglang-router")
    p_port, d_port, boot, r_port, prom = (free_port() for _ in range(5))
    procs: list[subprocess.Popen[bytes]] = []
    p_log, d_log, router_log = tmp / "prefill.log", tmp / "decode.log", tmp / "router.log"
    try:
        common = ["--protocol", "sglang", "--bootstrap-timeout", "20", "--waiting-timeout", "20"]
        pre = spawn(
            [*SIM, *common, "--role", "prefill", "--port", str(p_port), "--bootstrap-port", str(boot)], p_log
        )
        procs.append(pre)
        dec = spawn([*SIM, *common, "--role", "decode", "--port", str(d_port)], d_log)
        procs.append(dec)
        wait_http_ok(f"http://127.0.0.1:{p_port}/health", STARTUP_S, pre, p_log)
        wait_http_ok(f"http://127.0.0.1:{boot}/health", STARTUP_S, pre, p_log)
        wait_http_ok(f"http://127.0.0.1:{d_port}/health", STARTUP_S, dec, d_log)
        router = spawn(
            [
                _binary("sglang-router"),
                "launch",
                "--host",
                "127.0.0.1",
                "--port",
                str(r_port),
                "--prometheus-port",
                str(prom),
                "--pd-disaggregation",
                "--prefill",
                f"http://127.0.0.1:{p_port}",
                str(boot),
                "--decode",
                f"http://127.0.0.1:{d_port}",
                "--worker-startup-timeout-secs",
                "10",
            ],
            router_log,
        )
        procs.append(router)
        # /readiness turns 200 once a prefill and a decode worker are registered and healthy.
        wait_http_ok(f"http://127.0.0.1:{r_port}/readiness", STARTUP_S, router, router_log)
        yield Stack(
            f"http://127.0.0.1:{r_port}",
            f"http://127.0.0.1:{p_port}",
            f"http://127.0.0.1:{d_port}",
            "sglang",
            [p_log, d_log, router_log],
        )
    finally:
        for proc in reversed(procs):
            stop(proc)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def _metrics(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def _prompt_text(kind: str, body: dict[str, Any]) -> str:
    return body["prompt"] if kind == "completion" else tokens.render_chat(body["messages"])


def _request(kind: str, stream: bool, n: int, tag: str) -> tuple[str, dict[str, Any]]:
    if kind == "completion":
        path = "/v1/completions"
        body: dict[str, Any] = {"model": MODEL, "prompt": f"Tell me about {tag} " + "lorem ipsum " * 30}
    else:
        path = "/v1/chat/completions"
        body = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Explain {tag} in detail."},
            ],
        }
    body["max_tokens"] = n
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return path, body


def _check_answer(kind: str, stream: bool, raw: bytes, body: dict[str, Any], n: int) -> None:
    prompt = _prompt_text(kind, body)
    want = tokens.generated_text(tokens.prompt_seed(tokens.tokenize(prompt)), 0, n)
    usage_want = {"prompt_tokens": tokens.count_tokens(prompt), "completion_tokens": n}
    if not stream:
        data = json.loads(raw)
        choice = data["choices"][0]
        text = choice["text"] if kind == "completion" else choice["message"]["content"]
        assert text == want
        assert choice["finish_reason"] == "length"
        assert {k: data["usage"][k] for k in usage_want} == usage_want
        return
    assert raw.rstrip(b"\n").endswith(b"data: [DONE]"), raw[-200:]
    events = sse.parse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    if kind == "completion":
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = [e for e in events[:-1] if not e["choices"]]
    assert len(usage) == 1 and {k: usage[0]["usage"][k] for k in usage_want} == usage_want


CASES = [("completion", False), ("completion", True), ("chat", False), ("chat", True)]


@pytest.mark.parametrize(("kind", "stream"), CASES)
async def test_vllm_router_pd(
    vllm_stack: Stack, http: aiohttp.ClientSession, kind: str, stream: bool
) -> None:
    n = 9
    path, body = _request(kind, stream, n, f"vllm-{kind}-{stream}")
    p_before, d_before = await _metrics(http, vllm_stack.prefill), await _metrics(http, vllm_stack.decode)
    async with http.post(vllm_stack.router + path, json=body) as r:
        raw = await r.read()
        assert r.status == 200, f"{r.status} {raw[:500]!r}\n{vllm_stack.log_tails()}"
        if stream:
            assert r.headers["Content-Type"].startswith("text/event-stream")
    _check_answer(kind, stream, raw, body, n)
    p_after, d_after = await _metrics(http, vllm_stack.prefill), await _metrics(http, vllm_stack.decode)

    def delta(before: str, after: str, name: str, labels: dict[str, str] | None = None) -> float:
        return sample(after, name, labels) - sample(before, name, labels)

    prompt_tokens = tokens.count_tokens(_prompt_text(kind, body))
    # The prefill leg ran on the prefill engine: one token, blocks leased to the decode.
    assert delta(p_before, p_after, "vllm:prompt_tokens_total") == prompt_tokens
    assert delta(p_before, p_after, "vllm:generation_tokens_total") == 1
    assert delta(p_before, p_after, "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_leased"}) == 1
    # The decode got valid kv_transfer_params, pulled the KV (freeing the lease) and generated the answer.
    assert delta(d_before, d_after, "pdorch_sim_pd_handshakes_total", {"outcome": "kv_pulled"}) == 1
    assert delta(d_before, d_after, "pdorch_sim_pd_handshakes_total", {"outcome": "invalid_params"}) == 0
    assert delta(d_before, d_after, "vllm:generation_tokens_total") == n
    assert sample(p_after, "vllm:kv_cache_usage_perc") == 0.0


@pytest.mark.parametrize(("kind", "stream"), CASES)
async def test_sglang_router_pd(
    sglang_stack: Stack, http: aiohttp.ClientSession, kind: str, stream: bool
) -> None:
    n = 7
    path, body = _request(kind, stream, n, f"sglang-{kind}-{stream}")
    p_before, d_before = await _metrics(http, sglang_stack.prefill), await _metrics(http, sglang_stack.decode)
    async with http.post(sglang_stack.router + path, json=body) as r:
        raw = await r.read()
        assert r.status == 200, f"{r.status} {raw[:500]!r}\n{sglang_stack.log_tails()}"
        if stream:
            assert r.headers["Content-Type"].startswith("text/event-stream")
    _check_answer(kind, stream, raw, body, n)
    p_after, d_after = await _metrics(http, sglang_stack.prefill), await _metrics(http, sglang_stack.decode)

    def delta(before: str, after: str, name: str, labels: dict[str, str] | None = None) -> float:
        return sample(after, name, labels) - sample(before, name, labels)

    prompt_tokens = tokens.count_tokens(_prompt_text(kind, body))
    # Same body on both legs; the prefill met its decode in the bootstrap room and pushed the KV.
    assert delta(p_before, p_after, "sglang:prompt_tokens_total") == prompt_tokens
    assert delta(p_before, p_after, "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_pushed"}) == 1
    assert delta(d_before, d_after, "pdorch_sim_pd_handshakes_total", {"outcome": "decode_matched"}) == 1
    assert delta(d_before, d_after, "sglang:generation_tokens_total") == n
    assert delta(p_before, p_after, "sglang:num_bootstrap_failed_reqs_total") == 0
