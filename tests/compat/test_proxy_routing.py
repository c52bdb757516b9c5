"""Routing decisions against simulated engines on loopback: how requests spread over the engines
when several can take them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from pdorch.proxy.config import ProxyConfig
from pdorch.proxy.discovery import StaticDiscovery, static_endpoints
from pdorch.proxy.server import ProxyServer
from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Role
from pdorch.sim.server import SimServer
from tests.compat.helpers import sample

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("policy", ["least_load", "power_of_two"])
async def test_a_burst_of_vllm_requests_spreads_over_the_decodes(policy: str) -> None:
    """A vLLM decode leg starts after its prefill; the decode chosen for it counts as in flight from
    the moment it is chosen. Counted only once its leg started, every request of a burst routed
    during the prefills saw the same loads and all went to one decode."""
    sim = SimServer(SimConfig(model="m", time_scale=1.0), host="127.0.0.1", ports=[0, 0, 0])
    await sim.start()
    p, d1, d2 = sim.ports
    sim.roles = {
        f"127.0.0.1:{p}": Role.PREFILL,
        f"127.0.0.1:{d1}": Role.DECODE,
        f"127.0.0.1:{d2}": Role.DECODE,
    }
    cfg = ProxyConfig(engine="vllm", host="127.0.0.1", port=0, prefill=(sim.url(0),),
                      decode=(sim.url(1), sim.url(2)), policy=policy, health_interval_s=60.0)  # fmt: skip
    px = ProxyServer(cfg, StaticDiscovery(static_endpoints(cfg.prefill, cfg.decode)))
    await px.start()
    body = {"model": "m", "prompt": " ".join(["abc"] * 3000), "max_tokens": 2}  # ~60 ms of prefill each
    try:
        async with aiohttp.ClientSession() as http:

            async def post() -> int:
                async with http.post(f"http://127.0.0.1:{px.port}/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            # One long stream keeps a decode busy: the burst's requests must not all see the other
            # one as the less loaded.
            long = await http.post(
                f"http://127.0.0.1:{px.port}/v1/completions",
                json={**body, "max_tokens": 2000, "stream": True},
            )
            await long.content.readany()
            assert await asyncio.gather(*(post() for _ in range(20))) == [200] * 20
            served = []
            for port in (d1, d2):
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    served.append(sample(await r.text(), "vllm:request_success_total"))
            long.close()
    finally:
        await px.stop()
        await sim.stop()
    assert sum(served) == 20 and min(served) >= 5, served  # the long stream has not finished


@asynccontextmanager
async def _two_by_two(**proxy: object) -> AsyncIterator[tuple[SimServer, ProxyServer]]:
    """2 prefill and 2 decode vLLM sims behind a proxy."""
    sim = SimServer(SimConfig(model="m", time_scale=0.01), host="127.0.0.1", ports=[0, 0, 0, 0])
    await sim.start()
    sim.roles = {
        f"127.0.0.1:{port}": Role.PREFILL if i < 2 else Role.DECODE for i, port in enumerate(sim.ports)
    }
    cfg = ProxyConfig(engine="vllm", host="127.0.0.1", port=0, prefill=(sim.url(0), sim.url(1)),
                      decode=(sim.url(2), sim.url(3)), health_interval_s=60.0, **proxy)  # type: ignore[arg-type]  # fmt: skip
    px = ProxyServer(cfg, StaticDiscovery(static_endpoints(cfg.prefill, cfg.decode)))
    await px.start()
    try:
        yield sim, px
    finally:
        await px.stop()
        await sim.stop()


async def test_round_robin_turns_per_mode_under_mixed_short_and_long_prompts() -> None:
    """Short (decode-only) and long (P/D) prompts alternating: one round-robin position shared by
    both modes sent every P/D request to the same prefill."""
    async with (
        _two_by_two(policy="round_robin", min_prompt_tokens=100) as (sim, px),
        aiohttp.ClientSession() as http,
    ):
        for i in range(12):
            prompt = "hello" if i % 2 else " ".join(["word"] * 600)
            body = {"model": "m", "prompt": prompt, "max_tokens": 2}
            async with http.post(f"http://127.0.0.1:{px.port}/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
        leased = []
        for port in sim.ports[:2]:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                leased.append(
                    sample(await r.text(), "pdorch_sim_pd_handshakes_total", {"outcome": "prefill_leased"})
                )
    assert leased == [3, 3], leased
