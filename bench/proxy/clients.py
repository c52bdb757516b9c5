"""bench/proxy/clients: upstream HTTP clients side by side, for the proxy's two engine legs.

One in-process simulated engine (role both, `--time-scale 0.001`) on 127.0.0.1 answers a
non-streaming one-token completion (~128-token prompt, the shape of a vLLM prefill leg). Each
client sends the same requests sequentially over one kept-alive connection; the table gives wall
microseconds and process CPU microseconds per request, both including the engine's own handling
(the same for every client), so differences are the clients' cost.

    python bench/proxy/clients.py            # 3000 requests per client
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import httpx2

from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Role
from pdorch.sim.server import SimServer

REPO = Path(__file__).resolve().parents[2]
BODY = json.dumps({"model": "sim-model", "prompt": "word " * 128, "max_tokens": 1}).encode()
PATH = "/v1/completions"


class _RawHttp(asyncio.Protocol):
    """A bare keep-alive HTTP/1.1 client over asyncio + httptools' parser (the lower bound)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.fut: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        assert self.fut is not None
        self.fut.set_result((self.parser.get_status_code(), b"".join(self.body)))

    def post(self, host: str, port: int, path: str, body: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.fut = asyncio.get_running_loop().create_future()
        head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        self.transport.write(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        return self.fut


async def _measure(send: Callable[[], Awaitable[Any]], n: int) -> tuple[float, float]:
    for _ in range(100):
        await send()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        await send()
    return 1e6 * (time.perf_counter() - w0) / n, 1e6 * (time.process_time() - c0) / n


async def run(n: int) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    cfg = SimConfig(protocol="vllm", time_scale=0.001)
    async with SimServer(cfg, host="127.0.0.1", ports=[0], role=Role.BOTH) as sim:
        url, port = sim.url(0), sim.ports[0]
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as s:

            async def aio() -> None:
                async with s.post(url + PATH, data=BODY, headers=headers) as r:
                    await r.read()

            out[
                "aiohttp 3.14 ClientSession (the proxy's health checks; its engine legs until pdorch.proxy.upstream)"
            ] = await _measure(aio, n)
        async with httpx2.AsyncClient(trust_env=False) as c:

            async def hx() -> None:
                (await c.post(url + PATH, content=BODY, headers=headers)).read()

            out["httpx2 AsyncClient"] = await _measure(hx, n)
        _, raw = await asyncio.get_running_loop().create_connection(_RawHttp, "127.0.0.1", port)

        async def bare() -> None:
            await raw.post("127.0.0.1", port, PATH, BODY)

        out["asyncio Protocol + httptools (no pooling, timeouts or errors: a lower bound)"] = await _measure(
            bare, n
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    res = asyncio.run(run(args.requests))
    lines = ["| client | wall us / request | CPU us / request |", "|---|---|---|"]
    lines += [f"| {k} | {w:.0f} | {c:.0f} |" for k, (w, c) in res.items()]
    md = "\n".join(lines)
    (REPO / "bench" / "results" / "proxy-clients.md").write_text(
        "# bench/proxy/clients\n\nSequential one-token completions to one in-process sim over one kept-alive "
        f"connection, {args.requests} per client; both columns include the sim's own handling.\n\n"
        + md
        + "\n"
    )
    print(md)


if __name__ == "__main__":
    main()
