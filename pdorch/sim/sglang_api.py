"""SGLang-compatible HTTP front end with the bootstrap-room P/D rendezvous.

With bootstrap fields in the body, a prefill-role engine registers the room, waits (bootstrap timeout)
for its decode to connect, prefills, "pushes" the KV (transfer time) and answers with one token; a
decode-role engine connects to the room, waits (waiting timeout) for the KV, then decodes the answer.
Engines of role "both" ignore the bootstrap fields, as a non-disaggregated SGLang server does; a
prefill or decode engine refuses a request without them (HTTP 400), as SGLang's scheduler does in
disaggregation mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pdorch.sim import bootstrap, latency
from pdorch.sim.bootstrap import RENDEZVOUS, BootstrapError, RoomKey
from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Engine, EngineError, Role, Seq
from pdorch.sim.generation import serve_generation
from pdorch.sim.metrics import SglangMetrics
from pdorch.sim.openai_api import (
    SGLANG,
    BadRequest,
    GenRequest,
    Kind,
    metrics_response,
    models_response,
    output_plan,
    parse_request,
)
from pdorch.sim.vllm_api import read_json

flavor = SGLANG
EngineLookup = Callable[[web.Request], Engine]


def _bootstrap_failure(engine: Engine) -> None:
    if isinstance(engine.metrics, SglangMetrics):
        engine.metrics.bootstrap_failure()


class SglangFrontend:
    """Routes of an SGLang `launch_server` process."""

    def __init__(
        self,
        config: SimConfig,
        lookup: EngineLookup,
        rendezvous: bootstrap.RendezvousClient,
        bootstrap_port: Callable[[], int | None],
    ) -> None:
        self.config = config
        self.lookup = lookup
        self.rendezvous = rendezvous
        self.bootstrap_port = bootstrap_port

    def routes(self) -> list[web.RouteDef]:
        """aiohttp route table."""
        return [
            web.get("/health", self.health),
            web.get("/health_generate", self.health),
            web.get("/metrics", self.metrics),
            web.get("/v1/models", self.models),
            web.get("/get_model_info", self.model_info),
            web.get("/model_info", self.model_info),
            web.get("/get_server_info", self.server_info),
            web.get("/server_info", self.server_info),
            web.post("/flush_cache", self.health),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
        ]

    async def health(self, request: web.Request) -> web.Response:
        """200 when up."""
        self.lookup(request)
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text of this endpoint's engine."""
        return metrics_response(self.lookup(request))

    async def models(self, _: web.Request) -> web.Response:
        """The single served model."""
        return models_response(self.config, "sglang")

    async def model_info(self, _: web.Request) -> web.Response:
        """`/get_model_info`."""
        m = self.config.model
        return web.json_response({"model_path": m, "tokenizer_path": m, "is_generation": True})

    async def server_info(self, request: web.Request) -> web.Response:
        """`/get_server_info`: a few of SGLang's server args plus the simulator's model."""
        engine = self.lookup(request)
        c = engine.coefficients
        mode = {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.BOTH: "null"}[engine.role]
        return web.json_response(
            {
                "model_path": self.config.model,
                "disaggregation_mode": mode,
                "disaggregation_bootstrap_port": self.bootstrap_port(),
                "page_size": c.block_size,
                "max_total_num_tokens": c.kv_capacity_tokens,
                "max_running_requests": c.max_num_seqs,
                "context_length": c.max_model_len,
                "version": "0.0.0+pdorch.sim",
                "sim_coefficients": latency.describe(c),
            }
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions`."""
        return await self._generate(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        engine = self.lookup(request)
        try:
            req = parse_request(await read_json(request), kind)
            try:
                key = bootstrap.parse_key(req.body, self.bootstrap_port() or bootstrap.DEFAULT_BOOTSTRAP_PORT)
            except ValueError as exc:
                raise BadRequest(str(exc), "bootstrap_room") from None
        except BadRequest as exc:
            return flavor.error(str(exc), exc.err_type, exc.param, exc.status)
        if key is None and engine.role is not Role.BOTH:
            # As SGLang's scheduler in disaggregation mode: no room, no KV to send or wait for.
            return flavor.error(
                "Disaggregated request received without bootstrap room id "
                "(send bootstrap_host, bootstrap_port and bootstrap_room)",
                "BadRequestError",
                "bootstrap_room",
                400,
            )
        body_rid = req.body.get("rid")
        rid = flavor.response_id(kind, body_rid if isinstance(body_rid, str) else None)
        if key is not None and engine.role is Role.PREFILL:
            return await self._prefill(request, engine, req, key, rid)
        max_tokens, eos_at = output_plan(req, engine.coefficients.max_model_len)
        seq = Seq(prompt_tokens=req.prompt_tokens, max_tokens=max_tokens, eos_at=eos_at)
        if key is not None and engine.role is Role.DECODE:
            seq.kv_source = self._decode_waiter(engine, key)
        return await serve_generation(
            request, engine, flavor, req, seq, rid=rid, model=self.config.model, stream=req.stream
        )

    def _decode_waiter(self, engine: Engine, key: RoomKey) -> Callable[[], Any]:
        async def wait() -> None:
            try:
                await bootstrap.decode_connect_and_wait(key, self.config.waiting_timeout_s, self.rendezvous)
            except BootstrapError as exc:
                _bootstrap_failure(engine)
                engine.metrics.handshake("decode_failed")
                raise EngineError(
                    str(exc), exc.status, "BadRequestError" if exc.status == 400 else "InternalServerError"
                ) from None
            engine.metrics.handshake("decode_matched")

        return wait

    async def _prefill(
        self, request: web.Request, engine: Engine, req: GenRequest, key: RoomKey, rid: str
    ) -> web.StreamResponse:
        try:
            room = RENDEZVOUS.register_prefill(key)
        except BootstrapError as exc:
            _bootstrap_failure(engine)
            engine.metrics.handshake("duplicate_room")
            return flavor.error(str(exc), "BadRequestError", "bootstrap_room", exc.status)
        arrival = time.monotonic()
        try:
            engine.bootstrap_waiting += 1
            try:
                await asyncio.wait_for(room.decode_connected.wait(), self.config.bootstrap_timeout_s)
            except TimeoutError:
                _bootstrap_failure(engine)
                engine.metrics.handshake("bootstrap_timeout")
                engine.record_abort(req.prompt_tokens, arrival)
                msg = (
                    f"KVTransferError(bootstrap_room={key[2]}): timed out after "
                    f"{self.config.bootstrap_timeout_s}s in KVPoll.Bootstrapping"
                )
                RENDEZVOUS.finish(key, msg)
                return flavor.error(msg, "InternalServerError", None, 500)
            except asyncio.CancelledError:
                engine.record_abort(req.prompt_tokens, arrival)  # the client left while we waited
                raise
            finally:
                engine.bootstrap_waiting -= 1
            seq = Seq(prompt_tokens=req.prompt_tokens, max_tokens=1, keep_kv=True)

            async def push(s: Seq) -> dict[str, Any]:
                c = engine.coefficients
                seconds = latency.kv_transfer_time_s(c, s.prompt_tokens)
                await engine.sleep_model(seconds)
                engine.free(s)
                RENDEZVOUS.finish(key)
                engine.metrics.kv_transfer(
                    seconds * engine.time_scale, s.prompt_tokens * c.kv_bytes_per_token
                )
                engine.metrics.handshake("prefill_pushed")
                return {}

            return await serve_generation(
                request,
                engine,
                flavor,
                req,
                seq,
                rid=rid,
                model=self.config.model,
                stream=req.stream,
                on_finished=push,
            )
        finally:
            # Any exit before the push (error, client gone) fails the room so the decode stops waiting.
            if not room.prefill_done.is_set():
                RENDEZVOUS.finish(key, "prefill aborted")
