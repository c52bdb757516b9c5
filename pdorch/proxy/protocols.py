"""Pure request-body transforms of the engines' P/D handshakes.

vLLM NixlConnector (sequential): the prefill leg gets a one-token, non-streaming copy of the client body
with ``kv_transfer_params.do_remote_decode``; the decode leg gets the client body plus the
``kv_transfer_params`` the prefill returned, verbatim (the proxy treats them as opaque).

SGLang (parallel): one body with ``bootstrap_host/port/room`` goes to the prefill and the decode at once.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pdorch.lax_int import lax_int
from pdorch.proxy.token_ratio import TokenRatio

_UNLEARNED = TokenRatio()  # never observes: the default ratio

Engine = Literal["vllm", "sglang"]
Kind = Literal["completion", "chat"]

ROOM_BITS = 63
_ROOM_MASK = (1 << ROOM_BITS) - 1
# Odd multiplier: multiplication by an odd number is a bijection modulo 2^63.
_ROOM_MULT = 0x5851F42D4C957F2D & _ROOM_MASK | 1

PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Fields only the proxy may set; a client sending them could hijack another request's KV.
PROXY_OWNED_FIELDS = ("kv_transfer_params", "bootstrap_host", "bootstrap_port", "bootstrap_room")


def vllm_prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill-leg body: one token, no streaming, ``do_remote_decode`` set."""
    out = dict(body)
    out["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    out["stream"] = False
    out.pop("stream_options", None)  # vLLM rejects stream_options without stream
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    # A minimum above one token would contradict the one-token cap.
    out.pop("min_tokens", None)
    out.pop("min_completion_tokens", None)
    return out


def vllm_decode_body(body: dict[str, Any], kv_transfer_params: Any) -> dict[str, Any]:
    """The decode-leg body: the client's body plus the prefill's ``kv_transfer_params``, verbatim."""
    out = dict(body)
    out["kv_transfer_params"] = kv_transfer_params
    return out


def bootstrap_host_of(host: str) -> str:
    """Host as SGLang expects it in ``bootstrap_host`` (IPv6 literals in brackets)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def sglang_batch_size(body: dict[str, Any], kind: Kind) -> int | None:
    """Number of sequences a request fans out to in SGLang, or None for a single one.

    Completions with several prompts (strings or token-id lists) and any request with ``n > 1``
    need one room per sequence, sent as arrays: prompts x n of them. SGLang repeats a room list
    ``n`` times and reads the first prompts x n entries, so shorter lists would hand two parallel
    samples the same room (a duplicate room aborts the scheduler's transfer).
    """
    prompts = 1
    if kind == "completion":
        p = body.get("prompt")
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            prompts = len(p)
    # Read as the engine reads it: `n: 2.0` is two samples, so it needs two rooms as well.
    n = lax_int(body.get("n"))
    samples = n if n is not None and n > 1 else 1
    total = prompts * samples
    return total if total > 1 else None


def sglang_body(
    body: dict[str, Any], host: str, bootstrap_port: int | None, rooms: int | list[int]
) -> dict[str, Any]:
    """The body sent identically to the SGLang prefill and decode legs (one room, or one per sequence)."""
    out = dict(body)
    h = bootstrap_host_of(host)
    if isinstance(rooms, list):
        out["bootstrap_host"] = [h] * len(rooms)
        out["bootstrap_port"] = [bootstrap_port] * len(rooms)
        out["bootstrap_room"] = list(rooms)
    else:
        out["bootstrap_host"] = h
        out["bootstrap_port"] = bootstrap_port
        out["bootstrap_room"] = rooms
    return out


class RoomMinter:
    """Bootstrap rooms in [0, 2^63): random-looking and never repeated within one proxy process.

    A random start plus a counter pushed through a bijection of 63-bit integers (odd multiply, then
    xorshift), so uniqueness holds by construction, not by chance; distinct random starts make
    collisions between proxy replicas as unlikely as two random 63-bit draws.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._next = (secrets.randbits(ROOM_BITS) if seed is None else seed) & _ROOM_MASK

    def mint(self) -> int:
        """A fresh room."""
        x = self._next
        self._next = (self._next + 1) & _ROOM_MASK
        x = (x * _ROOM_MULT) & _ROOM_MASK
        x ^= x >> 29
        return x


def routing_text(body: dict[str, Any], kind: Kind) -> str:
    """The prompt as text, for prefix affinity and token estimation (no tokenizer in the proxy)."""
    if kind == "chat":
        parts: list[str] = []
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                c = m.get("content")
                if isinstance(c, str):
                    parts.append(c)
                elif c is not None:
                    try:
                        parts.append(json.dumps(c, separators=(",", ":")))
                    except (RecursionError, ValueError):
                        pass  # too deep to render: routing only loses this part's prefix hint
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return ""


def estimate_prompt_tokens(
    body: dict[str, Any],
    kind: Kind,
    text: str | None = None,
    ratio: TokenRatio | None = None,
    threshold: int = 0,
) -> int:
    """Prompt tokens estimated from characters with `ratio` (learned from the engines' counts;
    characters / 4 without one); token-id prompts are counted exactly. ``text`` is `routing_text`
    of the body when the caller has it already. With a `threshold` (conditional disaggregation's),
    a prompt the ratio may underestimate is now and then counted at it (`TokenRatio.against`)."""
    prompt = body.get("prompt")
    if kind == "completion" and isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return sum(len(p) for p in prompt if isinstance(p, list))
    chars = len(routing_text(body, kind) if text is None else text)
    r = ratio or _UNLEARNED
    return r.against(chars, threshold) if threshold > 0 else r.estimate(chars)
