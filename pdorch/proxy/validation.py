"""Pure validation of completion / chat request bodies before anything is sent upstream.

Checks the fields the proxy relies on and the common OpenAI parameters whose wrong types engines would
otherwise reject deep inside a P/D exchange. Unknown fields pass through (engines have many
extensions). Every failure is a 4xx `ProxyError` whose ``param`` names the offending field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

import msgspec

from pdorch.lax_int import lax_int
from pdorch.proxy.errors import ProxyError
from pdorch.proxy.protocols import PROXY_OWNED_FIELDS, Kind


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


_DECODER = msgspec.json.Decoder()


def _non_finite(name: str) -> NoReturn:
    # The upstream legs are re-encoded by msgspec, which writes a non-finite float as null: a
    # -Infinity logit bias would reach the engine as "no bias". RFC 8259 has no such numbers.
    raise ValueError(f"{name} is not a JSON number (RFC 8259); send a finite number")


def decode_json(raw: bytes, *, non_finite: bool = True) -> Any:
    """JSON bytes -> Python objects, accepting exactly what `json.loads` accepts, with its errors
    (and, with ``non_finite=False``, refusing NaN and Infinity with a ValueError).

    msgspec first: on a request's critical path its C decoder costs a third of the stdlib's (and far
    less when the process's caches are cold between requests). What it refuses (NaN, UTF-16, lone
    surrogates, malformed input) goes to the stdlib, which decides it.
    """
    try:
        return _DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        if non_finite:
            return json.loads(raw)
        return json.loads(raw, parse_constant=_non_finite, parse_float=_finite_float)


def _finite_float(text: str) -> float:
    # A literal beyond a double's range (-1e400) reads as an infinity (helper-88).
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a double's range; send a finite number")
    return value


def parse_json(raw: bytes) -> dict[str, Any]:
    """Decode the body; it must be a JSON object."""
    try:
        body = decode_json(raw, non_finite=False)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"malformed JSON body: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise _bad("JSON body nested too deeply", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {type(body).__name__}", None, "invalid_body")
    return body


def _is_int(v: Any) -> bool:
    return lax_int(v) is not None


def _is_num(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    # Any int is a number (math.isfinite overflows past 1e308); the range check refuses huge ones.
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


MAX_N = 128
"""Most choices per request (the OpenAI API's own limit for ``n``)."""

MAX_SEQUENCES = 4096
"""Most sequences (prompts x n) per SGLang request: the proxy mints one bootstrap room for each."""


def check_sglang_fanout(sequences: int) -> None:
    """Refuse an SGLang request whose prompts x n would need too many bootstrap rooms: 100k one-letter
    prompts with n=128 (a 0.5 MB body) once built 12.8M rooms on the event loop (GBs, seconds)."""
    if sequences > MAX_SEQUENCES:
        raise _bad(
            f"this request fans out to {sequences} sequences (prompts x n), more than the {MAX_SEQUENCES} "
            "one SGLang P/D request may carry; split the prompt list into smaller requests",
            "prompt",
        )


def _int_field(body: dict[str, Any], name: str, minimum: int, maximum: int | None = None) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_int(v):
        raise _bad(f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    if v < minimum:
        raise _bad(f"'{name}' must be >= {minimum}, got {v}", name)
    if maximum is not None and v > maximum:
        raise _bad(f"'{name}' must be <= {maximum}, got {v}", name)


def _num_field(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is None:
        return
    if not _is_num(v):
        raise _bad(f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {v}", name)


def _prompt(body: dict[str, Any]) -> None:
    if "prompt" not in body:
        raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, str):
        return
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return
        if all(_is_int(x) and x >= 0 for x in p):
            return
        if all(isinstance(x, list) and x and all(_is_int(t) and t >= 0 for t in x) for x in p):
            return
    raise _bad(
        "'prompt' must be a string, a non-empty list of strings, a list of token ids or a list of token-id lists",
        "prompt",
        "invalid_type",
    )


def _messages(body: dict[str, Any]) -> None:
    if "messages" not in body:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages", "invalid_type")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(
                f"'messages[{i}].role' must be a non-empty string", f"messages[{i}].role", "invalid_type"
            )
        c = m.get("content")
        if c is not None and not isinstance(c, str | list):
            raise _bad(
                f"'messages[{i}].content' must be a string, a list of parts or null",
                f"messages[{i}].content",
                "invalid_type",
            )


def model_ids(raw: bytes) -> frozenset[str] | None:
    """The model ids of an engine's `/v1/models` answer; None when it is not the OpenAI list shape
    (an object whose `data` is a list), so the caller tries another engine instead of failing."""
    try:
        doc = decode_json(raw)
    except (ValueError, RecursionError):
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    return frozenset(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)


def model_lengths(raw: bytes) -> dict[str, int]:
    """Each model's context length (``max_model_len``, which vLLM and SGLang put in their
    `/v1/models` cards) from an engine's `/v1/models` answer; models without one are left out."""
    try:
        doc = decode_json(raw)
    except (ValueError, RecursionError):
        return {}
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return {}
    out: dict[str, int] = {}
    for m in data:
        if isinstance(m, dict) and "id" in m:
            n = lax_int(m.get("max_model_len"))
            if n is not None and n > 0:
                out[str(m["id"])] = n
    return out


def prompt_count(body: dict[str, Any]) -> int:
    """How many prompts a completion request carries: a string or a list of token ids is one, a list
    of strings or of token-id lists is one per entry."""
    p = body.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], str | list):
        return len(p)
    return 1


def check_vllm_single_prompt(body: dict[str, Any]) -> None:
    """Refuse a vLLM completion with several prompts: vLLM's P/D prefill answers with the
    ``kv_transfer_params`` of its first prompt only, so the others' KV could not reach the decode."""
    n = prompt_count(body)
    if n > 1:
        raise _bad(
            f"'prompt' holds {n} prompts; prefill/decode serving with vLLM hands over the KV cache of "
            "one prompt per request: send one prompt per request",
            "prompt",
        )


def _token_limits(body: dict[str, Any], kind: Kind, max_model_len: int | None) -> None:
    """Refuse token limits the engines would refuse only at the decode, after a full prefill."""
    # The cap as vLLM reads it: chat's max_completion_tokens wins over the older max_tokens.
    cap_name = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens"):
        cap_name = "max_completion_tokens"
    cap = body.get(cap_name)
    if cap is None:
        return
    # min_tokens is vLLM's (and SGLang's min_new_tokens); `min_completion_tokens` is not checked:
    # an engine that ignores it would serve what a check here refused.
    least = body.get("min_tokens")
    if least is not None and least > cap:
        raise _bad(f"'min_tokens' must be less than or equal to {cap_name}={cap}, got {least}", "min_tokens")
    if max_model_len is not None and cap > max_model_len:
        raise _bad(
            f"'{cap_name}' is {cap}, more than the model's maximum context length of {max_model_len} tokens",
            cap_name,
        )


def validate(
    body: dict[str, Any],
    kind: Kind,
    served_models: Collection[str] | None = None,
    max_model_lens: Mapping[str, int] | None = None,
) -> None:
    """Raise a 4xx `ProxyError` naming the first problem field of ``body``; return if acceptable.

    ``served_models``: the model ids the engines serve; None when not known yet (then any is accepted).
    ``max_model_lens``: their context lengths, where known (a longer ``max_tokens`` is refused).
    """
    model = body.get("model")
    if model is None:
        raise _bad("'model' is required", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string", "model", "invalid_type")
    if kind == "completion":
        _prompt(body)
    else:
        _messages(body)
    for name in PROXY_OWNED_FIELDS:
        if name in body:
            raise _bad(
                f"'{name}' is set by the proxy and must not be sent by clients", name, "unsupported_parameter"
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {type(stream).__name__}", "stream", "invalid_type")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    _int_field(body, "max_tokens", 1)
    _int_field(body, "max_completion_tokens", 1)
    _int_field(body, "min_tokens", 0)
    # The SGLang leg mints one bootstrap room per sequence, so an unbounded n would stall the proxy.
    _int_field(body, "n", 1, MAX_N)
    _int_field(body, "best_of", 1)
    _int_field(body, "top_k", -1)
    _int_field(body, "seed", -(2**63))
    _num_field(body, "temperature", 0.0, 2.0)
    _num_field(body, "top_p", 0.0, 1.0)
    _num_field(body, "min_p", 0.0, 1.0)
    _num_field(body, "presence_penalty", -2.0, 2.0)
    _num_field(body, "frequency_penalty", -2.0, 2.0)
    _num_field(body, "repetition_penalty", 0.0, float("inf"))
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    for flag in ("echo", "ignore_eos", "skip_special_tokens"):
        v = body.get(flag)
        if v is not None and not isinstance(v, bool):
            raise _bad(f"'{flag}' must be a boolean", flag, "invalid_type")
    lp = body.get("logprobs")
    if lp is not None:
        if kind == "chat" and not isinstance(lp, bool):
            raise _bad("'logprobs' must be a boolean for chat completions", "logprobs", "invalid_type")
        if kind == "completion" and (not _is_int(lp) or lp < 0):
            raise _bad("'logprobs' must be a non-negative integer", "logprobs", "invalid_type")
    _token_limits(body, kind, max_model_lens.get(model) if max_model_lens else None)
    if served_models is not None and model not in served_models:
        raise ProxyError(
            404,
            f"The model '{model}' does not exist; served: {', '.join(sorted(served_models)) or 'none'}",
            param="model",
            code="model_not_found",
        )
