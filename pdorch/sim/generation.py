"""Run one sequence on an engine and answer the HTTP request, as one JSON object or an SSE stream.

Shared by the vLLM and SGLang front ends. A client that goes away (write fails, or aiohttp cancels the
handler) aborts the sequence, which frees its KV and counts as an aborted request in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pdorch.sim import faults, sse, tokens
from pdorch.sim.engine import Engine, EngineError, Seq, SeqState, TokenEvent
from pdorch.sim.openai_api import Flavor, GenRequest, chunk, full_response, usage_chunk

log = logging.getLogger(__name__)

# Called once the sequence finished, before the response completes; returns extra top-level fields.
FinishHook = Callable[[Seq], Awaitable[dict[str, Any]]]


async def _next(seq: Seq) -> TokenEvent:
    ev = await seq.events.get()
    if isinstance(ev, EngineError):
        raise ev
    return ev


async def serve_generation(
    request: web.Request,
    engine: Engine,
    flavor: Flavor,
    req: GenRequest,
    seq: Seq,
    *,
    rid: str,
    model: str,
    stream: bool,
    on_finished: FinishHook | None = None,
) -> web.StreamResponse:
    """Submit ``seq`` and answer with its tokens; errors before the first token become JSON errors."""
    try:
        engine.submit(seq)
    except EngineError as exc:
        return flavor.error(str(exc), exc.err_type, None, exc.status)
    hook_done = False
    try:
        try:
            first = await _next(seq)
        except EngineError as exc:
            return flavor.error(str(exc), exc.err_type, None, exc.status)
        if not stream:
            stall_after = request.get(faults.STALL_KEY)  # injected fault (`pdorch.sim.faults`)
            last = first
            while last.finish_reason is None:
                if stall_after is not None and last.index + 1 >= stall_after:
                    await faults.stall_forever()
                last = await _next(seq)
            extra = await on_finished(seq) if on_finished is not None else {}
            hook_done = True
            n = last.index + 1
            text = tokens.generated_text(req.seed, 0, n)
            if req.echo:
                text = req.prompt_text + text
            body = full_response(flavor, req, rid, model, text, last.finish_reason, n)
            body.update(extra)
            return web.json_response(body)
        return await _stream(request, flavor, req, seq, first, rid, model, on_finished)
    except EngineError as exc:  # failure after the first token of a non-streamed answer
        return flavor.error(str(exc), exc.err_type, None, exc.status)
    finally:
        if seq.state is not SeqState.FINISHED:
            engine.abort(seq)
        elif seq.keep_kv and seq.blocks and not hook_done:
            engine.free(seq)  # the hook never ran (client left), so nobody will claim these blocks


async def _stream(
    request: web.Request,
    flavor: Flavor,
    req: GenRequest,
    seq: Seq,
    first: TokenEvent,
    rid: str,
    model: str,
    on_finished: FinishHook | None,
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": sse.CONTENT_TYPE, "Cache-Control": "no-cache"})
    # A P/D prefill answers once its KV is handed off, as SGLang's prefill returns a request from its
    # inflight queue only when the transfer finished: its events are held and go out in one write.
    held: list[bytes] | None = [] if on_finished is not None else None

    async def emit(data: bytes) -> None:
        if held is not None:
            held.append(data)
        else:
            await resp.write(data)

    async def flush() -> None:
        if held is not None:
            await resp.prepare(request)
            await resp.write(b"".join(held))

    if held is None:
        await resp.prepare(request)
    created = int(time.time())
    stall_after = request.get(faults.STALL_KEY)  # injected fault (`pdorch.sim.faults`)
    try:
        if req.kind == "chat":
            await emit(
                sse.event(chunk(flavor, req, rid, model, created, text=None, finish_reason=None, role=True))
            )
        ev = first
        prefix = req.prompt_text if req.echo else ""
        while True:
            text = prefix + tokens.generated_token(req.seed, ev.index)
            prefix = ""
            await emit(
                sse.event(chunk(flavor, req, rid, model, created, text=text, finish_reason=ev.finish_reason))
            )
            if ev.finish_reason is not None:
                break
            if stall_after is not None and ev.index + 1 >= stall_after:
                await faults.stall_forever()
            try:
                ev = await _next(seq)
            except EngineError as exc:
                await emit(sse.event(flavor.error_body(str(exc), exc.err_type, None, exc.status)))
                await emit(sse.DONE)
                await flush()
                return resp
        if on_finished is not None:
            await on_finished(seq)
        if req.include_usage:
            await emit(sse.event(usage_chunk(req, rid, model, created, ev.index + 1)))
        await emit(sse.DONE)
        await flush()
        await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError) as exc:
        # The client went away mid-stream; the caller's finally aborts the sequence.
        log.debug("stream %s ended early: %r", rid, exc)
        if isinstance(exc, asyncio.CancelledError):
            raise
    return resp
