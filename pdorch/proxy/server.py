"""The proxy's HTTP edge: OpenAI-compatible routes, admission, P/D legs, byte relay, health checks.

Hot-path choices:
- Engine legs: `pdorch.proxy.upstream.UpstreamPool`, pooled keep-alive connections over asyncio +
  httptools (the fastest client measured side by side, bench/proxy/clients.py). Health checks and
  /v1/models, off the hot path, use one long-lived `aiohttp.ClientSession`.
- Relay: decode bytes are written to the client as they arrive (`iter_any`), never re-parsed; only the
  small vLLM prefill response is decoded (for `kv_transfer_params`).
- Client side: `pdorch.proxy.http_server` (asyncio Protocol + httptools), not aiohttp's web server:
  about 100-200 us less CPU per request on the latency path (measured in that module's docstring).
- Cancellation: a client that goes away cancels the handler; every leg's response is then closed (not
  returned to the pool), which the engines see as a disconnect and abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import aiohttp
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdorch.proxy import breaker as brk
from pdorch.proxy.blame import silent_pair_blame
from pdorch.proxy.config import ProxyConfig
from pdorch.proxy.deadline import Deadline
from pdorch.proxy.discovery import KubeDiscovery
from pdorch.proxy.endpoints import Endpoint, EndpointSet, group_by_revision
from pdorch.proxy.errors import ProxyError
from pdorch.proxy.http_server import (
    BodyMalformed,
    BodyTooLarge,
    Handler,
    HttpServer,
    Request,
    Response,
    StreamResponse,
    json_response,
)
from pdorch.proxy.metrics import ProxyMetrics
from pdorch.proxy.openapi import openapi_document
from pdorch.proxy.policies import (
    Decision,
    Mode,
    NoRoute,
    PrefixIndex,
    RouteRequest,
    choose,
    disaggregation,
    readiness,
)
from pdorch.proxy.prefill_queue import NO_TICKET, PrefillQueue, Ticket
from pdorch.proxy.progress import ProgressWatch, step_tokens
from pdorch.proxy.protocols import (
    Kind,
    RoomMinter,
    estimate_prompt_tokens,
    routing_text,
    sglang_batch_size,
    sglang_body,
    vllm_decode_body,
    vllm_prefill_body,
)
from pdorch.proxy.request_ids import RequestIds
from pdorch.proxy.sse import EventAligner
from pdorch.proxy.token_ratio import TokenRatio
from pdorch.proxy.upstream import EngineStalled, Sent, UpstreamPool, UpstreamResponse, UpstreamTimeout
from pdorch.proxy.validation import (
    check_sglang_fanout,
    check_vllm_single_prompt,
    decode_json,
    model_ids,
    model_lengths,
    parse_json,
    validate,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MODELS_RETRY_S = 5.0  # after a failed /v1/models fetch, validate without the list for this long
QUEUE_POKE_S = 0.5  # how often waiting prompts are offered to newly usable prefill engines
# A departed address's error and retry counters outlive it this long: several scrapes at any usual
# interval see their last values before the series goes.
DEPARTED_SERIES_TTL_S = 600.0
PREFILL_DRAIN_S = 5.0  # an SGLang prefill answers this soon after its decode did (its KV was pushed)


class Discovery(Protocol):
    """Source of the current endpoint set."""

    def current(self) -> EndpointSet: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LegFailure(Exception):
    """A leg failed in a way a fresh pair may fix (connect error, 5xx before the first byte)."""

    def __init__(self, endpoint: Endpoint, leg: str, reason: str, detail: str) -> None:
        super().__init__(f"{leg} {endpoint.url}: {detail}")
        self.endpoint, self.leg, self.reason = endpoint, leg, reason


class _ClientGone(Exception):
    """The client connection failed while we wrote to it."""


class UpstreamReply(Exception):
    """An engine answered with a client error (4xx): relayed to the client as is."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"upstream {status}")
        self.status, self.body, self.content_type = status, body, content_type


@dataclass
class Progress:
    """Which leg an attempt is waiting on (to blame the right endpoint on a timeout)."""

    endpoint: Endpoint
    leg: str
    started: float = 0.0
    # SGLang: both legs are in flight at once; whether this request's prefill leg has answered.
    sglang_prefill: Endpoint | None = None
    prefill_answered: bool = False
    # The request's room in the prefill queue, given back when its prefill leg ends.
    ticket: Ticket = NO_TICKET
    # The prompt's tokens as the prefill engine counted them (vLLM's `usage`), when it said.
    prompt_tokens: int | None = None


class _PrefillDeadline:
    """`Deadline` on a prefill leg whose expiry is that engine's silence: raises `LegSilent` (a
    `None` budget arms nothing; other exceptions pass through unchanged)."""

    __slots__ = ("_budget", "_deadline", "_ep")

    def __init__(self, loop: asyncio.AbstractEventLoop, ep: Endpoint, budget: float | None) -> None:
        self._deadline = Deadline(loop, budget)
        self._ep, self._budget = ep, budget

    def __enter__(self) -> None:
        self._deadline.__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            self._deadline.__exit__(exc_type, exc, tb)
        except TimeoutError:
            assert self._budget is not None  # only an armed deadline fires
            raise LegSilent(self._ep, "prefill", self._budget) from None


class LegSilent(Exception):
    """A leg bounded by the first-byte budget stayed silent past it (the decode of a non-streamed
    answer is bounded by the request timeout instead, so this names the prefill there)."""

    def __init__(self, endpoint: Endpoint, leg: str, budget: float) -> None:
        super().__init__(f"{leg} {endpoint.url}: silent for {budget:.1f}s")
        self.endpoint, self.leg, self.budget = endpoint, leg, budget


@dataclass
class Opened:
    """A decode response whose headers and first body bytes arrived, ready to relay."""

    resp: UpstreamResponse
    first: bytes
    decision: Decision
    background: asyncio.Task[Any] | None = None  # SGLang prefill leg still draining
    prefill_sent: Sent | None = None  # that leg's request, to drop its connection if the leg is cancelled
    legs: list[Endpoint] = field(default_factory=list)  # endpoints counted in-flight until close


def queue_full(metrics: ProxyMetrics, message: str) -> ProxyError:
    """The 429 for a full wait queue (admission's or the prefill queue's), counted."""
    metrics.rejected.labels("queue_full").inc()
    return ProxyError(429, message, code="queue_full", retry_after=RETRY_AFTER_S)


def shutdown_plan(grace_s: float, drain_delay_s: float) -> tuple[float, float]:
    """(how long the listener stays open after a stop begins, the time left at the end of the
    grace for cut-off handlers to write their error), so that the two fit in ``grace_s``."""
    margin = min(1.0, grace_s / 10)
    return max(0.0, min(drain_delay_s, grace_s - margin)), margin


def shutting_down() -> ProxyError:
    """The 503 of a request the proxy will not serve because it is shutting down."""
    return ProxyError(503, "proxy is shutting down", code="shutting_down", retry_after=RETRY_AFTER_S)


class Admission:
    """At most ``max_inflight`` requests upstream at once and ``max_queue`` waiting; beyond that 429."""

    def __init__(self, max_inflight: int, max_queue: int, metrics: ProxyMetrics) -> None:
        self._sem = asyncio.Semaphore(max_inflight)
        self.max_queue = max_queue
        self.waiting = 0
        self.metrics = metrics

    @property
    def full(self) -> bool:
        """Whether a request would have to wait for a slot now."""
        return self._sem.locked()

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if allowed; raises 429 when the queue is full."""
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise queue_full(self.metrics, f"too many requests: {self.max_queue} already waiting")
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.metrics.active.inc()

    def release(self) -> None:
        """Give the slot back."""
        self._sem.release()
        self.metrics.active.dec()


_ENCODER = msgspec.json.Encoder()


def encode_json(obj: Any) -> bytes:
    """JSON bytes of an upstream body: msgspec (several times faster), or the stdlib for what it
    cannot encode (integers beyond 64 bits that a client may legally send)."""
    try:
        return _ENCODER.encode(obj)
    except (OverflowError, TypeError, UnicodeEncodeError, msgspec.EncodeError):
        # The stdlib also escapes a lone surrogate ("\ud800", which json.loads accepted) as JSON
        # allows, where msgspec refuses to encode it as UTF-8.
        return json.dumps(obj).encode()


def _is_json_object(data: bytes) -> bool:
    try:
        parse_json(data)  # the request bodies' check: malformed, too deeply nested, not an object
    except ProxyError:
        return False
    return True


def error_response(exc: ProxyError, request_id: str | None = None) -> Response:
    """The JSON error response of ``exc`` (with Retry-After / X-Request-Id when set)."""
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if request_id:
        headers["X-Request-Id"] = request_id
    resp = json_response(exc.body(), status=exc.status, headers=headers)
    # The rest of a trickled or oversized body is not worth waiting for: drop the connection. A
    # proxy shutting down closes it too, so the client's next request goes to another replica.
    resp.close = exc.status in (408, 413) or exc.code == "shutting_down"
    return resp


def _drop_prefill(task: asyncio.Task[Any], sent: Sent | None) -> None:
    """Give up an SGLang prefill leg: cancel its task and drop its connection (a task cancelled before
    its first step never runs its own cleanup)."""
    task.cancel()
    if sent is not None:
        sent.abort()


# An engine's error body is a short JSON message; an answer is bounded by its tokens. Reading either
# unbounded let one misbehaving engine take the proxy's memory (a 3 GiB body: ~6 GB RSS).
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 256 * 1024 * 1024


def sse_error(exc: ProxyError) -> bytes:
    """An SSE event carrying an error, for failures after a stream started, then the stream's end
    (as vLLM ends its own streams on an error: clients that wait for [DONE] stop there)."""
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\ndata: [DONE]\n\n"


_END_MARKER = re.compile(rb"(?:^|\n)data: ?\[DONE\]\s*$")
# Enough of a stream's last bytes to hold its end marker, however the engine split its writes.
_TAIL_BYTES = 64


def _ends_stream(tail: bytes) -> bool:
    """Whether an OpenAI-style event stream's last bytes are its end marker (the space after
    ``data:`` is optional in SSE)."""
    return _END_MARKER.search(tail) is not None


def _is_whole_json(body: bytes) -> bool:
    try:
        decode_json(body)
    except (ValueError, RecursionError):
        return False
    return True


CUT_AT_CLOSE = "the engine closed the connection before the end of its answer"


class ProxyServer:
    """The proxy: ``await start()`` binds, ``await stop()`` drains; `port` is the bound port."""

    def __init__(
        self,
        config: ProxyConfig,
        discovery: Discovery,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.discovery = discovery
        if isinstance(discovery, KubeDiscovery) and discovery.on_change is None:
            # A pod gone or replaced at its address is forgotten when the watch says so, not at
            # the next health check (its idle pooled connections must not reach the replacement).
            discovery.on_change = self._forget_departed
        self.rng = rng or random.Random()
        self.clock = clock
        self.metrics = ProxyMetrics()
        # Per-endpoint state is keyed by `Endpoint.key` (URL and pod UID: a new pod at a deleted one's
        # address starts clean); metric series by `Endpoint.label` (the URL).
        self.loads: dict[str, int] = {}
        # (label, role) of every endpoint that had a leg: the in-flight gauge's series.
        self._leg_series: dict[str, tuple[str, str]] = {}
        self.breakers: dict[str, brk.Breaker] = {}
        self._breaker_series: set[str] = set()  # labels the breaker gauge has a series for
        self._addresses: dict[tuple[str, int], str] = {}  # (host, port) -> key, as last seen
        self._departed_since: dict[str, float] = {}  # label -> when it left discovery
        self.breaker_cfg = brk.BreakerConfig(
            config.breaker_failures, config.breaker_cooldown_s, config.breaker_successes
        )
        self.prefix = PrefixIndex()
        # Tokens per prompt character, per kind of request (a chat template adds its own tokens).
        self.token_ratios: defaultdict[Kind, TokenRatio] = defaultdict(TokenRatio)
        self.rooms = RoomMinter()
        self.request_ids = RequestIds()
        # Round-robin position per mode: a shared one aliased with the traffic's own mix (P/D and
        # decode-only requests alternating sent every P/D request to the same prefill).
        self.counters: dict[Mode, int] = {"pd": 0, "decode_only": 0}
        self.draining = False
        # Shutdown: handlers waiting for admission or prefill room (answered 503 when draining
        # starts), those told so, and whether the grace ran out (open answers end with an error).
        self._waiting: set[asyncio.Task[Any]] = set()
        self._shed: set[asyncio.Task[Any]] = set()
        self._grace_over = False
        self.port: int | None = None
        # (fetched at, raw /v1/models answer, model ids, each model's max_model_len where it says)
        self._models: tuple[float, bytes, frozenset[str], dict[str, int]] | None = None
        self._models_lock = asyncio.Lock()
        self._models_failed_at = -MODELS_RETRY_S
        self._admission = Admission(config.max_inflight, config.max_queue, self.metrics)
        self._prefill_queue = (
            None
            if config.prefill_queue_tokens is None
            else PrefillQueue(
                config.prefill_queue_tokens,
                config.prefill_queue_ttft_s,
                config.prefill_queue_max_wait_s,
                self._prefill_engines,
                clock,
                self.metrics.prefill_queue_depth.set,
            )
        )
        self._session: aiohttp.ClientSession | None = None  # health checks and /v1/models
        self._upstream: UpstreamPool | None = None  # the engine legs (the hot path)
        self._http: HttpServer | None = None
        self._metrics_http: HttpServer | None = None
        self.metrics_port: int | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._queue_task: asyncio.Task[None] | None = None
        # Pending non-streamed decode answers and their engines' progress (an engine whose counters
        # stand still for the first-byte limit fails them: pdorch.proxy.progress).
        self._progress = ProgressWatch(config.first_byte_timeout_s)
        self._progress_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # When each endpoint last completed a leg of a request (not a health check): evidence that
        # it is alive when an SGLang pair goes silent (pdorch.proxy.blame).
        self._served: dict[str, float] = {}
        # The serving loop, kept: on Python 3.11 every loop lookup is a getpid syscall (see
        # pdorch.proxy.deadline), and the hot path would otherwise make about fifteen per request.
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def routes(self) -> dict[tuple[str, str], Handler]:
        """The client-facing routes; /metrics is among them only when no ``metrics_port`` is set."""
        routes = {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._models_route,
            ("GET", "/health"): self._health,
            ("GET", "/livez"): self._livez,
            ("GET", "/openapi.json"): self._openapi_route,
        }
        if self.config.metrics_port is None:
            routes[("GET", "/metrics")] = self._metrics_route
        return routes

    def _http_error(self, status: int, message: str) -> Response:
        return error_response(ProxyError(status, message, code=status))

    async def start(self) -> None:
        """Start discovery, the upstream client, health checks, and bind the listener."""
        self._loop = asyncio.get_running_loop()
        await self.discovery.start()
        c = self.config
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True
        )
        self._upstream = UpstreamPool(c.connect_timeout_s, c.upstream_idle_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Health checks and /v1/models only (each bounded by health_timeout_s where it is used);
            # the engine legs go through `self._upstream`.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=c.connect_timeout_s,
                sock_connect=c.connect_timeout_s,
                sock_read=c.upstream_idle_timeout_s,  # re-armed on every read: silence, not length
            ),
            auto_decompress=False,
            # Engines' cookies must never be stored and replayed to another client's request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # The idle timer closes a connection without a complete request head in time: it bounds idle
        # keep-alives and slowloris-style partial heads alike.
        self._http = HttpServer(
            self.routes(),
            max_body_bytes=c.max_body_bytes,
            idle_timeout_s=c.client_idle_timeout_s,
            error=self._http_error,
        )
        self.port = await self._http.start(c.host, c.port)
        if c.metrics_port is not None:
            self._metrics_http = HttpServer(
                {("GET", "/metrics"): self._metrics_route},
                max_body_bytes=64 * 1024,
                idle_timeout_s=c.client_idle_timeout_s,
                error=self._http_error,
            )
            self.metrics_port = await self._metrics_http.start(c.host, c.metrics_port)
        self._health_task = asyncio.create_task(self._health_loop(), name="proxy-health")
        if self._prefill_queue is not None:
            self._queue_task = asyncio.create_task(self._poke_queue(self._prefill_queue), name="proxy-queue")
        if c.stream_idle_timeout_s is not None:
            self._watchdog_task = asyncio.create_task(
                self._silence_watchdog(c.stream_idle_timeout_s), name="proxy-silence-watchdog"
            )
        self._progress_task = asyncio.create_task(
            self._progress_watchdog(self._progress), name="proxy-progress-watchdog"
        )
        log.info("pdorch proxy (%s, %s) listening on %s:%s", c.engine, c.policy, c.host, self.port)

    async def stop(self, drain_delay_s: float = 0.0) -> None:
        """Drain and close, all within the configured grace period.

        Draining starts at once: /health answers 503 "draining", new generation requests and those
        waiting for admission or prefill room get a 503. The listener stays open for
        ``drain_delay_s`` (so load balancers see that and move traffic, rather than clients being
        refused), then closes; in-flight requests go on until the grace ends, when open streams get
        an SSE error event and non-streamed requests a 503 before their connections are closed."""
        self.draining = True
        self._shed_waiters()
        loop = asyncio.get_running_loop()
        start = loop.time()
        grace = self.config.shutdown_grace_s
        delay, margin = shutdown_plan(grace, drain_delay_s)
        if self._http is not None:
            if delay > 0:
                await asyncio.sleep(delay)
            # Both listeners go at once: a successor on this address (a pod that gets the IP
            # again) binds both ports while this process still finishes its streams.
            if self._metrics_http is not None:
                self._metrics_http.stop_accepting()
            left = max(0.0, grace - margin - (loop.time() - start))
            await self._http.close(left, on_expiry=self._end_of_grace, cancel_wait_s=margin)
            self._http = None
        if self._metrics_http is not None:
            await self._metrics_http.close(0.0)
            self._metrics_http = None
        for task in (self._health_task, self._watchdog_task, self._queue_task, self._progress_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for t in list(self._background):
            t.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        await self.discovery.stop()

    def _shed_waiters(self) -> None:
        """Answer 503 to every request waiting for admission or prefill room (`_generate`)."""
        for task in self._waiting:
            self._shed.add(task)
            task.cancel()
        self._waiting.clear()

    def _end_of_grace(self) -> None:
        """The grace period is over: the handlers about to be cancelled end their answers with an
        error (`_relay`, `_generate`) instead of just losing their connections."""
        self._grace_over = True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the proxy serves on."""
        assert self._loop is not None, "ProxyServer not started"
        return self._loop

    @property
    def upstream(self) -> UpstreamPool:
        """The engine legs' pooled client."""
        assert self._upstream is not None, "ProxyServer not started"
        return self._upstream

    @property
    def session(self) -> aiohttp.ClientSession:
        """The client for health checks and /v1/models (off the hot path)."""
        assert self._session is not None, "ProxyServer not started"
        return self._session

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _blocked(self, probes: bool = True) -> frozenset[str]:
        """Endpoints the breakers keep traffic from; ``probes=False`` ignores the half-open probe
        limit (for /health: a probe in flight does not make the proxy unready)."""
        now = self.clock()
        loads = self.loads if probes else {}
        # A closed breaker always allows: only the others are asked.
        return frozenset(
            k
            for k, b in self.breakers.items()
            if b.state is not brk.BreakerState.CLOSED
            and not brk.allows(b, self.breaker_cfg, now, loads.get(k, 0))
        )

    # The breaker gauge is set from `breakers` at scrape time (as the in-flight gauge is from
    # `loads`), not on every outcome: an open breaker turns half-open with time, not with an outcome.
    def _outcome(self, ep: Endpoint, ok: bool) -> None:
        """A request leg's outcome: feeds the endpoint's breaker; a success is also liveness."""
        now = self.clock()
        if ok:
            self._served[ep.key] = now
        b = self.breakers.get(ep.key, brk.Breaker())
        b = (
            brk.record_success(b, self.breaker_cfg, now)
            if ok
            else brk.record_failure(b, self.breaker_cfg, now)
        )
        self.breakers[ep.key] = b

    # The in-flight gauge is filled from `loads` at scrape time, not on every leg: two gauge updates
    # per leg would sit on the path to the upstream writes.
    def _leg_start(self, ep: Endpoint) -> None:
        self.loads[ep.key] = self.loads.get(ep.key, 0) + 1
        if ep.key not in self._leg_series:
            self._leg_series[ep.key] = (ep.label, ep.role)

    def _leg_end(self, ep: Endpoint) -> None:
        self.loads[ep.key] = max(0, self.loads.get(ep.key, 0) - 1)

    def _leg_failed(self, f: LegFailure) -> None:
        self.metrics.errors.labels(f.endpoint.label, f.leg, f.reason).inc()
        self._outcome(f.endpoint, ok=False)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # Outcomes are read where they matter; this only keeps asyncio from logging them as lost.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    # -- middleware and small routes -----------------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            self.metrics.rejected.labels("unauthorized").inc()
            raise ProxyError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                param="Authorization",
                code="invalid_api_key",
            )

    async def _health(self, _: Request) -> Response:
        if self.draining:
            return json_response({"status": "draining", "reason": "shutting down"}, status=503)
        eps = self.discovery.current()
        # Conditional disaggregation gives short prompts a decode-only path (ProxyConfig refuses it
        # for SGLang, whose decode needs a prefill's bootstrap room), so decodes alone keep the
        # proxy ready, degraded; without that path a proxy out of pairs would only answer 503s.
        status, reason = readiness(eps, self._blocked(probes=False), self.config.min_prompt_tokens)
        body = {
            "status": status,
            "reason": reason,
            "prefill": len(eps.prefills()),
            "decode": len(eps.decodes()),
            "revisions": eps.revisions(),
        }
        return json_response(body, status=503 if status == "unavailable" else 200)

    async def _livez(self, _: Request) -> Response:
        # Liveness must not depend on the engines: with /health as its liveness probe, every proxy
        # replica was restarted (in-flight streams cut) whenever no usable pair existed for a minute.
        return json_response({"status": "draining" if self.draining else "alive"})

    async def _openapi_route(self, _: Request) -> Response:
        return json_response(openapi_document(self.config))

    async def _metrics_route(self, _: Request) -> Response:
        eps = self.discovery.current()
        # Departed pods' breakers go first: one whose address a new pod took must not speak for it.
        self._forget_departed(eps)
        self.metrics.endpoints.clear()
        for e in eps.endpoints:
            self.metrics.endpoints.labels(e.role, e.revision).inc()
        now = self.clock()
        for e in eps.endpoints:
            b = self.breakers.get(e.key)
            if b is not None:
                self.metrics.breaker.labels(e.label).set(
                    brk.effective_state(b, self.breaker_cfg, now).metric_value
                )
                self._breaker_series.add(e.label)
        # A departed pod still serving its last answers and its successor at the same address share
        # a series: legs in flight to that address.
        inflight: dict[tuple[str, str], int] = {}
        for key, series in self._leg_series.items():
            inflight[series] = inflight.get(series, 0) + self.loads.get(key, 0)
        for (label, role), n in inflight.items():
            self.metrics.inflight.labels(label, role).set(n)
        return Response(200, generate_latest(self.metrics.registry), {"Content-Type": CONTENT_TYPE_LATEST})

    async def _fetch_models(self) -> tuple[bytes, frozenset[str], dict[str, int]] | None:
        now = self.clock()
        if self._models is not None and now - self._models[0] < self.config.models_ttl_s:
            return self._models[1:]
        if now - self._models_failed_at < MODELS_RETRY_S:
            # Recently unreachable: do not make every request wait; use a stale list if any.
            return self._models[1:] if self._models else None
        async with self._models_lock:
            if self._models is not None and self.clock() - self._models[0] < self.config.models_ttl_s:
                return self._models[1:]
            if self.clock() - self._models_failed_at < MODELS_RETRY_S:
                # The holder we waited for just failed: do not repeat its whole fetch per waiter.
                return self._models[1:] if self._models else None
            blocked = self._blocked()
            decodes = [e for e in self.discovery.current().decodes() if e.key not in blocked]
            self.rng.shuffle(decodes)
            for ep in decodes[:3]:
                try:
                    async with asyncio.timeout(self.config.health_timeout_s):
                        async with self.session.get(ep.url + "/v1/models") as r:
                            if r.status != 200:
                                continue
                            raw = await r.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.debug("models from %s failed: %r", ep.url, exc)
                    continue
                ids = model_ids(raw)
                if ids is None:
                    log.debug("models from %s: not a model list: %r", ep.url, raw[:200])
                    continue
                self._models = (self.clock(), raw, ids, model_lengths(raw))
                return self._models[1:]
            self._models_failed_at = self.clock()
        return self._models[1:] if self._models else None

    async def _models_route(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except ProxyError as exc:
            return error_response(exc)
        got = await self._fetch_models()
        if got is None:
            return error_response(
                ProxyError(
                    503, "no decode endpoint answered /v1/models with a model list", retry_after=RETRY_AFTER_S
                )
            )
        return Response(200, got[0], {"Content-Type": "application/json"})

    # -- health checks -------------------------------------------------------------------------------

    async def _check_one(self, ep: Endpoint) -> None:
        try:
            async with asyncio.timeout(self.config.health_timeout_s):
                async with self.session.get(ep.url + "/health") as r:
                    await r.read()
                    ok = r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        # A failed check marks the breaker (a dead engine is found without traffic). A passing one
        # does not clear request failures: an engine whose /health answers while its generations
        # fail would otherwise never be cut off. A recovered engine closes its breaker through the
        # half-open probes, which are requests.
        if not ok:
            self._outcome(ep, False)

    def _forget_departed(self, snapshot: EndpointSet) -> None:
        """Drop the state of endpoints no longer discovered (a pod gone, or replaced by another pod
        at its address), and their metric series unless a live endpoint still uses them. A departed
        endpoint's legs still in flight keep its load until they end."""
        eps = snapshot.endpoints
        live = {e.key for e in eps}
        for key in [k for k in self._served if k not in live]:
            del self._served[key]
        for key in [k for k in self.breakers if k not in live]:
            del self.breakers[key]  # endpoint gone: forget its history
        # Its series goes too (no open breaker on the dashboards for a pod that no longer exists),
        # unless a live endpoint has it: it is then set from that endpoint's breaker, or removed if
        # that one has none yet (a new pod at the address starts closed, with no series).
        kept = {e.label for e in eps if e.key in self.breakers}
        for label in self._breaker_series - kept:
            self._breaker_series.discard(label)
            with contextlib.suppress(KeyError):
                self.metrics.breaker.remove(label)
        for key in [k for k in self.loads if k not in live and not self.loads[k]]:
            del self.loads[key]  # one entry per pod ever seen would otherwise pile up
        for key in [k for k in self._leg_series if k not in live and not self.loads.get(k)]:
            series = self._leg_series.pop(key)
            if series not in self._leg_series.values():
                with contextlib.suppress(KeyError):
                    self.metrics.inflight.remove(*series)
        self._expire_counter_series({e.label for e in eps})
        if self._upstream is not None:
            # Idle connections to an address whose pod left, or was replaced, are not reused: the
            # replacement must not be reached over the old pod's connections.
            addresses = {(e.host, e.port): e.key for e in eps}
            replaced = {a for a, key in addresses.items() if self._addresses.get(a, key) != key}
            self._upstream.retain(addresses.keys() - replaced)
            self._addresses = addresses

    def _expire_counter_series(self, live: set[str]) -> None:
        """Remove the error and retry series of an address that has been out of discovery for
        `DEPARTED_SERIES_TTL_S`. Removed at once, a pod's last failures could vanish before any
        scrape saw them; kept for ever, every address a churning fleet ever used stays a series."""
        now = self.clock()
        for label in live:
            self._departed_since.pop(label, None)
        for label in self.metrics.counted_endpoints() - live:
            since = self._departed_since.setdefault(label, now)
            if now - since >= DEPARTED_SERIES_TTL_S:
                self.metrics.forget_endpoint(label)
                del self._departed_since[label]

    async def _health_loop(self) -> None:
        while True:
            snapshot = self.discovery.current()
            self._forget_departed(snapshot)
            eps = snapshot.endpoints
            if eps:
                await asyncio.gather(*(self._check_one(e) for e in eps), return_exceptions=True)
            await asyncio.sleep(self.config.health_interval_s)

    # -- generation ----------------------------------------------------------------------------------

    async def _completions(self, request: Request) -> Response | StreamResponse:
        return await self._generate(request, "completion", "/v1/completions")

    async def _chat(self, request: Request) -> Response | StreamResponse:
        return await self._generate(request, "chat", "/v1/chat/completions")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise ProxyError(
                413, f"request body of {request.content_length} bytes exceeds the limit of {limit}"
            )
        try:
            if request.body_complete:  # the usual case: no timer to arm and cancel
                return await request.read()
            async with asyncio.timeout(self.config.body_timeout_s):
                return await request.read()
        except TimeoutError:
            # A client trickling its body (slowloris) must not hold a handler forever.
            self.metrics.rejected.labels("body_timeout").inc()
            raise ProxyError(
                408, f"request body not received within {self.config.body_timeout_s:g}s", code="body_timeout"
            ) from None
        except BodyTooLarge:
            self.metrics.rejected.labels("too_large").inc()
            raise ProxyError(413, f"request body exceeds the limit of {limit} bytes") from None
        except BodyMalformed as exc:
            raise ProxyError(400, str(exc)) from None

    async def _generate(self, request: Request, kind: Kind, path: str) -> Response | StreamResponse:
        t0 = self.clock()
        rid = request.headers.get("x-request-id") or self.request_ids.next()
        status = 500
        try:
            try:
                if self.draining:
                    raise shutting_down()
                self._check_auth(request)
                body = parse_json(await self._read_body(request))
                models = await self._fetch_models()
                # The served models' ids and context lengths: from the cached /v1/models, if any.
                ids, lengths = (models[1], models[2]) if models else (None, None)
                validate(body, kind, ids, lengths)
                if self.config.engine == "sglang":
                    check_sglang_fanout(sglang_batch_size(body, kind) or 1)
                elif kind == "completion":
                    # vLLM's prefill hands back the KV params of the first prompt only.
                    check_vllm_single_prompt(body)
            except ProxyError as exc:
                if exc.status in (400, 404):
                    self.metrics.rejected.labels("invalid").inc()
                status = exc.status
                return error_response(exc, rid)
            if self.draining:  # began while the body was read: do not queue behind the others
                status = 503
                return error_response(shutting_down(), rid)
            tickets = [NO_TICKET]
            try:
                # A request that may wait (prefill room, admission) is answered 503 if draining
                # starts meanwhile (`_shed_waiters`); registered only then, off the common path.
                me: asyncio.Task[Any] | None = None
                if self._prefill_queue is not None or self._admission.full:
                    me = asyncio.current_task(self.loop)
                    assert me is not None
                    self._waiting.add(me)
                try:
                    if self._prefill_queue is not None:
                        # Before admission: a prompt waiting for prefill room holds no upstream
                        # slot, so the queue, not admission's FIFO, decides who goes next.
                        tickets[0] = await self._queued(body, kind, t0)
                    await self._admission.acquire()
                except ProxyError as exc:
                    status = exc.status
                    return error_response(exc, rid)
                finally:
                    if me is not None:
                        self._waiting.discard(me)
                try:
                    resp = await self._serve(request, body, kind, path, rid, t0, tickets)
                    status = resp.status
                    return resp
                finally:
                    self._admission.release()
            finally:
                for t in tickets:
                    t.release()
        except asyncio.CancelledError:
            task = asyncio.current_task(self.loop)
            assert task is not None
            if task in self._shed or (self._grace_over and request.stream is None):
                # Cancelled by the shutdown, not the client: waiting when draining began, or a
                # non-streamed answer still pending at the end of the grace. Answer it.
                self._shed.discard(task)
                task.uncancel()
                status = 503
                return error_response(shutting_down(), rid)
            if not self._grace_over:
                status = 499  # client closed the connection (nginx's convention)
                self.metrics.disconnects.inc()
            else:
                status = 503  # a stream cut at the end of the grace (`_relay` sent the error)
            raise
        finally:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.duration.labels(path).observe(self.clock() - t0)

    def _headers(self, request: Request, rid: str) -> dict[str, str]:
        h = {"Content-Type": "application/json", "X-Request-Id": rid, "Accept-Encoding": "identity"}
        auth = request.headers.get("authorization")
        if auth and not self.config.api_key:
            h["Authorization"] = auth  # transparent when the proxy itself does not authenticate
        return h

    def _route(self, body: dict[str, Any], kind: Kind, avoid: frozenset[str]) -> Decision | NoRoute:
        # Prompt text and its token estimate are only read by prefix affinity and conditional
        # disaggregation: skip building them (a copy of the prompt) for the other policies.
        cache_aware = self.config.policy == "cache_aware"
        text = routing_text(body, kind) if cache_aware else ""
        tokens = plain = 0
        if self.config.min_prompt_tokens > 0:
            ratio = self.token_ratios[kind]
            known = text if cache_aware else routing_text(body, kind)
            tokens = estimate_prompt_tokens(body, kind, known, ratio, self.config.min_prompt_tokens)
            plain = estimate_prompt_tokens(body, kind, known, ratio)
        sampled = tokens > plain
        mode, _ = disaggregation(tokens, self.config.min_prompt_tokens)
        req = RouteRequest(
            endpoints=self.discovery.current(),
            loads=self.loads,
            blocked=self._blocked(),
            avoid=avoid,
            policy=self.config.policy,
            prompt_text=text,
            prompt_tokens=tokens,
            min_prompt_tokens=self.config.min_prompt_tokens,
            counter=self.counters[mode],
        )
        if not avoid:
            # One turn per request, not per attempt: with a retry per request, two decodes and a
            # counter moving per attempt, every first attempt landed on the same (failing) decode.
            self.counters[mode] += 1
        out = choose(req, self.rng, self.prefix if cache_aware else None)
        if sampled and isinstance(out, NoRoute) and out.reason == "no_prefill":
            # A sample only teaches the ratio: with no prefill to sample on, the prompt is served as
            # the short one it is estimated to be (else /health's "degraded" promise would not hold).
            alone = replace(req, prompt_tokens=plain, counter=self.counters["decode_only"])
            out = choose(alone, self.rng, self.prefix if cache_aware else None)
        elif sampled and isinstance(out, Decision) and out.prefill is not None:
            out = replace(out, reason="ratio_sample")  # P/D to teach the token ratio (TokenRatio.against)
        if isinstance(out, Decision):
            # Counted on the next loop turn: off the path to the first upstream write.
            self.loop.call_soon(self._decided, out)
            if cache_aware:
                self.prefix.insert(text, out.prefill or out.decode)
        return out

    def _counted(self, body: dict[str, Any], kind: Kind, prompt_tokens: int) -> None:
        """The engine counted `prompt_tokens` in this request's prompt: learn its tokens per
        character, where an estimate is read at all (conditional disaggregation, prefill queue)."""
        if self.config.min_prompt_tokens > 0 or self._prefill_queue is not None:
            self.token_ratios[kind].observe(len(routing_text(body, kind)), prompt_tokens)

    def _prefill_engines(self) -> int:
        """Prefill engines that may take a leg now: not breaker-blocked, and of a revision with a
        decode to pair them with (early in a rollout the new prefills wait for theirs). Others
        carry no share of the room."""
        blocked = self._blocked() if self.breakers else frozenset()
        usable = [e for e in self.discovery.current().endpoints if e.key not in blocked]
        return sum(len(pre) for pre, dec in group_by_revision(usable).values() if dec)

    async def _queued(self, body: dict[str, Any], kind: Kind, arrival: float) -> Ticket:
        """Room on the prefill role for this prompt (router.prefillQueue is on), within the request
        timeout; `NO_TICKET` when the prompt skips the prefill (conditional disaggregation)."""
        queue = self._prefill_queue
        assert queue is not None
        tokens = estimate_prompt_tokens(body, kind, ratio=self.token_ratios[kind])
        least = self.config.min_prompt_tokens
        # Only a prompt under the threshold can skip the prefill: its sampled estimate (which reads
        # the prompt text again) is needed for it alone.
        if (
            least > 0
            and tokens < least
            and estimate_prompt_tokens(body, kind, ratio=self.token_ratios[kind], threshold=least) < least
        ):
            return NO_TICKET
        return await self._wait_for_room(queue, tokens, arrival)

    async def _wait_for_room(self, queue: PrefillQueue, tokens: int, arrival: float) -> Ticket:
        # Refused only when it would wait (a max_queue of 0 still serves an idle role).
        if len(queue.waiters) >= self.config.max_queue and not queue.fits_now(tokens):
            raise queue_full(
                self.metrics, f"too many requests: {len(queue.waiters)} already waiting for prefill room"
            )
        timeout = self.config.request_timeout_s
        start = self.clock()
        try:
            with Deadline(self.loop, None if timeout is None else max(0.0, arrival + timeout - start)):
                ticket = await queue.acquire(max(tokens, 1), arrival)
        except TimeoutError:
            self.metrics.request_timeouts.labels("prefill_queue").inc()
            why = f"request timeout of {timeout}s reached in the prefill queue"
            raise ProxyError(504, why, code="upstream_timeout") from None
        self.metrics.prefill_queue_wait.observe(self.clock() - start)
        return ticket

    def _decided(self, d: Decision) -> None:
        self.metrics.decisions.labels(d.mode, d.reason).inc()
        self.metrics.picks.labels(self.config.policy, d.pick).inc()

    async def _serve(
        self,
        request: Request,
        body: dict[str, Any],
        kind: Kind,
        path: str,
        rid: str,
        t0: float,
        tickets: list[Ticket],
    ) -> Response | StreamResponse:
        """Open the answer through a P/D pair, retrying with a fresh pair, then relay it. `tickets`
        holds the prefill room of each attempt (the caller releases them all when it ends)."""
        ticket = tickets[0]
        deadline = None if self.config.request_timeout_s is None else t0 + self.config.request_timeout_s
        stream = bool(body.get("stream"))
        headers = self._headers(request, rid)
        avoid: set[str] = set()
        attempts = self.config.max_retries + 1
        opened: Opened | None = None
        for attempt in range(attempts):
            if attempt and ticket.charge and not ticket.held and self._prefill_queue is not None:
                # The failed attempt gave its prefill room back. The retry takes room without queueing
                # (PrefillQueue.take), under a ticket of its own: a late release by the failed
                # attempt's leg must not free the retry's room.
                ticket = self._prefill_queue.take(ticket.tokens)
                tickets.append(ticket)
            decision = self._route(body, kind, frozenset(avoid))
            if isinstance(decision, NoRoute):
                self.metrics.rejected.labels("no_pair").inc()
                unavailable = ProxyError(
                    503, f"no usable prefill/decode pair: {decision.reason}", retry_after=RETRY_AFTER_S
                )
                return error_response(unavailable, rid)
            now = self.clock()
            left = None if deadline is None else max(0.0, deadline - now)
            budget = (
                self.config.first_byte_timeout_s
                if left is None
                else min(self.config.first_byte_timeout_s, left)
            )
            try:
                progress = Progress(
                    decision.prefill or decision.decode,
                    "prefill" if decision.prefill else "decode",
                    now,
                    ticket=ticket,
                )
                # A stream's first bytes come after its first token: the first-byte budget bounds the
                # whole open. A non-streamed answer's first byte is its last, so there only the prefill
                # leg gets that budget (inside `_open`) and the decode leg the request's remaining time.
                with Deadline(self.loop, budget if stream else left):
                    # When the request's own deadline is the nearer one, it alone applies (a prefill
                    # that outlives the client's budget is not charged for it).
                    own = not stream and budget >= self.config.first_byte_timeout_s
                    opened = await self._open(
                        decision, body, path, headers, progress, budget if own else None
                    )
                break
            except LegFailure as f:
                self._leg_failed(f)
                avoid.add(f.endpoint.key)
                if attempt + 1 >= attempts:
                    return error_response(
                        ProxyError(
                            502, f"upstream failed after {attempts} attempt(s): {f}", code="upstream_failed"
                        ),
                        rid,
                    )
                self.metrics.retries.labels(f.endpoint.label, f.leg, f.reason).inc()
                backoff = self.config.retry_backoff_s * (2**attempt) * self.rng.uniform(0.9, 1.1)
                await asyncio.sleep(min(backoff, 1.0))
            except UpstreamReply as u:
                return Response(u.status, u.body, {"Content-Type": u.content_type, "X-Request-Id": rid})
            except LegSilent as silent:
                self._silent(silent.endpoint, silent.leg)
                why = f"no response from the {silent.leg} engine within {silent.budget:.1f}s (first-byte timeout)"
                return error_response(ProxyError(504, why, code="upstream_timeout"), rid)
            except TimeoutError:
                if not stream or budget < self.config.first_byte_timeout_s:
                    # The client's whole-request budget ran out: not the engines' fault.
                    self.metrics.request_timeouts.labels("before_first_byte").inc()
                    why = f"request timeout of {self.config.request_timeout_s}s reached before the first byte"
                else:
                    # The leg we were waiting on stayed silent: a breaker mark for its endpoint.
                    for ep, leg in self._blame_silence(progress):
                        self._silent(ep, leg)
                    why = f"no response from the {progress.leg} engine within {budget:.1f}s (first-byte timeout)"
                return error_response(ProxyError(504, why, code="upstream_timeout"), rid)
        assert opened is not None
        if progress.prompt_tokens is not None:
            # On the next loop turn: off the path to the answer's first bytes.
            self.loop.call_soon(self._counted, body, kind, progress.prompt_tokens)
        return await self._relay(request, opened, stream, path, rid, t0, deadline)

    def _silent(self, ep: Endpoint, leg: str) -> None:
        self._outcome(ep, ok=False)
        self.metrics.errors.labels(ep.label, leg, "first_byte_timeout").inc()

    def _blame_silence(self, progress: Progress) -> list[tuple[Endpoint, str]]:
        """The endpoints a first-byte timeout is charged to: the awaited leg's, or for a silent
        SGLang pair whichever engine shows no sign of life since the request started."""
        p = progress.sglang_prefill
        if p is None:
            return [(progress.endpoint, progress.leg)]
        d = progress.endpoint
        legs = silent_pair_blame(
            progress.prefill_answered,
            self._served.get(p.key, -math.inf) > progress.started,
            self._served.get(d.key, -math.inf) > progress.started,
        )
        return [(p if leg == "prefill" else d, leg) for leg in legs]

    async def _poke_queue(self, queue: PrefillQueue) -> None:
        """Let waiting prompts onto prefill engines that were discovered or came back meanwhile
        (the queue itself only looks when a prompt arrives or a leg ends)."""
        while True:
            await asyncio.sleep(QUEUE_POKE_S)
            if queue.waiters:
                queue.poke()

    async def _silence_watchdog(self, silence_s: float) -> None:
        """Fail relayed answers whose engine went silent (pdorch.proxy.upstream's watch list)."""
        period = min(1.0, silence_s / 4)
        while True:
            await asyncio.sleep(period)
            if self._upstream is not None:
                self._upstream.expire_silent(self.loop.time())

    async def _progress_watchdog(self, watch: ProgressWatch) -> None:
        """Sample the token counters of decode engines with long-pending non-streamed answers, and
        fail the answers of an engine whose counters stood still for the first-byte limit."""
        period = min(5.0, watch.silence_s / 4)
        while True:
            await asyncio.sleep(period)
            due = watch.due(self.clock())
            if not due:
                continue
            samples = await asyncio.gather(*(self._step_tokens(url) for _, url in due))
            now = self.clock()
            for (key, _), value in zip(due, samples, strict=True):
                stuck = watch.observe(key, value, now)
                if stuck:
                    log.warning(
                        "decode engine %s made no progress in %gs; failing %d non-streamed answer(s) waiting on it",
                        key,
                        watch.silence_s,
                        len(stuck),
                    )
                for sent in stuck:
                    assert isinstance(sent, Sent)
                    sent.fail(
                        EngineStalled(f"the engine's token counters stood still for {watch.silence_s:g}s")
                    )

    async def _step_tokens(self, url: str) -> float | None:
        """An engine's per-step token counters (`pdorch.proxy.progress`); None if unreadable."""
        try:
            async with asyncio.timeout(self.config.health_timeout_s):
                # Uncompressed: this session does not decompress, and an unreadable page is no evidence.
                async with self.session.get(url + "/metrics", headers={"Accept-Encoding": "identity"}) as r:
                    return step_tokens(await r.read()) if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    # -- legs ----------------------------------------------------------------------------------------

    async def _post(
        self, ep: Endpoint, leg: str, path: str, payload: bytes, headers: dict[str, str]
    ) -> UpstreamResponse:
        """POST a leg and await its head; connection failures become `LegFailure` (retryable)."""
        return await self._answer(ep, leg, await self._send(ep, leg, path, payload, headers))

    async def _send(self, ep: Endpoint, leg: str, path: str, payload: bytes, headers: dict[str, str]) -> Sent:
        """Put a leg on the wire (no suspension on a pooled connection); a failed connect is a `LegFailure`."""
        try:
            return await self.upstream.send(ep.url, path, payload, headers)
        except aiohttp.ClientError as exc:
            raise LegFailure(ep, leg, "connect", repr(exc)) from None

    async def _answer(self, ep: Endpoint, leg: str, sent: Sent) -> UpstreamResponse:
        """A sent leg's response head; a lost connection or silence is a `LegFailure` (retryable)."""
        try:
            return await sent.response()
        except EngineStalled as exc:
            raise LegFailure(ep, leg, "no_progress", str(exc)) from None
        except aiohttp.ServerTimeoutError as exc:  # upstream_idle_timeout_s passed without headers
            raise LegFailure(ep, leg, "idle_timeout", repr(exc)) from None
        except aiohttp.ClientError as exc:
            raise LegFailure(ep, leg, "connect", repr(exc)) from None

    async def _decode_head(self, dec: Endpoint, sent: Sent, stream: bool, since: float) -> UpstreamResponse:
        """A decode leg's response head. A non-streamed answer's head is its end, so its wait is
        watched for the engine's progress meanwhile (`pdorch.proxy.progress`)."""
        if stream:
            return await self._answer(dec, "decode", sent)
        self._progress.started(dec.key, dec.url, sent, since)
        try:
            resp = await self._answer(dec, "decode", sent)
        finally:
            self._progress.ended(dec.key, sent)
        # The head came, so the body is due at once: an engine that then goes silent is failed
        # after the stream idle limit (a retryable leg failure), not left to the request timeout.
        resp.watch(self.config.stream_idle_timeout_s)
        return resp

    async def _check_status(self, ep: Endpoint, leg: str, resp: UpstreamResponse) -> None:
        """5xx -> `LegFailure` (retryable); 4xx -> `UpstreamReply` (relayed)."""
        if resp.status < 400:
            return
        try:
            data = await resp.read(MAX_ERROR_BODY_BYTES)
        except aiohttp.ClientError:
            data = b""
        finally:
            resp.close()
        if resp.status >= 500:
            raise LegFailure(ep, leg, f"http_{resp.status}", f"HTTP {resp.status}: {data[:300]!r}")
        if not data:
            # Unreadable, or larger than an error message can be: say so rather than relay nothing.
            err = ProxyError(
                resp.status,
                f"the {leg} engine answered HTTP {resp.status} with an unreadable or oversized body",
                code="upstream_error",
            )
            raise UpstreamReply(resp.status, json.dumps(err.body()).encode(), "application/json")
        if not _is_json_object(data):
            # An HTML or plain-text 4xx (a wrong path behind an ingress, a server in front of the
            # engine) would reach clients that parse every error as JSON: wrap it, keeping its text.
            text = " ".join(data[:500].decode("utf-8", "replace").split())
            err = ProxyError(
                resp.status, f"the {leg} engine answered HTTP {resp.status}: {text}", code="upstream_error"
            )
            raise UpstreamReply(resp.status, json.dumps(err.body()).encode(), "application/json")
        raise UpstreamReply(resp.status, data, resp.headers.get("Content-Type", "application/json"))

    async def _first_bytes(self, ep: Endpoint, resp: UpstreamResponse) -> bytes:
        """The first bytes of a decode answer; none at all (a 2xx with an empty body, which no
        completion or event stream is) is a retryable leg failure, not an empty success."""
        try:
            first = await resp.content.readany()
        except aiohttp.ClientError as exc:
            resp.close()
            reason = "idle_timeout" if isinstance(exc, UpstreamTimeout) else "reset"
            raise LegFailure(ep, "decode", reason, repr(exc)) from None
        if not first:
            resp.close()
            raise LegFailure(ep, "decode", "empty", f"HTTP {resp.status} with an empty body")
        return first

    async def _open(
        self,
        d: Decision,
        body: dict[str, Any],
        path: str,
        headers: dict[str, str],
        progress: Progress,
        prefill_budget: float | None,
    ) -> Opened:
        """Open a decode answer through the pair `d`; `prefill_budget` bounds the prefill leg on its
        own (non-streamed answers; a stream's first-byte budget covers the whole open)."""
        if self.config.engine == "vllm":
            return await self._open_vllm(d, body, path, headers, progress, prefill_budget)
        # SGLang: both legs run at once; who a silent pair is charged to is decided by `_blame_silence`.
        progress.endpoint, progress.leg, progress.sglang_prefill = d.decode, "decode", d.prefill
        return await self._open_sglang(d, body, path, headers, progress, prefill_budget)

    async def _open_vllm(
        self,
        d: Decision,
        body: dict[str, Any],
        path: str,
        headers: dict[str, str],
        progress: Progress,
        prefill_budget: float | None,
    ) -> Opened:
        dec = d.decode
        decode_body = body
        t_prefilled: float | None = None
        if d.prefill is not None:
            # The decode is taken now, not when its leg starts after the prefill: the requests
            # routed meanwhile must see it in flight, or a burst all picks the same decode (and a
            # decode on probation, breaker half-open, becomes the probe of every one of them).
            self._leg_start(dec)
            try:
                decode_body, t_prefilled = await self._vllm_prefill(
                    d.prefill, body, path, headers, progress, prefill_budget
                )
            finally:
                self._leg_end(dec)  # counted again below, as every decode leg is
        else:
            progress.ticket.release()  # no prefill leg (a decode-only decision)
        progress.endpoint, progress.leg = dec, "decode"
        t_dec = self.clock()
        self._leg_start(dec)
        try:
            sent = await self._send(dec, "decode", path, encode_json(decode_body), headers)
            resp = await self._decode_head(dec, sent, bool(body.get("stream")), t_dec)
            try:
                await self._check_status(dec, "decode", resp)
                first = await self._first_bytes(dec, resp)
            except BaseException:
                resp.close()
                raise
        except BaseException:
            self._leg_end(dec)
            raise
        now = self.clock()
        # On the next loop turn: a stream's relay writes its first bytes before it yields.
        self.loop.call_soon(
            self._decode_opened,
            "vllm",
            d.mode,
            now - t_dec,
            None if t_prefilled is None else now - t_prefilled,
        )
        return Opened(resp=resp, first=first, decision=d, legs=[dec])

    async def _vllm_prefill(
        self,
        p: Endpoint,
        body: dict[str, Any],
        path: str,
        headers: dict[str, str],
        progress: Progress,
        prefill_budget: float | None,
    ) -> tuple[dict[str, Any], float]:
        """The prefill leg of a vLLM pair: the decode leg's body and when the prefill ended."""
        t = self.clock()
        self._leg_start(p)
        try:
            with _PrefillDeadline(self.loop, p, prefill_budget):
                resp = await self._post(p, "prefill", path, encode_json(vllm_prefill_body(body)), headers)
                try:
                    await self._check_status(p, "prefill", resp)
                    raw = await resp.read(MAX_ANSWER_BYTES)
                except aiohttp.ClientError as exc:
                    raise LegFailure(p, "prefill", "reset", repr(exc)) from None
                finally:
                    resp.close()
        except BaseException:
            progress.ticket.release()
            raise
        finally:
            self._leg_end(p)
        t_prefilled = self.clock()
        progress.ticket.release(t_prefilled - t)
        try:
            answer = decode_json(raw)
            params = answer.get("kv_transfer_params")
        except (ValueError, AttributeError, RecursionError):
            raise LegFailure(p, "prefill", "bad_response", f"not a JSON object: {raw[:200]!r}") from None
        usage = answer.get("usage")
        counted = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(counted, int) and not isinstance(counted, bool):
            progress.prompt_tokens = counted
        # Bookkeeping runs on the next loop turn, once the decode request is on the wire.
        self.loop.call_soon(self._prefill_ok, p, "vllm", t_prefilled - t)
        if params:
            return vllm_decode_body(body, params), t_prefilled
        # EOS as the single prefill token (or a connector misconfiguration): the decode prefills
        # locally with the original body, as vllm-router does. Counted, not hidden.
        self.metrics.no_params.inc()
        return body, t_prefilled

    def _prefill_ok(self, p: Endpoint, engine: str, took: float) -> None:
        self._outcome(p, ok=True)
        self.metrics.prefill.labels(engine).observe(took)

    def _decode_opened(self, engine: str, mode: str, first_byte: float, handoff: float | None) -> None:
        self.metrics.decode_first_byte.labels(engine, mode).observe(first_byte)
        if handoff is not None:
            self.metrics.handoff.labels(engine).observe(handoff)

    async def _sglang_prefill(
        self, p: Endpoint, sent: Sent, t: float, progress: Progress, budget: float | None
    ) -> None:
        """The rest of a prefill leg already on the wire: its status, then its body drained, within
        `budget` if given. The leg's in-flight count is ended by the spawner (a task cancelled before
        its first step runs no code)."""
        with _PrefillDeadline(self.loop, p, budget):
            resp = await self._answer(p, "prefill", sent)
            try:
                await self._check_status(p, "prefill", resp)
                # Drain: the prefill answers once its KV was pushed; its body is not used.
                async for _ in resp.content.iter_any():
                    pass
            except aiohttp.ClientError as exc:
                raise LegFailure(p, "prefill", "reset", repr(exc)) from None
            finally:
                resp.close()
        progress.prefill_answered = True
        took = self.clock() - t
        progress.ticket.release(took)
        self._prefill_ok(p, "sglang", took)

    async def _open_sglang(
        self,
        d: Decision,
        body: dict[str, Any],
        path: str,
        headers: dict[str, str],
        progress: Progress,
        prefill_budget: float | None,
    ) -> Opened:
        p = d.prefill
        payload_obj = body
        if p is None:
            progress.ticket.release()  # no prefill leg (a decode-only decision)
        else:
            kind: Kind = "chat" if path.endswith("/chat/completions") else "completion"
            n = sglang_batch_size(body, kind)
            rooms: int | list[int] = self.rooms.mint() if n is None else [self.rooms.mint() for _ in range(n)]
            payload_obj = sglang_body(body, p.host, p.bootstrap_port, rooms)
        payload = encode_json(payload_obj)
        dec = d.decode
        t = self.clock()
        # Both legs go on the wire in this loop turn, the prefill first (as a router sends them): an SGLang
        # prefill blocks until its decode connects, and a decode whose prefill is broken then fails after
        # the prefill did, so the failure is blamed on the prefill.
        p_sent: Sent | None = None
        if p is not None:
            self._leg_start(p)
            try:
                p_sent = await self._send(p, "prefill", path, payload, headers)
            except BaseException:
                self._leg_end(p)
                raise
        self._leg_start(dec)
        try:
            d_sent = await self._send(dec, "decode", path, payload, headers)
        except BaseException:
            self._leg_end(dec)
            if p is not None and p_sent is not None:
                p_sent.abort()
                self._leg_end(p)
            raise
        p_task: asyncio.Task[Any] | None = None
        if p is not None and p_sent is not None:
            p_task = self._spawn(self._sglang_prefill(p, p_sent, t, progress, prefill_budget))
            prefill, ticket = p, progress.ticket

            def prefill_ended(_: asyncio.Task[Any]) -> None:
                self._leg_end(prefill)
                ticket.release()

            p_task.add_done_callback(prefill_ended)
        # The decode head is awaited in this task (no second task and no asyncio.wait on the hot path);
        # a prefill that fails first cancels this wait: the decode would only wait for KV that never
        # comes, so it is aborted and the caller retries with a fresh pair.
        me = asyncio.current_task(self.loop)
        assert me is not None
        state = {"waiting": True, "prefill_failed": False}

        def on_prefill_done(task: asyncio.Task[Any]) -> None:
            if state["waiting"] and not task.cancelled() and task.exception() is not None:
                state["prefill_failed"] = True
                me.cancel()

        if p_task is not None:
            p_task.add_done_callback(on_prefill_done)
        try:
            resp = await self._decode_head(dec, d_sent, bool(body.get("stream")), t)
            try:
                await self._check_status(dec, "decode", resp)
                first = await self._first_bytes(dec, resp)
            except BaseException:
                resp.close()
                raise
        except BaseException as exc:
            state["waiting"] = False
            d_sent.abort()
            if p_task is not None and p_sent is not None:
                _drop_prefill(p_task, p_sent)
                # Now, not in the cancelled task's callback a loop turn later: a retry that resumes
                # first must see the room given back and take its own.
                progress.ticket.release()
            self._leg_end(dec)
            ours = state["prefill_failed"] and isinstance(exc, asyncio.CancelledError)
            if ours:
                me.uncancel()
            if p_task is not None and (ours or not isinstance(exc, asyncio.CancelledError)):
                if p_task.done() and not p_task.cancelled() and p_task.exception() is not None:
                    # A failed prefill is the root cause even when the decode failed too.
                    raise p_task.exception() from None  # type: ignore[misc]
            raise
        state["waiting"] = False
        took = self.clock() - t
        self.loop.call_soon(self._decode_opened, "sglang", d.mode, took, None if p is None else took)
        return Opened(resp=resp, first=first, decision=d, background=p_task, prefill_sent=p_sent, legs=[dec])

    # -- relay ---------------------------------------------------------------------------------------

    async def _finish_background(self, opened: Opened, abort: bool) -> None:
        task = opened.background
        if task is not None and not task.done() and not abort:
            # The decode finished, so the prefill has pushed its KV and answers at once; bound the wait.
            await asyncio.wait({task}, timeout=PREFILL_DRAIN_S)
            if not task.done():
                p = opened.decision.prefill
                assert p is not None
                self._leg_failed(
                    LegFailure(
                        p, "prefill", "drain_timeout", f"no answer {PREFILL_DRAIN_S:g}s after the decode's"
                    )
                )
        if task is None or task.done():
            # A prefill that failed, or went silent past its budget, after its decode answered
            # still counts against its engine.
            exc = None if task is None or task.cancelled() else task.exception()
            if isinstance(exc, LegFailure):
                self._leg_failed(exc)
            elif isinstance(exc, LegSilent):
                self._silent(exc.endpoint, exc.leg)
            return
        _drop_prefill(task, opened.prefill_sent)

    def _request_timed_out(self) -> ProxyError:
        return ProxyError(
            504,
            f"request timeout of {self.config.request_timeout_s}s reached while the answer was being relayed",
        )

    async def _relay(
        self,
        request: Request,
        opened: Opened,
        stream: bool,
        path: str,
        rid: str,
        t0: float,
        deadline: float | None,
    ) -> Response | StreamResponse:
        resp, d = opened.resp, opened.decision
        ok = False
        aborted = True  # until the relay ends normally, any exit aborts the legs
        try:
            remaining = None if deadline is None else max(0.0, deadline - self.clock())
            resp.watch(self.config.stream_idle_timeout_s)
            if not stream:
                try:
                    with Deadline(self.loop, remaining):
                        rest = await resp.read(MAX_ANSWER_BYTES)
                    if resp.ended_by_close and not _is_whole_json(opened.first + rest):
                        raise aiohttp.ClientPayloadError(CUT_AT_CLOSE)
                except aiohttp.ClientError as exc:  # the engine's fault (its idle timeout included)
                    self.metrics.errors.labels(d.decode.label, "decode", "reset").inc()
                    self._outcome(d.decode, ok=False)
                    status = 504 if isinstance(exc, TimeoutError) else 502
                    return error_response(ProxyError(status, f"decode failed mid-response: {exc!r}"), rid)
                except TimeoutError:  # the client's own budget: no mark against the engine
                    self.metrics.request_timeouts.labels("mid_response").inc()
                    return error_response(self._request_timed_out(), rid)
                headers = {
                    "Content-Type": resp.headers.get("Content-Type", "application/json"),
                    "X-Request-Id": rid,
                }
                self.metrics.ttft.labels(path, d.mode).observe(self.clock() - t0)
                ok, aborted = True, False
                return Response(resp.status, opened.first + rest, headers)
            ct = resp.headers.get("Content-Type", "")
            out = request.start_stream(
                resp.status,
                {
                    "Content-Type": ct if ct.startswith("text/event-stream") else "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Request-Id": rid,
                },
            )
            # Only whole events reach the client (pdorch.proxy.sse): an engine cut off inside an
            # event leaves no half event for the client to choke on before the error event.
            events = EventAligner()
            try:
                try:
                    # The head goes out with the first (whole) events, in one write.
                    await out.write(events.feed(opened.first))
                except ConnectionError:
                    raise _ClientGone from None
                self.metrics.ttft.labels(path, d.mode).observe(self.clock() - t0)
                # The stream's last bytes, kept only when the body's end will be the engine's close
                # (engines chunk their streams): its end marker tells a whole answer from a cut one.
                tail = opened.first[-_TAIL_BYTES:] if resp.close_delimited else None
                with Deadline(self.loop, remaining):
                    async for chunk in resp.content.iter_any():  # upstream failures raise here ...
                        if tail is not None:
                            tail = (tail + chunk[-_TAIL_BYTES:])[-_TAIL_BYTES:]
                        try:
                            await out.write(events.feed(chunk))
                        except ConnectionError:  # ... client failures here (kept apart for blame)
                            raise _ClientGone from None
                    if tail is not None and resp.ended_by_close and not _ends_stream(tail):
                        raise aiohttp.ClientPayloadError(CUT_AT_CLOSE)
                    if events.holding:
                        # The engine ended its answer normally: what it sent last is the client's.
                        try:
                            await out.write(events.rest())
                        except ConnectionError:
                            raise _ClientGone from None
                ok, aborted = True, False
            except _ClientGone:
                self.metrics.disconnects.inc()
                return out
            except asyncio.CancelledError:
                if self._grace_over:
                    # Shutdown's grace is over: say so on the stream (on an event boundary, as
                    # above) rather than only cutting it.
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await out.write(sse_error(shutting_down()))
                        await out.write_eof()
                raise
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Bytes were already streamed: no retry; end the stream with an explicit error event.
                if isinstance(exc, aiohttp.ClientError):  # the engine's fault (its idle timeout included)
                    self.metrics.errors.labels(d.decode.label, "decode", "mid_stream").inc()
                    self._outcome(d.decode, ok=False)
                    err = ProxyError(
                        504 if isinstance(exc, TimeoutError) else 502, f"decode stream interrupted: {exc!r}"
                    )
                else:  # the client's own budget: no mark against the engine
                    self.metrics.request_timeouts.labels("mid_response").inc()
                    err = self._request_timed_out()
                # A half event the engine was cut off in stays in `events`, dropped: only whole
                # events went out, so the error event starts on an event boundary.
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await out.write(sse_error(err))
            with contextlib.suppress(ConnectionError, RuntimeError):
                await out.write_eof()
            return out
        finally:
            if aborted:
                resp.close()  # drop the connection: the engine sees the disconnect and aborts
            else:
                resp.release()
            for ep in opened.legs:
                self._leg_end(ep)
            if ok:
                self._outcome(d.decode, ok=True)
            task = opened.background
            if not aborted and task is not None and not task.done():
                # The answer is complete: send it now, and let the SGLang prefill leg finish (bounded)
                # on its own instead of holding the response until it does.
                self._spawn(self._finish_background(opened, abort=False))
            else:
                await self._finish_background(opened, abort=aborted)
