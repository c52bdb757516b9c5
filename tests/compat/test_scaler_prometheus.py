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
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pdorch.devcluster.pki import PkiPaths, generate
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


def _start_prometheus(
    prometheus_bin: str, engines: list[SimServer], tmp_path: Path, web: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A Prometheus scraping both engines, labelled with a namespace and pod as a PodMonitor does;
    `web` is its --web.config.file (TLS, for one)."""
    targets = [
        {"targets": [f"{s.host}:{s.ports[0]}"], "labels": {"namespace": NAMESPACE, "pod": f"decode-{i}"}}
        for i, s in enumerate(engines)
    ]
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "engines", "static_configs": targets}],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    argv = [
        prometheus_bin,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
    ]
    if web is not None:
        (tmp_path / "web.yml").write_text(json.dumps(web))
        argv.append(f"--web.config.file={tmp_path / 'web.yml'}")
    port = free_port()
    log = tmp_path / "prometheus.log"
    return spawn([*argv, f"--web.listen-address=127.0.0.1:{port}"], log), port, log


@pytest.fixture
def prometheus(prometheus_bin: str, engines: list[SimServer], tmp_path: Path) -> Iterator[str]:
    """A Prometheus on plain http."""
    proc, port, log = _start_prometheus(prometheus_bin, engines, tmp_path)
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


@pytest.fixture
def tls_prometheus(
    prometheus_bin: str, engines: list[SimServer], tmp_path: Path
) -> Iterator[tuple[str, PkiPaths]]:
    """A Prometheus serving https with a certificate of a CA of its own (127.0.0.1)."""
    pki = PkiPaths(tmp_path / "pki")
    generate(pki)
    web = {"tls_server_config": {"cert_file": str(pki.apiserver_crt), "key_file": str(pki.apiserver_key)}}
    proc, port, log = _start_prometheus(prometheus_bin, engines, tmp_path, web)
    try:
        wait_http_ok_tls(f"https://127.0.0.1:{port}/-/ready", pki.ca_crt, 60, proc, log)
        yield f"https://127.0.0.1:{port}", pki
    finally:
        stop(proc)


def wait_http_ok_tls(url: str, ca: Path, within: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Block until `url` answers 200 over TLS verified by `ca`; fail if `proc` died meanwhile."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready after {within} s"
        time.sleep(0.2)


@asynccontextmanager
async def _token_front(upstream: str, ca: Path, pki: PkiPaths, accepted: list[str]) -> AsyncIterator[str]:
    """A loopback https front in the role of kube-rbac-proxy: 401 unless the request carries
    `Bearer <accepted[0]>`, else the request goes on to `upstream` over verified TLS."""
    upstream_tls = ssl.create_default_context(cafile=str(ca))
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(str(pki.apiserver_crt), str(pki.apiserver_key))

    async def forward(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {accepted[0]}":
            return web.json_response({"status": "error", "error": "unauthorized"}, status=401)
        async with (
            aiohttp.ClientSession() as http,
            http.get(upstream + request.path_qs, ssl=upstream_tls) as r,
        ):
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=serving).start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_prometheus_source_verifies_tls_with_its_ca_and_sends_a_rotating_token(
    engines: list[SimServer], tls_prometheus: tuple[str, PkiPaths], tmp_path: Path
) -> None:
    """`--prometheus-ca-file` and `--prometheus-token-file` against a Prometheus serving TLS behind
    a token-checking front: read with both; unread without the CA (the certificate is not the
    system's) or without the token (401); a rotated token file is read again on the next query."""
    url, pki = tls_prometheus
    eps = [Endpoint(s.url(), "both", s.host, s.ports[0], pod=f"decode-{i}") for i, s in enumerate(engines)]
    token = tmp_path / "token"
    token.write_text("alpha\n")
    accepted = ["alpha"]
    async with _token_front(url, pki.ca_crt, pki, accepted) as front:
        source = PrometheusQuery(front, ca_file=str(pki.ca_crt), token_file=str(token))
        no_ca = PrometheusQuery(front, token_file=str(token))
        no_token = PrometheusQuery(front, ca_file=str(pki.ca_crt))
        try:

            async def read() -> list[EngineSample | None]:
                return await source.samples(NAMESPACE, eps)

            async def scraped() -> bool:
                return all(s is not None for s in await read())

            await wait_until(
                scraped, 60, "Prometheus (over TLS, behind the front) to have scraped both engines"
            )
            assert await no_ca.samples(NAMESPACE, eps) == [None, None]
            assert await no_token.samples(NAMESPACE, eps) == [None, None]

            accepted[0] = "beta"  # the front now takes only the new token ...
            assert await read() == [None, None]
            token.write_text("beta")  # ... which the next query reads from the rotated file
            assert all(s is not None for s in await read())
        finally:
            for q in (source, no_ca, no_token):
                await q.close()
