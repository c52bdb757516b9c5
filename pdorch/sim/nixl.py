"""vLLM NixlConnector handshake as the simulator speaks it: parameter shapes and the in-process engine registry.

Prefill side: a request whose ``kv_transfer_params.do_remote_decode`` is true runs as ``stream:false`` with
one output token and answers with top-level ``kv_transfer_params`` naming its engine, request and blocks.
Decode side: ``do_remote_prefill`` true plus every required field means "pull the KV from that engine";
anything else is invalid and vLLM falls back to a local prefill.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from pdorch.sim.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_SIDE_CHANNEL_PORT = 5600  # VLLM_NIXL_SIDE_CHANNEL_PORT default
# The side channel's path. vLLM's own runs over ZMQ; a simulated prefill in another process only
# needs to hear "are these blocks still there" and "done with them" (vLLM's read-done and abort
# notifications), so it answers plain HTTP on the port it advertises as remote_port.
SIDE_CHANNEL_PATH = "/sim/nixl/{engine_id}/{lease_id}/{op}"
REQUIRED_DECODE_FIELDS = (
    "remote_block_ids",
    "remote_engine_id",
    "remote_request_id",
    "remote_host",
    "remote_port",
)

# engine_id -> engine, for prefill and decode engines living in the same process.
_ENGINES: dict[str, Engine] = {}


def register_engine(engine: Engine) -> None:
    """Make an engine's leases reachable by decodes in this process."""
    _ENGINES[engine.engine_id] = engine


def unregister_engine(engine: Engine) -> None:
    """Forget an engine (server stopped)."""
    _ENGINES.pop(engine.engine_id, None)


def local_engine(engine_id: str) -> Engine | None:
    """The engine with this id if it runs in this process."""
    return _ENGINES.get(engine_id)


def wants_remote_decode(params: Any) -> bool:
    """True if a request asks this engine to prefill for a remote decode."""
    return isinstance(params, Mapping) and params.get("do_remote_decode") is True


def is_valid_remote_prefill(params: Any) -> bool:
    """True if a decode request carries usable params to pull KV (vLLM's validity rule)."""
    if not isinstance(params, Mapping) or params.get("do_remote_prefill") is not True:
        return False
    if any(params.get(k) is None for k in REQUIRED_DECODE_FIELDS):
        return False
    return count_blocks(params["remote_block_ids"]) > 0


def count_blocks(block_ids: Any) -> int:
    """Number of block ids in a flat list or a list of per-KV-group lists (older and newer vLLM)."""
    if not isinstance(block_ids, list):
        return 0
    if all(isinstance(b, list) for b in block_ids):
        return sum(len(group) for group in block_ids)
    return len(block_ids)


def prefill_response_params(
    *,
    engine_id: str,
    request_id: str,
    host: str,
    block_ids: list[int],
    port: int = DEFAULT_SIDE_CHANNEL_PORT,
    tp_size: int = 1,
) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill returns for its decode to pull."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(block_ids)],  # one KV-cache group
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": tp_size,
    }


def side_channel_routes() -> list[web.RouteDef]:
    """A prefill process's side channel: `check` (200 while the lease holds, 404 once it is gone)
    and `release` (the decode read the blocks, or was aborted: free them now)."""

    async def handle(request: web.Request) -> web.Response:
        engine = local_engine(request.match_info["engine_id"])
        lease_id, op = request.match_info["lease_id"], request.match_info["op"]
        if engine is None or op not in ("check", "release"):
            return web.Response(status=404)
        if op == "check":
            return web.Response(status=200 if lease_id in engine.leases else 404)
        return web.Response(status=200 if engine.release_lease(lease_id) else 404)

    return [web.post(SIDE_CHANNEL_PATH, handle)]


class SideChannelClient:
    """A decode process's calls to the side channels of prefills in other processes."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def call(self, params: Mapping[str, Any], op: str, timeout_s: float = 5.0) -> bool | None:
        """`op` on the lease `params` name: True (200), False (404: gone), None (no answer: a
        prefill that serves no side channel, whose lease then runs out on its own)."""
        host = str(params["remote_host"])
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        path = SIDE_CHANNEL_PATH.format(
            engine_id=params["remote_engine_id"], lease_id=params["remote_request_id"], op=op
        )
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            url = f"http://{host}:{params['remote_port']}{path}"
            async with self._session.post(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status == 200 if resp.status in (200, 404) else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("side channel %s:%s: %r", host, params["remote_port"], exc)
            return None

    def release_soon(self, params: Mapping[str, Any]) -> None:
        """Release without waiting for the answer (vLLM's notifications are asynchronous, and a
        decode being cancelled cannot await)."""
        task = asyncio.get_running_loop().create_task(self.call(params, "release"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Wait briefly for background releases, then close the session."""
        if self._background:
            await asyncio.wait(self._background, timeout=2)
        if self._session is not None:
            await self._session.close()
            self._session = None
