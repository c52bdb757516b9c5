"""A simulated vLLM prefill's KV lease ends when its decode is done with the blocks, as vLLM's NIXL
read-done and abort notifications make it: also when prefill and decode are separate processes (one
per pod), through the side channel the prefill advertises as remote_port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Role
from pdorch.sim.latency import BLIS_LLAMA31_8B_H100
from pdorch.sim.server import SimServer
from tests.compat.helpers import free_port, sample, sim_argv, spawn, stop, wait_http_ok, wait_until

pytestmark = pytest.mark.compat

SIM = sim_argv("--model", "m", "--time-scale", "0.01")


def _body(i: int, tokens: int = 2000) -> dict[str, object]:
    return {"model": "m", "prompt": f"req{i} " + "abcd " * tokens, "max_tokens": 4}


async def _prefill(s: aiohttp.ClientSession, url: str, body: dict[str, object]) -> dict[str, object]:
    leg = dict(body, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    async with s.post(url + "/v1/completions", json=leg) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["kv_transfer_params"]


@pytest.fixture
async def two_processes(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A prefill and a decode `pdorch sim`, each its own process; the prefill's lease lasts 2 s."""
    p, d = free_port(), free_port()
    procs = [
        spawn([*SIM, "--role", "prefill", "--port", str(p), "--kv-lease-seconds", "2"], tmp_path / "p.log"),
        spawn([*SIM, "--role", "decode", "--port", str(d)], tmp_path / "d.log"),
    ]
    try:
        for port, proc, log in ((p, procs[0], "p.log"), (d, procs[1], "d.log")):
            wait_http_ok(f"http://127.0.0.1:{port}/health", 60, proc, tmp_path / log)
        yield f"http://127.0.0.1:{p}", f"http://127.0.0.1:{d}"
    finally:
        for proc in procs:
            stop(proc)


async def test_a_prefill_in_another_process_frees_the_blocks_its_decode_pulled(
    two_processes: tuple[str, str],
) -> None:
    p_url, d_url = two_processes
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            kv = await _prefill(s, p_url, _body(i))
            async with s.post(d_url + "/v1/completions", json=dict(_body(i), kv_transfer_params=kv)) as r:
                assert r.status == 200, await r.text()

        async def freed() -> bool:
            async with s.get(p_url + "/metrics") as r:
                return sample(await r.text(), "vllm:kv_cache_usage_perc") == 0.0

        # Well before the 2 s lease would have run out.
        await wait_until(freed, 1.0, "the prefill's blocks freed by its decode's read-done")


async def test_a_decode_in_another_process_fails_on_blocks_whose_lease_ran_out(
    two_processes: tuple[str, str],
) -> None:
    """The other side of the lease: blocks gone before the pull are a KV load failure (vLLM's
    default kv_load_failure_policy "fail"), not a pull of blocks that no longer exist."""
    p_url, d_url = two_processes
    async with aiohttp.ClientSession() as s:
        kv = await _prefill(s, p_url, _body(0))
        await asyncio.sleep(2.5)
        async with s.post(d_url + "/v1/completions", json=dict(_body(0), kv_transfer_params=kv)) as r:
            assert r.status == 500, await r.text()
            assert "KV load failed" in await r.text()
        async with s.get(d_url + "/metrics") as r:
            assert (
                sample(await r.text(), "pdorch_sim_pd_handshakes_total", {"outcome": "kv_pull_failed"}) == 1
            )


async def test_an_aborted_decode_gives_its_prefill_the_blocks_back() -> None:
    """The client leaves while the decode pulls (a slow link): the prefill frees the blocks then,
    not when the lease runs out."""
    slow = replace(BLIS_LLAMA31_8B_H100, transfer_bw_bytes_s=1e6)  # 1000 tokens: ~2 min
    server = SimServer(
        SimConfig(protocol="vllm", model="m", coefficients=slow), host="127.0.0.1", ports=[0, 0]
    )
    await server.start()
    p, d = server.ports
    server.roles.update({f"127.0.0.1:{p}": Role.PREFILL, f"127.0.0.1:{d}": Role.DECODE})
    try:
        async with aiohttp.ClientSession() as s:
            kv = await _prefill(s, f"http://127.0.0.1:{p}", _body(0, 1000))
            prefill = server.engine("127.0.0.1", p)
            assert len(prefill.leases) == 1
            with pytest.raises(TimeoutError):
                body = dict(_body(0, 1000), stream=True, kv_transfer_params=kv)
                async with s.post(f"http://127.0.0.1:{d}/v1/completions", json=body,
                                  timeout=aiohttp.ClientTimeout(total=0.5)) as r:  # fmt: skip
                    await r.read()

            async def given_back() -> bool:
                return not prefill.leases and prefill.pool.used == 0

            await wait_until(given_back, 5.0, "the prefill's lease ended by its decode's abort")
    finally:
        await server.stop()
