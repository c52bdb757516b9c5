"""The built-in scaler's Prometheus source against a real Prometheus scraping simulated engines.

Prometheus (built by hack/build-prometheus.sh from pinned Go modules) scrapes two `pdorch sim`
engines every 2 s while a client sends them a steady stream of requests; the scaler reads them
through the HTTP API every second, as `pdorch scaler --prometheus-url` does. A counter seen through
Prometheus moves only when Prometheus scrapes, so divided by the scaler's own tick it reads no load
on one tick and twice the load on the next; divided by the time between the engine's own scrapes
(what the source now reports) it reads the rate the client sent. An engine that stops answering
reads as unread once Prometheus fails to scrape it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from pdorch.proxy.endpoints import Endpoint
from pdorch.scaler.scrape import EngineSample
from pdorch.scaler.sources import PrometheusQuery
from pdorch.sim.config import SimConfig
from pdorch.sim.server import SimServer
from tests.compat.helpers import free_port, spawn, stop, wait_http_ok, wait_until
from tests.unit.role_loads import rates_read

pytestmark = pytest.mark.compat

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "serving"
SCRAPE_S = 2.0
TICK_S = 1.0
RATE = 6.0  # requests per second to each engine
CONFIG = SimConfig(model="m", time_scale=0.01)


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """The pinned Prometheus binary, built into the cache on first use."""
    out = subprocess.run(
        [str(REPO / "hack" / "build-prometheus.sh")], capture_output=True, text=True, timeout=3600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return str(Path(out.stdout.strip().splitlines()[-1]) / "prometheus")


@pytest.fixture
async def engines() -> AsyncIterator[list[SimServer]]:
    # One engine per loopback address (the sim keys its engine by IP).
    servers = [SimServer(CONFIG, host=f"127.0.0.{n}", ports=[0]) for n in (71, 72)]
    for s in servers:
        await s.start()
    yield servers
    for s in servers:
        await s.stop()


@pytest.fixture
def prometheus(prometheus_bin: str, engines: list[SimServer], tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping both engines, labelled with a namespace and pod as a PodMonitor does."""
    targets = [
        {"targets": [f"{s.host}:{s.ports[0]}"], "labels": {"namespace": NAMESPACE, "pod": f"decode-{i}"}}
        for i, s in enumerate(engines)
    ]
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "engines", "static_configs": targets}],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = tmp_path / "prometheus.log"
    proc = spawn(
        [
            prometheus_bin,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", 60, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


async def _steady_traffic(engines: list[SimServer], stop_at: asyncio.Event, sent: list[float]) -> None:
    """RATE requests per second to each engine, evenly spaced; `sent` gets each answer's time."""
    body = {"model": "m", "prompt": "steady " * 20, "max_tokens": 4}

    async def one(http: aiohttp.ClientSession, url: str) -> None:
        async with http.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            sent.append(time.monotonic())

    async with aiohttp.ClientSession() as http:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        n = 0
        while not stop_at.is_set():
            for s in engines:
                t = asyncio.create_task(one(http, s.url()))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))
        await asyncio.gather(*tasks)


def _reads(ticks: list[tuple[float, list[EngineSample]]], engines: list[int], stamped: bool) -> list[float]:
    """The rate the scaler reads on each tick for these engines."""
    return rates_read([(now, [samples[i] for i in engines]) for now, samples in ticks], stamped)


async def test_prometheus_source_reads_the_sent_rate_on_every_tick(
    engines: list[SimServer], prometheus: str
) -> None:
    eps = [Endpoint(s.url(), "both", s.host, s.ports[0], pod=f"decode-{i}") for i, s in enumerate(engines)]
    source = PrometheusQuery(prometheus)
    stop_at, sent = asyncio.Event(), []
    traffic = asyncio.create_task(_steady_traffic(engines, stop_at, sent))
    ticks: list[tuple[float, list[EngineSample]]] = []
    try:
        # Prometheus applies new targets after a few seconds and staggers their first scrapes.
        async def scraped() -> bool:
            return all(s is not None for s in await source.samples(NAMESPACE, eps))

        await wait_until(scraped, 60, "Prometheus to have scraped both engines")
        await asyncio.sleep(2 * SCRAPE_S + 0.5)  # two more scrapes of each under load
        t0 = time.monotonic()
        for n in range(16):
            await asyncio.sleep(max(0.0, t0 + n * TICK_S - time.monotonic()))
            samples = await source.samples(NAMESPACE, eps)
            assert all(s is not None and s.at is not None for s in samples), samples
            # vLLM's KV size rides on cache_config_info's labels, through Prometheus too.
            assert all(s.kv_capacity_tokens == CONFIG.coefficients.kv_capacity_tokens for s in samples if s)
            ticks.append((time.monotonic(), [s for s in samples if s is not None]))
        window = (t0 - SCRAPE_S, time.monotonic())
        stop_at.set()
        await traffic
        # An engine that stops answering while its pod stays Ready: Prometheus marks its series
        # stale at the failed scrape, so it reads as unread (the scaler then holds scale-down)
        # instead of repeating its last good sample.
        await engines[1].stop()
        gone_at = time.monotonic()

        async def unread() -> bool:
            got = await source.samples(NAMESPACE, eps)
            assert got[0] is not None, "the engine still answering must still be read"
            return got[1] is None

        await wait_until(unread, 3 * SCRAPE_S + 5, "the stopped engine to read as unread")
        unread_after = time.monotonic() - gone_at
    finally:
        stop_at.set()
        await traffic
        await source.close()
    answered = sum(window[0] <= t <= window[1] for t in sent) / (window[1] - window[0])
    # The first readings of an engine may have no interval before them to repeat (it then reads as
    # blind, and scale-down holds); the rest are compared.
    role = _reads(ticks, [0, 1], stamped=True)[2:]
    per_engine = {i: (_reads(ticks, [i], True)[2:], _reads(ticks, [i], False)[2:]) for i in (0, 1)}
    print(
        "prometheus source:",
        json.dumps(
            {
                "sent_per_s": round(answered, 2),
                "stopped_engine_unread_after_s": round(unread_after, 1),
                "role_by_scrape_time": [round(r, 1) for r in role],
                **{f"engine{i}_by_scrape_time": [round(r, 1) for r in v[0]] for i, v in per_engine.items()},
                **{f"engine{i}_by_tick": [round(r, 1) for r in v[1]] for i, v in per_engine.items()},
            }
        ),
    )
    assert answered == pytest.approx(2 * RATE, rel=0.2)
    assert all(0.6 * answered <= r <= 1.4 * answered for r in role), role
    for by_scrape, by_tick in per_engine.values():
        # Every tick reads the engine's sent rate ...
        assert all(0.6 * RATE <= r <= 1.4 * RATE for r in by_scrape), by_scrape
        # ... where the same samples divided by the tick read nothing on some ticks (two engines
        # scraped out of phase can hide that in their sum, so it is shown per engine).
        assert min(by_tick) < 0.5 * RATE, by_tick
