"""vLLM NixlConnector handshake as the simulator speaks it: parameter shapes and the in-process engine registry.

Prefill side: a request whose ``kv_transfer_params.do_remote_decode`` is true runs as ``stream:false`` with
one output token and answers with top-level ``kv_transfer_params`` naming its engine, request and blocks.
Decode side: ``do_remote_prefill`` true plus every required field means "pull the KV from that engine";
anything else is invalid and vLLM falls back to a local prefill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdorch.sim.engine import Engine

DEFAULT_SIDE_CHANNEL_PORT = 5600  # VLLM_NIXL_SIDE_CHANNEL_PORT default
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
