"""In-flight leg counts return to zero on the SGLang failure paths (they steer least_load and the
half-open breaker's probe slot, so a leaked count would skew routing for good)."""

from __future__ import annotations

import asyncio

import pytest

from pdorch.proxy.config import ProxyConfig
from pdorch.proxy.discovery import StaticDiscovery, static_endpoints
from pdorch.proxy.policies import Decision
from pdorch.proxy.server import LegFailure, Progress, ProxyServer

pytestmark = pytest.mark.compat


async def _silent_engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a request and never answers."""
    try:
        await reader.read(1 << 20)
        await asyncio.sleep(30)
    finally:
        writer.close()


async def test_prefill_leg_uncounted_when_its_task_never_starts() -> None:
    prefill = await asyncio.start_server(_silent_engine, "127.0.0.1", 0)
    decode = await asyncio.start_server(_silent_engine, "127.0.0.1", 0)
    p_port = prefill.sockets[0].getsockname()[1]
    d_port = decode.sockets[0].getsockname()[1]
    cfg = ProxyConfig(
        engine="sglang",
        host="127.0.0.1",
        port=0,
        prefill=(f"http://127.0.0.1:{p_port}",),
        decode=(f"http://127.0.0.1:{d_port}",),
        bootstrap_port=8998,
        max_retries=0,
    )
    px = ProxyServer(cfg, StaticDiscovery(static_endpoints(cfg.prefill, cfg.decode, cfg.bootstrap_port)))
    await px.start()
    try:
        pool = px.upstream
        connect = pool._connect

        async def reset_decode(host: str, port: int):  # type: ignore[no-untyped-def]
            conn = await connect(host, port)
            if port == d_port:
                # The decode engine reset the fresh connection before the handler resumed: the decode
                # head has failed already, so the handler never suspends after spawning the prefill task.
                conn.connection_lost(ConnectionResetError("reset by peer"))
            return conn

        pool._connect = reset_decode  # type: ignore[method-assign]
        body = {"model": "m", "prompt": "hi"}
        decision = px._route(body, "completion", frozenset())
        assert isinstance(decision, Decision) and decision.prefill is not None
        with pytest.raises(LegFailure) as failed:
            progress = Progress(decision.decode, "decode")
            await px._open_sglang(decision, body, "/v1/completions", {}, progress, None)
        assert failed.value.leg == "decode"
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert px.loads == {cfg.prefill[0]: 0, cfg.decode[0]: 0}
        assert not px._background
    finally:
        prefill.close()
        decode.close()
        await px.stop()
