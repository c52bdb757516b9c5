"""OpenAI-compatible request parsing and response shapes shared by the vLLM and SGLang front ends.

`parse_request` validates the fields the simulator uses (unknown fields are accepted, as vllm-router
and sglang-router add engine-specific ones) and raises `BadRequest` with the offending ``param``.
`Flavor` holds the few places where vLLM and SGLang responses differ.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from pdorch.lax_int import lax_int
from pdorch.sim import tokens
from pdorch.sim.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

Kind = Literal["completion", "chat"]
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI / vLLM default for /v1/completions
EOS_TOKEN_ID = 128009  # Llama-3 <|eot_id|>, what SGLang reports as matched_stop


class BadRequest(Exception):
    """Client error with the parameter at fault (HTTP 400 unless `status` says otherwise)."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, err_type: str = "BadRequestError"
    ) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.err_type = err_type


@dataclass
class GenRequest:
    """The parts of a completion / chat request the simulator acts on."""

    kind: Kind
    body: dict[str, Any]
    model: str | None
    prompt_text: str
    prompt_ids: list[int]
    max_tokens: int | None  # explicit limit, None if the client gave none
    stream: bool
    stream_options_given: bool
    include_usage: bool
    echo: bool = False
    min_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_ids)

    @property
    def seed(self) -> int:
        """Seed of the deterministic output."""
        return tokens.prompt_seed(self.prompt_ids)


def _opt_int(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    as_int = lax_int(value)
    if as_int is None:
        raise BadRequest(f"'{name}' must be an integer", name)
    if as_int < minimum:
        raise BadRequest(f"'{name}' must be at least {minimum}, got {value}", name)
    return as_int


def _opt_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean", name)
    return value


def _prompt(body: dict[str, Any]) -> tuple[str, list[int]]:
    prompt = body.get("prompt")
    # A batch of one is the same as a single prompt; larger batches are out of the simulator's scope.
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise BadRequest("the simulator supports one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, tokens.tokenize(prompt)
    ids = [lax_int(t) for t in prompt] if isinstance(prompt, list) else []
    if ids and all(t is not None for t in ids):
        return "", [t for t in ids if t is not None]
    raise BadRequest("'prompt' must be a non-empty string or a list of token ids", "prompt")


def _messages(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a non-empty list of message objects", "messages")
    add_generation_prompt = body.get("add_generation_prompt", True)
    try:
        return tokens.render_chat(messages, add_generation_prompt=bool(add_generation_prompt))
    except TypeError as exc:
        raise BadRequest(str(exc), "messages") from None


def parse_request(body: Any, kind: Kind) -> GenRequest:
    """Validate a request body of `/v1/completions` (kind "completion") or `/v1/chat/completions`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    if kind == "completion":
        text, ids = _prompt(body)
        max_tokens = _opt_int(body, "max_tokens", 1)
    else:
        text = _messages(body)
        ids = tokens.tokenize(text)
        mct = _opt_int(body, "max_completion_tokens", 1)
        max_tokens = mct if mct is not None else _opt_int(body, "max_tokens", 1)
    n = _opt_int(body, "n", 1)
    if n is not None and n != 1:
        raise BadRequest("the simulator supports n=1 only", "n")
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    min_tokens = _opt_int(body, "min_tokens", 0) or 0
    # vLLM's SamplingParams check, against completions' default of 16 when max_tokens is absent.
    limit = max_tokens if max_tokens is not None or kind != "completion" else DEFAULT_COMPLETION_MAX_TOKENS
    if limit is not None and min_tokens > limit:
        raise BadRequest(
            f"min_tokens must be less than or equal to max_tokens={limit}, got {min_tokens}.", "min_tokens"
        )
    return GenRequest(
        kind=kind,
        body=body,
        model=model,
        prompt_text=text,
        prompt_ids=ids,
        max_tokens=max_tokens,
        stream=stream,
        stream_options_given=bool(options),  # vLLM tests truthiness: {} with stream false passes
        include_usage=include_usage,
        echo=kind == "completion" and _opt_bool(body, "echo"),
        min_tokens=min_tokens,
    )


def output_plan(req: GenRequest, max_model_len: int) -> tuple[int, int | None]:
    """(max_tokens, eos_at) for the engine.

    With an explicit limit the simulated model never stops early (like ``ignore_eos``), so benchmarks and
    tests get exactly the lengths they ask for; without one it stops at a prompt-dependent natural length.
    """
    room = max(max_model_len - req.prompt_tokens, 1)
    if req.max_tokens is not None:
        # Not clamped: prompt + max_tokens beyond the context is the engine's 400 (`check_fits`).
        return req.max_tokens, None
    natural = max(tokens.natural_length(req.seed), req.min_tokens)
    if req.kind == "completion":
        return min(DEFAULT_COMPLETION_MAX_TOKENS, room), natural
    return min(natural, room), natural


@dataclass(frozen=True)
class Flavor:
    """Where vLLM and SGLang responses differ."""

    name: Literal["vllm", "sglang"]
    owned_by: str
    error_body: Callable[[str, str, str | None, int], dict[str, Any]]

    def response_id(self, kind: Kind, request_id: str | None) -> str:
        """Response ``id``: vLLM ``cmpl-<X-Request-Id>``/``chatcmpl-…``; SGLang a bare uuid hex."""
        rid = request_id or uuid.uuid4().hex
        if self.name == "sglang":
            return rid
        return ("cmpl-" if kind == "completion" else "chatcmpl-") + rid

    def choice_extras(self, finish_reason: str | None) -> dict[str, Any]:
        """Engine-specific fields of a choice."""
        if self.name == "vllm":
            return {"stop_reason": None}
        return {"matched_stop": EOS_TOKEN_ID if finish_reason == "stop" else None}

    def error(
        self, message: str, err_type: str = "BadRequestError", param: str | None = None, status: int = 400
    ) -> web.Response:
        """JSON error response in this engine's shape."""
        return web.json_response(self.error_body(message, err_type, param, status), status=status)


def _vllm_error(message: str, err_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def _sglang_error(message: str, err_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": err_type, "param": param, "code": code}


VLLM = Flavor(name="vllm", owned_by="vllm", error_body=_vllm_error)
SGLANG = Flavor(name="sglang", owned_by="sglang", error_body=_sglang_error)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """OpenAI ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def full_response(
    flavor: Flavor,
    req: GenRequest,
    rid: str,
    model: str,
    text: str,
    finish_reason: str,
    completion_tokens: int,
) -> dict[str, Any]:
    """Non-streaming completion / chat completion object."""
    created = int(time.time())
    extras = flavor.choice_extras(finish_reason)
    if req.kind == "completion":
        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            **extras,
        }
        if flavor.name == "vllm":
            choice["prompt_logprobs"] = None
        obj: dict[str, Any] = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    else:
        message = {"role": "assistant", "content": text, "tool_calls": []}
        if flavor.name == "vllm":
            message["reasoning_content"] = None
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason, **extras}
        obj = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    obj["usage"] = usage(req.prompt_tokens, completion_tokens)
    if flavor.name == "vllm":
        if req.kind == "chat":
            obj["prompt_logprobs"] = None
        obj["kv_transfer_params"] = None
    return obj


def chunk(
    flavor: Flavor,
    req: GenRequest,
    rid: str,
    model: str,
    created: int,
    *,
    text: str | None,
    finish_reason: str | None,
    role: bool = False,
) -> dict[str, Any]:
    """One streaming chunk; for chat, ``role`` marks the opening chunk with ``delta.role``."""
    extras = flavor.choice_extras(finish_reason)
    if req.kind == "completion":
        choice: dict[str, Any] = {
            "index": 0,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish_reason,
            **extras,
        }
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = ""
    if text is not None:
        delta["content"] = text
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **extras}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    req: GenRequest, rid: str, model: str, created: int, completion_tokens: int
) -> dict[str, Any]:
    """Final ``choices: []`` chunk carrying usage (``stream_options.include_usage``)."""
    obj = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(req.prompt_tokens, completion_tokens),
    }


def models_response(config: Any, owned_by: str, **extra: Any) -> web.Response:
    """`/v1/models` listing the single served model, in the engine's own shape."""
    m = config.model
    card = {
        "id": m,
        "object": "model",
        "created": int(time.time()),
        "owned_by": owned_by,
        "root": m,
        **extra,
        "max_model_len": config.coefficients.max_model_len,
    }
    return web.json_response({"object": "list", "data": [card]})


def metrics_response(engine: Any) -> web.Response:
    """Prometheus text of one engine."""
    return web.Response(body=engine.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
