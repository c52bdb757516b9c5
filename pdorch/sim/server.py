"""`SimServer`: one process serving many simulated engines, one per local endpoint (IP and port).

The server listens on ``host`` (default 0.0.0.0) and one or more ports; each request is handed to the
engine of the local address it arrived on (``sockname``), created on first use. Under kwok every fake pod
IP (127.X.x.y) therefore gets its own engine, KV pool and `/metrics`. Roles come from ``roles`` (keys
``"ip"`` or ``"ip:port"``) with ``role`` as the default. For SGLang, a bootstrap server (`/route`,
`/health`) runs on ``bootstrap_port`` when any engine may be a prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from pdorch.lifecycle import freeze_startup_heap
from pdorch.sim import bootstrap, faults, nixl
from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Engine, Role
from pdorch.sim.metrics import EngineMetrics, SglangMetrics, VllmMetrics
from pdorch.sim.sglang_api import SglangFrontend
from pdorch.sim.vllm_api import VllmFrontend

log = logging.getLogger(__name__)
# aiohttp's own shutdown timeout, once `stop` has drained: it reads 0 as "wait for every handler",
# so the smallest positive value is what aborts what is left.
_ABORT_S = 0.001
_ENGINE_TYPE = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.BOTH: "unified"}


class SimServer:
    """Simulated vLLM or SGLang engines behind one aiohttp server.

    Use ``await start()`` / ``await stop()`` (or ``async with``); `engine(ip, port)` gives tests direct
    access to an engine's state. Engines are created on their first request, so `roles` may still be
    filled in after `start()` (e.g. once ports chosen with port 0 are known).
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "0.0.0.0",
        ports: Sequence[int] = (8000,),
        role: Role = Role.BOTH,
        roles: Mapping[str, Role] | None = None,
        bootstrap_port: int | None = bootstrap.DEFAULT_BOOTSTRAP_PORT,
        serve_bootstrap: bool | None = None,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        """``shutdown_timeout_s`` is vLLM's ``--shutdown-timeout``: how long `stop` lets in-flight
        requests finish once it stopped accepting; 0 aborts them at once (`pdorch sim`'s default,
        as vLLM's; in-process users such as tests get 5 s unless they say otherwise)."""
        self.config = config or SimConfig()
        self.host = host
        self.requested_ports = list(ports)
        self.default_role = role
        self.roles = dict(roles or {})
        self.requested_bootstrap_port = bootstrap_port if self.config.protocol == "sglang" else None
        self.serve_bootstrap = serve_bootstrap
        self.shutdown_timeout_s = shutdown_timeout_s
        # Connections (aiohttp protocols) with a request in a handler: aiohttp serves one request
        # at a time per connection, so this also counts the requests in flight.
        self._busy: set[Any] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self.engines: dict[str, Engine] = {}
        self.ports: list[int] = []
        self.bootstrap_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._bootstrap_runner: web.AppRunner | None = None
        self._rendezvous = bootstrap.RendezvousClient()
        self.side_channel_port: int | None = None  # vLLM: where this process's NIXL side channel listens
        self._side_runner: web.AppRunner | None = None
        self._side_client = nixl.SideChannelClient()

    # -- engines -------------------------------------------------------------------------------------

    def role_for(self, ip: str, port: int) -> Role:
        """Role of the engine at ip:port."""
        return self.roles.get(f"{ip}:{port}") or self.roles.get(ip) or self.default_role

    def engine(self, ip: str, port: int) -> Engine:
        """The engine at ip:port, created on first use."""
        endpoint = f"{ip}:{port}"
        eng = self.engines.get(endpoint)
        if eng is None:
            role = self.role_for(ip, port)
            cfg = self.config

            def make_metrics(snapshot: Any) -> EngineMetrics:
                if cfg.protocol == "vllm":
                    return VllmMetrics(cfg.model, snapshot)
                return SglangMetrics(cfg.model, snapshot, _ENGINE_TYPE[role])

            eng = Engine(
                endpoint=endpoint,
                host=ip,
                role=role,
                coefficients=cfg.coefficients,
                metrics_factory=make_metrics,
                time_scale=cfg.time_scale,
            )
            self.engines[endpoint] = eng
            nixl.register_engine(eng)
            log.info("engine %s: %s %s (id %s)", endpoint, cfg.protocol, role.value, eng.engine_id)
        return eng

    def engine_for(self, request: web.Request) -> Engine:
        """The engine of the local address a request arrived on."""
        sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
        if isinstance(sock, tuple) and len(sock) >= 2:
            return self.engine(str(sock[0]), int(sock[1]))
        return self.engine(self.host, self.ports[0] if self.ports else 0)

    @property
    def in_flight(self) -> int:
        """Requests in a handler now (streams until their end)."""
        return len(self._busy)

    # -- lifecycle -----------------------------------------------------------------------------------

    @web.middleware
    async def _count_in_flight(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # A streaming handler returns only once its stream ended, so this counts streams too.
        self._idle.clear()
        self._busy.add(request.protocol)
        try:
            resp = await handler(request)
            if not self._accepting:
                resp.force_close()  # no keep-alive once stopping: the connection ends with this answer
            return resp
        finally:
            self._busy.discard(request.protocol)
            if not self._busy:
                self._idle.set()

    def _app(self) -> web.Application:
        middlewares: list[Any] = [self._count_in_flight]
        if self.config.faults.active:
            middlewares.append(faults.middleware(self.config.faults, lambda r: self.engine_for(r).role.value))
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
        if self.config.protocol == "vllm":
            front = VllmFrontend(
                self.config, self.engine_for, self._side_client, lambda: self.side_channel_port
            )
            app.add_routes(front.routes())
        else:
            front = SglangFrontend(
                self.config, self.engine_for, self._rendezvous, lambda: self.bootstrap_port
            )
            app.add_routes(front.routes())
        return app

    def _may_prefill(self) -> bool:
        return self.default_role is not Role.DECODE or any(r is not Role.DECODE for r in self.roles.values())

    def _needs_bootstrap(self) -> bool:
        if self.requested_bootstrap_port is None:
            return False
        if self.serve_bootstrap is not None:
            return self.serve_bootstrap
        # Auto: only when some engine may be a prefill, so a decode-only process on the same host as its
        # prefill does not fight it for the port.
        return self._may_prefill()

    async def _start_side_channel(self) -> None:
        """vLLM prefills: the NIXL side channel their decodes in other processes notify. On the
        configured port when it is free, else on any (several sims on one host) and advertised."""
        app = web.Application()
        app.add_routes(nixl.side_channel_routes())
        self._side_runner = web.AppRunner(app, access_log=None, shutdown_timeout=_ABORT_S)
        await self._side_runner.setup()
        try:
            await web.TCPSite(self._side_runner, self.host, self.config.nixl_side_channel_port).start()
        except OSError:
            await web.TCPSite(self._side_runner, self.host, 0).start()
        self.side_channel_port = int(self._side_runner.addresses[0][1])

    async def start(self) -> None:
        """Bind the HTTP ports (0 = pick a free one; see `ports`) and the SGLang bootstrap server."""
        # handler_cancellation: a client that disconnects cancels its handler, which aborts the request.
        self._runner = web.AppRunner(
            self._app(), handler_cancellation=True, access_log=None, shutdown_timeout=_ABORT_S
        )
        await self._runner.setup()
        for port in self.requested_ports:
            site = web.TCPSite(self._runner, self.host, port, reuse_address=True)
            await site.start()
        self.ports = [int(addr[1]) for addr in self._runner.addresses]
        if self.config.protocol == "vllm" and self._may_prefill():
            await self._start_side_channel()
        if self._needs_bootstrap():
            assert self.requested_bootstrap_port is not None
            c = self.config.coefficients
            route_info = {
                "prefill_attn_tp_size": 1,
                "prefill_dp_size": 1,
                "prefill_pp_size": 1,
                "page_size": c.block_size,
                "kv_cache_dtype": "auto",
                "model_path": self.config.model,
            }
            app = web.Application()
            app.add_routes(bootstrap.bootstrap_routes(route_info))
            self._bootstrap_runner = web.AppRunner(app, access_log=None, shutdown_timeout=_ABORT_S)
            await self._bootstrap_runner.setup()
            site = web.TCPSite(
                self._bootstrap_runner, self.host, self.requested_bootstrap_port, reuse_address=True
            )
            await site.start()
            self.bootstrap_port = int(self._bootstrap_runner.addresses[0][1])
            bootstrap.add_local_server(self.host, self.bootstrap_port)
        log.info(
            "pdorch sim (%s) listening on %s ports %s%s",
            self.config.protocol,
            self.host,
            self.ports,
            f", bootstrap {self.bootstrap_port}" if self.bootstrap_port else "",
        )

    async def stop_accepting(self) -> None:
        """Close the listeners (HTTP and SGLang bootstrap; a successor may bind the ports now) and
        the HTTP connections with no request in a handler (idle keep-alive ones); the requests in
        flight go on, and their connections close after their answer. Idempotent.

        Not aiohttp's `pre_shutdown`: it leaves idle sockets open and drops whatever arrives on any
        connection, so a request sent on a kept-alive one, the rest of a body still uploading, or
        a decode's frame on an SGLang rendezvous WebSocket waited unanswered until the drain ended.
        """
        self._accepting = False
        for runner in (self._runner, self._bootstrap_runner):
            if runner is None:
                continue
            for site in runner.sites:
                await site.stop()
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                if conn not in self._busy:
                    conn.force_close()

    async def stop(self, drain_s: float | None = None) -> None:
        """Stop accepting, let in-flight requests end for up to ``drain_s`` (default: the server's
        shutdown timeout), abort the rest, then stop the engines."""
        drain = self.shutdown_timeout_s if drain_s is None else drain_s
        await self.stop_accepting()
        if drain > 0 and not self._idle.is_set():
            log.info("draining %d request(s) for up to %gs", self.in_flight, drain)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._bootstrap_runner is not None:
            # Taken first: a stop cancelled below and called again must not forget the address
            # twice (a successor's registration on a replaced pod's IP counts on it).
            runner, self._bootstrap_runner = self._bootstrap_runner, None
            assert self.bootstrap_port is not None
            bootstrap.remove_local_server(self.host, self.bootstrap_port)
            await runner.cleanup()
        for eng in self.engines.values():
            await eng.stop()
            nixl.unregister_engine(eng)
        if self._side_runner is not None:
            await self._side_runner.cleanup()
            self._side_runner = None
        with contextlib.suppress(Exception):
            await self._rendezvous.close()
        with contextlib.suppress(Exception):
            await self._side_client.close()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def url(self, port_index: int = 0, host: str | None = None) -> str:
        """Base URL of one listening port (``host`` defaults to 127.0.0.1 when bound to 0.0.0.0)."""
        h = host or ("127.0.0.1" if self.host in ("0.0.0.0", "") else self.host)
        return f"http://{h}:{self.ports[port_index]}"


async def serve_forever(server: SimServer, stop: asyncio.Event) -> None:
    """Run ``server`` until ``stop`` is set."""
    await server.start()
    freeze_startup_heap()
    try:
        await stop.wait()
    finally:
        await server.stop()
