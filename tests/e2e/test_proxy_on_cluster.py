"""examples/sim-pd on the dev cluster, end to end: the controller creates the roles, simulated
engines answer on the prefill/decode pods' IPs, and the built-in proxy role (pod discovery)
routes real requests through a prefill and a decode. Then faults: a prefill pod killed under load,
decode and proxy pods deleted with streams in flight, and a client that disconnects mid-stream."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import openai
import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod

from pdorch.devcluster.cluster import ClusterState
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.pod_backends import PodBackends
from pdorch.devcluster.waiting import wait_for_async
from pdorch.sim.config import SimConfig
from tests.integration.test_controller import SG, example, wait_available

pytestmark = pytest.mark.e2e

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture
async def served(
    request: pytest.FixtureRequest,
    devcluster: ClusterState,
    kube: Client,
    namespace: str,
    controller: ControllerProc,
    tmp_path: Path,
) -> AsyncIterator[tuple[PodBackends, str]]:
    time_scale = getattr(request, "param", 0.05)
    kube.create(SG.from_dict(example("sim-pd")), namespace=namespace)
    await asyncio.to_thread(wait_available, kube, namespace, "sim-pd")
    backends = PodBackends(
        devcluster.kubeconfig,
        namespace,
        "sim-pd",
        protocol="vllm",
        sim_config=SimConfig(protocol="vllm", time_scale=time_scale),
        log_dir=tmp_path,
    )
    await backends.start()
    try:
        proxy = await wait_for_async(
            lambda: backends.by_kind("proxy") and len(backends.by_kind("prefill")) == 2,
            30,
            "backends for the proxy and both prefill pods",
        )
        url = await backends.proxy_url()
        assert proxy
        yield backends, url
    finally:
        await backends.stop()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def _engine_metrics(backends: PodBackends, kind: str) -> list[str]:
    out = []
    async with httpx2.AsyncClient(trust_env=False) as c:
        for b in backends.by_kind(kind):
            out.append((await c.get(f"http://{b.ip}:{b.port}/metrics", timeout=5)).text)
    return out


async def test_requests_flow_through_the_proxy_pod_prefill_and_decode(
    served: tuple[PodBackends, str],
) -> None:
    backends, url = served
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", http_client=None, max_retries=0)
    done = await client.completions.create(
        model=MODEL, prompt="The capital of France is " * 20, max_tokens=12
    )
    assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
    chunks = []
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello " * 50}], max_tokens=9, stream=True
    )
    async for ch in stream:
        chunks.append(ch)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason == "length"
    # Both requests went through a prefill pod's engine and a decode pod's engine.
    prefill_prompts = sum(
        _metric(t, "vllm:prompt_tokens_total") for t in await _engine_metrics(backends, "prefill")
    )
    decode_tokens = sum(
        _metric(t, "vllm:generation_tokens_total") for t in await _engine_metrics(backends, "decode")
    )
    assert prefill_prompts > 0
    assert decode_tokens >= 12 + 9
    await client.close()


# Slow engines and long prompts (prefill of ~4500 tokens, 16 tokens ~1 s) so prefills are in flight
# when the pod dies; its engine dies at once (the sim's 0 s shutdown once waited for every stream,
# so the proxy never had to retry: helper-64), and the proxy retries them on a fresh pair.
@pytest.mark.parametrize("served", [10.0], indirect=True)
async def test_killing_a_prefill_pod_under_load_loses_no_request(
    served: tuple[PodBackends, str], kube: Client, namespace: str
) -> None:
    backends, url = served
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def user(i: int) -> None:
        async with httpx2.AsyncClient(trust_env=False, timeout=httpx2.Timeout(60.0)) as c:
            while not stop.is_set():
                body = {"model": MODEL, "prompt": f"user {i} " * 1500, "max_tokens": 16}
                try:
                    r = await c.post(f"{url}/v1/completions", json=body)
                except httpx2.TimeoutException:
                    outcomes["hang"] += 1  # never acceptable: the proxy must answer or fail explicitly
                    continue
                except httpx2.HTTPError:
                    outcomes["transport"] += 1
                    continue
                if r.status_code == 200:
                    data = r.json()
                    outcomes["ok" if data["usage"]["completion_tokens"] == 16 else "incomplete"] += 1
                elif r.headers.get("content-type", "").startswith("application/json") and "error" in r.json():
                    outcomes[f"error-{r.status_code}"] += 1
                else:
                    outcomes[f"silent-{r.status_code}"] += 1

    users = [asyncio.create_task(user(i)) for i in range(6)]
    try:
        await wait_for_async(lambda: outcomes["ok"] >= 20, 60, "20 successful requests before the fault")
        victim = backends.by_kind("prefill")[0]
        # No grace: the pod is gone at once, which the dev cluster plays as a crashed engine (a
        # graceful delete would let the example's engines finish their requests, retrying nothing).
        await asyncio.to_thread(kube.delete, Pod, victim.pod, namespace=namespace, grace_period=0)
        # LWS recreates the group (same pod name, new UID) while the load keeps running.
        await wait_for_async(
            lambda: (b := backends.backend(victim.pod)) is not None and b.uid != victim.uid,
            90,
            "the killed prefill pod recreated by LWS",
        )
        ok_before = outcomes["ok"]
        await wait_for_async(
            lambda: outcomes["ok"] >= ok_before + 20, 60, "20 more successful requests after the fault"
        )
    finally:
        stop.set()
        await asyncio.gather(*users, return_exceptions=True)
    async with httpx2.AsyncClient(trust_env=False) as c:
        # The proxy serves /metrics on its own port (9090), not on the client port.
        metrics_url = url.rsplit(":", 1)[0] + ":9090/metrics"
        retries = _metric((await c.get(metrics_url, timeout=5)).text, "pdorch_proxy_retries_total")
    print(f"outcomes while a prefill pod was killed: {dict(outcomes)}; proxy retries: {retries:.0f}")
    assert outcomes["hang"] == 0 and outcomes["incomplete"] == 0, outcomes
    assert not any(k.startswith("silent") for k in outcomes), outcomes
    assert outcomes["transport"] == 0, outcomes  # the proxy itself never dropped a connection
    # Not one request lost: an explicit error (a 502 after the retries, a 429 from a queue too
    # small) is a request the user did not get.
    assert set(outcomes) == {"ok"}, outcomes


def _start_streams(
    client: openai.AsyncOpenAI, n: int, prompt_words: int
) -> tuple[list[asyncio.Task[None]], dict[int, int], dict[int, str | None]]:
    """`n` streamed completions of 240 tokens each: their tasks, and the chunks and finish reason
    each has received so far (filled in as they arrive)."""
    chunks: dict[int, int] = {}
    finish: dict[int, str | None] = {}

    async def stream(i: int) -> None:
        chunks[i] = 0
        s = await client.completions.create(
            model=MODEL,
            prompt=f"user {i} " * prompt_words,
            max_tokens=240,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for ch in s:
            chunks[i] += 1
            if ch.choices and ch.choices[0].finish_reason:
                finish[i] = ch.choices[0].finish_reason

    return [asyncio.create_task(stream(i)) for i in range(n)], chunks, finish


# 20 ms per token: 240 tokens keep every stream running for ~5 s after the decode pod's deletion.
@pytest.mark.parametrize("served", [1.0], indirect=True)
async def test_streams_on_a_deleted_decode_pod_run_to_their_end(
    served: tuple[PodBackends, str], kube: Client, namespace: str
) -> None:
    """A rollout or a scale-down deletes pods with streams in flight. The example's engines run with
    `--shutdown-timeout` (vLLM's drain on SIGTERM) and a 60 s grace, so every stream on the deleted
    decode ends with all its tokens while the proxy already sends new requests elsewhere. Without the
    flag the engine aborts them (vLLM's default), which is what the dev cluster did to every engine."""
    backends, url = served
    decode = backends.by_kind("decode")[0]
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    tasks, chunks, finish = _start_streams(client, 4, prompt_words=50)
    try:
        await wait_for_async(
            lambda: len(chunks) == 4 and min(chunks.values()) >= 3, 30, "4 streams under way"
        )
        await asyncio.to_thread(kube.delete, Pod, decode.pod, namespace=namespace)
        await wait_for_async(
            lambda: backends.backend(decode.pod) is None, 10, "the deleted decode's backend stopped"
        )
        assert not finish, f"streams {sorted(finish)} ended before their decode pod was deleted"
        errors = [r for r in await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30) if r]
        assert not errors, errors
    finally:
        for t in tasks:
            t.cancel()
        await client.close()
    print(f"chunks per stream after the decode pod's deletion: {chunks}")
    assert finish == {i: "length" for i in range(4)}, finish
    assert all(n >= 240 for n in chunks.values()), chunks  # every token, no stream cut


@pytest.mark.parametrize("served", [25.0], indirect=True)
async def test_streams_through_a_deleted_proxy_pod_run_to_their_end(
    served: tuple[PodBackends, str], kube: Client, namespace: str
) -> None:
    """A proxy pod replaced with streams in flight (a pdorch upgrade, a router change): the built-in
    proxy's `--shutdown-grace` follows the engine pods' 60 s grace in the example, not its own 30 s
    default, so streams that run on for more than 30 s after the deletion end with all their
    tokens, while the pod's successor already serves new requests."""
    backends, url = served
    proxy = backends.by_kind("proxy")[0]
    assert proxy.shutdown_grace_s == 60.0, proxy  # rendered by the controller from the engines' pods
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    loop = asyncio.get_running_loop()
    tasks, chunks, finish = _start_streams(client, 3, prompt_words=20)
    try:
        await wait_for_async(
            lambda: len(chunks) == 3 and min(chunks.values()) >= 3, 60, "3 streams under way"
        )
        deleted_at = loop.time()
        await asyncio.to_thread(kube.delete, Pod, proxy.pod, namespace=namespace)
        await wait_for_async(
            lambda: (b := backends.backend(proxy.pod)) is not None and b.uid != proxy.uid,
            60,
            "the proxy pod's successor serving",
        )
        new_url = await backends.proxy_url()
        async with httpx2.AsyncClient(trust_env=False) as c:
            r = await c.post(
                f"{new_url}/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                timeout=60,
            )
        assert r.status_code == 200, r.text
        assert not finish, f"streams {sorted(finish)} ended before the new proxy served"
        errors = [r for r in await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90) if r]
        ran_on_s = loop.time() - deleted_at
        assert not errors, errors
    finally:
        for t in tasks:
            t.cancel()
        await client.close()
    print(
        f"chunks per stream: {chunks}; the streams ran on for {ran_on_s:.1f}s after the proxy pod's deletion"
    )
    # What makes this test mean something: the streams outlived the proxy's 30 s default grace.
    assert ran_on_s > 30, ran_on_s
    assert finish == {i: "length" for i in range(3)}, finish
    assert all(n >= 240 for n in chunks.values()), chunks


async def test_client_disconnect_mid_stream_cancels_the_decode(served: tuple[PodBackends, str]) -> None:
    backends, url = served
    aborted_before = sum(
        _metric(t, "vllm:request_success_total", finished_reason="abort")
        for t in await _engine_metrics(backends, "decode")
    )
    body = {"model": MODEL, "prompt": "tell me a long story " * 10, "max_tokens": 4000, "stream": True}
    async with httpx2.AsyncClient(trust_env=False, timeout=30) as c:
        async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            async for line in r.aiter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    break  # leave mid-stream: closing the response drops the connection

    async def aborted() -> bool:
        texts = await _engine_metrics(backends, "decode")
        return (
            sum(_metric(t, "vllm:request_success_total", finished_reason="abort") for t in texts)
            > aborted_before
        )

    await wait_for_async(aborted, 30, "an abort on the decode engine")
