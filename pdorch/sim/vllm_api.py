"""vLLM-compatible HTTP front end (OpenAI API, `/tokenize`, render, metrics) with the NixlConnector handshake."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from pdorch.sim import latency, nixl
from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Engine, EngineError, Seq
from pdorch.sim.generation import serve_generation
from pdorch.sim.openai_api import (
    VLLM,
    BadRequest,
    GenRequest,
    Kind,
    metrics_response,
    models_response,
    output_plan,
    parse_request,
)

log = logging.getLogger(__name__)
flavor = VLLM

EngineLookup = Callable[[web.Request], Engine]
# A prefill's side channel that does not answer this fast is taken as unknown (the pull goes on):
# the check sits before the decode's first token.
CHECK_TIMEOUT_S = 1.0


async def read_json(request: web.Request) -> Any:
    """Decoded JSON body, or `BadRequest` for malformed JSON."""
    try:
        return await request.json()
    except (ValueError, RecursionError) as exc:  # nested deeper than the parser recurses
        raise BadRequest(f"malformed JSON body: {exc}") from None


class VllmFrontend:
    """Routes of a vLLM `vllm serve` process, for whichever engine the request's local address selects."""

    def __init__(
        self,
        config: SimConfig,
        lookup: EngineLookup,
        side_channel: nixl.SideChannelClient | None = None,
        side_channel_port: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.config = config
        self.lookup = lookup
        self.side_channel = side_channel or nixl.SideChannelClient()
        # The port this process's side channel listens on (None: it serves none; the configured
        # port is advertised, as vLLM does).
        self.side_channel_port = side_channel_port

    def routes(self) -> list[web.RouteDef]:
        """aiohttp route table."""
        return [
            web.get("/health", self.health),
            web.get("/ping", self.health),
            web.get("/version", self.version),
            web.get("/metrics", self.metrics),
            web.get("/v1/models", self.models),
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions/render", self.render_completion),
            web.post("/v1/chat/completions/render", self.render_chat),
            web.post("/tokenize", self.tokenize),
        ]

    async def health(self, request: web.Request) -> web.Response:
        """200 with an empty body, like vLLM."""
        self.lookup(request)
        return web.Response(status=200)

    async def version(self, _: web.Request) -> web.Response:
        """Version of the simulated server."""
        return web.json_response({"version": "0.0.0+pdorch.sim"})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text of this endpoint's engine."""
        return metrics_response(self.lookup(request))

    async def models(self, _: web.Request) -> web.Response:
        """The single served model."""
        return models_response(self.config, "vllm", parent=None, permission=[])

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/completions`."""
        return await self._generate(request, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`."""
        return await self._generate(request, "chat")

    async def _parse(self, request: web.Request, kind: Kind) -> GenRequest:
        req = parse_request(await read_json(request), kind)
        if req.model is not None and req.model != self.config.model:
            raise BadRequest(f"The model `{req.model}` does not exist.", "model", 404, "NotFoundError")
        return req

    async def tokenize(self, request: web.Request) -> web.Response:
        """`POST /tokenize` with ``prompt`` or ``messages``."""
        try:
            body = await read_json(request)
            req = await self._parse_any(body)
        except BadRequest as exc:
            return flavor.error(str(exc), exc.err_type, exc.param, exc.status)
        return web.json_response(
            {
                "count": req.prompt_tokens,
                "max_model_len": self.config.coefficients.max_model_len,
                "tokens": req.prompt_ids,
                "token_strs": None,
            }
        )

    async def _parse_any(self, body: Any) -> GenRequest:
        if isinstance(body, dict) and "messages" in body:
            return parse_request(body, "chat")
        return parse_request(body, "completion")

    async def render_completion(self, request: web.Request) -> web.Response:
        """`POST /v1/completions/render`: the engine prompt, without generating."""
        return await self._render(request, "completion")

    async def render_chat(self, request: web.Request) -> web.Response:
        """`POST /v1/chat/completions/render`."""
        return await self._render(request, "chat")

    async def _render(self, request: web.Request, kind: Kind) -> web.Response:
        try:
            req = await self._parse(request, kind)
        except BadRequest as exc:
            return flavor.error(str(exc), exc.err_type, exc.param, exc.status)
        return web.json_response([{"prompt": req.prompt_text, "prompt_token_ids": req.prompt_ids}])

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        engine = self.lookup(request)
        try:
            req = await self._parse(request, kind)
            if req.stream_options_given and not req.stream:
                raise BadRequest("Stream options can only be defined when `stream=True`.", "stream_options")
        except BadRequest as exc:
            return flavor.error(str(exc), exc.err_type, exc.param, exc.status)
        header_id = request.headers.get("X-Request-Id")
        rid = flavor.response_id(kind, header_id)
        c = engine.coefficients
        max_tokens, eos_at = output_plan(req, c.max_model_len)
        params = req.body.get("kv_transfer_params")
        if nixl.wants_remote_decode(params):
            # Prefill leg: one token, never streamed, blocks leased to the decode that will pull them.
            remote_request_id = f"{header_id or uuid.uuid4().hex}-{uuid.uuid4().hex[:8]}"
            seq = Seq(prompt_tokens=req.prompt_tokens, max_tokens=1, keep_kv=True)

            async def lease(s: Seq) -> dict[str, Any]:
                blocks = engine.lease(s, remote_request_id, self.config.kv_lease_s)
                engine.metrics.handshake("prefill_leased")
                return {
                    "kv_transfer_params": nixl.prefill_response_params(
                        engine_id=engine.engine_id,
                        request_id=remote_request_id,
                        host=engine.host,
                        block_ids=blocks,
                        port=self.side_channel_port() or self.config.nixl_side_channel_port,
                    )
                }

            return await serve_generation(
                request,
                engine,
                flavor,
                req,
                seq,
                rid=rid,
                model=self.config.model,
                stream=False,
                on_finished=lease,
            )
        seq = Seq(prompt_tokens=req.prompt_tokens, max_tokens=max_tokens, eos_at=eos_at)
        if isinstance(params, Mapping) and params.get("do_remote_prefill") is True:
            if nixl.is_valid_remote_prefill(params):
                seq.kv_source = self._puller(engine, dict(params), req.prompt_tokens)
                seq.kv_abandoned = lambda: self._give_back(params)
            else:
                # vLLM logs "Got invalid KVTransferParams" and prefills locally.
                log.warning(
                    "engine %s: invalid kv_transfer_params, prefilling locally: %s", engine.endpoint, params
                )
                engine.metrics.handshake("invalid_params")
        return await serve_generation(
            request, engine, flavor, req, seq, rid=rid, model=self.config.model, stream=req.stream
        )

    def _give_back(self, params: Mapping[str, Any]) -> None:
        """Free a prefill's leased blocks without waiting: the decode was aborted, and vLLM's decode
        then tells its prefill (even for a request that never reached its transfer)."""
        remote = nixl.local_engine(str(params["remote_engine_id"]))
        if remote is not None:
            remote.release_lease(str(params["remote_request_id"]))
        else:
            self.side_channel.release_soon(params)

    def _puller(self, engine: Engine, params: dict[str, Any], prompt_tokens: int) -> Callable[[], Any]:
        """Decode-side KV pull: model the transfer, then free the prefill's leased blocks, in this
        process or through its side channel (as vLLM's read-done notification does)."""
        remote = nixl.local_engine(str(params["remote_engine_id"]))
        lease_id = str(params["remote_request_id"])

        async def pull() -> None:
            try:
                await transfer()
            except asyncio.CancelledError:
                self._give_back(params)  # aborted: during the check or the transfer
                raise

        async def transfer() -> None:
            c = engine.coefficients
            engine.kv_sources[str(params["remote_engine_id"])] += 1
            if remote is not None:
                present: bool | None = lease_id in remote.leases
            else:
                present = await self.side_channel.call(params, "check", timeout_s=CHECK_TIMEOUT_S)
            if present is False:
                engine.metrics.handshake("kv_pull_failed")
                if self.config.kv_load_failure_policy == "fail":
                    raise EngineError(
                        f"KV load failed: blocks of remote request {lease_id} are gone "
                        "(lease expired or already pulled)"
                    )
                await engine.sleep_model(latency.prefill_time_s(c, [prompt_tokens]))  # recompute locally
                return
            seconds = latency.kv_transfer_time_s(c, prompt_tokens)
            await engine.sleep_model(seconds)
            # vLLM's read-done notification is asynchronous: the decode goes on at once.
            self._give_back(params)
            engine.metrics.kv_transfer(seconds * engine.time_scale, prompt_tokens * c.kv_bytes_per_token)
            engine.metrics.handshake("kv_pulled")

        return pull
