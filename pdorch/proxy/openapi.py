"""The proxy's OpenAPI 3.1 document (served at /openapi.json), built from its config.

It describes what `validation.validate` accepts and the JSON errors the proxy answers, so generic
tools (schemathesis, client generators) can drive the proxy. Unknown request fields pass through to
the engines, so request schemas allow additional properties.
"""

from __future__ import annotations

from typing import Any

from pdorch.proxy.config import ProxyConfig

_ERROR_REF = {"$ref": "#/components/schemas/Error"}
# stream_options is only accepted together with "stream": true.
_STREAM_OPTIONS_NEED_STREAM = {
    "stream_options": {"required": ["stream"], "properties": {"stream": {"const": True}}}
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _common_fields() -> dict[str, Any]:
    """Sampling and output fields the proxy checks (types and ranges as in `validation`)."""
    num = {"type": "number"}
    return {
        "model": {"type": "string", "minLength": 1},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "min_tokens": {"type": "integer", "minimum": 0},
        "n": {"type": "integer", "minimum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "seed": {"type": "integer"},
        "temperature": {**num, "minimum": 0, "maximum": 2},
        "top_p": {**num, "minimum": 0, "maximum": 1},
        "min_p": {**num, "minimum": 0, "maximum": 1},
        "presence_penalty": {**num, "minimum": -2, "maximum": 2},
        "frequency_penalty": {**num, "minimum": -2, "maximum": 2},
        "repetition_penalty": {**num, "minimum": 0},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "ignore_eos": {"type": "boolean"},
        "skip_special_tokens": {"type": "boolean"},
    }


def _completion_request(engine: str) -> dict[str, Any]:
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    # vLLM P/D hands over one prompt's KV per request, so a list holds one prompt there.
    most = {"maxItems": 1} if engine == "vllm" else {}
    return {
        "type": "object",
        "required": ["model", "prompt"],
        "dependentSchemas": _STREAM_OPTIONS_NEED_STREAM,
        "properties": {
            **_common_fields(),
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "minItems": 1, **most, "items": {"type": "string"}},
                    token_ids,
                    {"type": "array", "minItems": 1, **most, "items": token_ids},
                ]
            },
            "echo": {"type": "boolean"},
            "best_of": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "integer", "minimum": 0},
        },
    }


def _chat_request() -> dict[str, Any]:
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "minLength": 1},
            "content": {"oneOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]},
        },
    }
    return {
        "type": "object",
        "required": ["model", "messages"],
        "dependentSchemas": _STREAM_OPTIONS_NEED_STREAM,
        "properties": {
            **_common_fields(),
            "messages": {"type": "array", "minItems": 1, "items": message},
            "logprobs": {"type": "boolean"},
        },
    }


def _generate_op(summary: str, schema_ref: str, secured: bool) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": "completion (JSON), or an SSE stream when stream is true",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
        },
        "400": _error("invalid request body; error.param names the field"),
        "404": _error("model not served"),
        "408": _error("request body not received in time"),
        "413": _error("request body too large"),
        "429": _error("admission queue full (Retry-After set)"),
        "502": _error("every attempted prefill/decode pair failed"),
        "503": _error("no usable prefill/decode pair, or shutting down"),
        "504": _error("an engine or the request deadline timed out"),
    }
    if secured:
        responses["401"] = _error("missing or invalid API key")
    return {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
        },
        "responses": responses,
    }


def openapi_document(config: ProxyConfig) -> dict[str, Any]:
    """The OpenAPI document of a proxy running with ``config``."""
    secured = bool(config.api_key)
    paths: dict[str, Any] = {
        "/v1/completions": {"post": _generate_op("text completion", "CompletionRequest", secured)},
        "/v1/chat/completions": {"post": _generate_op("chat completion", "ChatCompletionRequest", secured)},
        "/v1/models": {
            "get": {
                "summary": "models served by the decode engines",
                "responses": {
                    "200": {"description": "model list", "content": {"application/json": {}}},
                    **({"401": _error("missing or invalid API key")} if secured else {}),
                    "503": _error("no decode engine answered"),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "readiness: a usable prefill/decode pair exists, or (degraded) a decode for "
                "the decode-only path of conditional disaggregation",
                "security": [],
                "responses": {
                    "200": {
                        "description": "ready: status ok, or degraded (decode-only: short prompts only)",
                        "content": {"application/json": {}},
                    },
                    "503": {"description": "not ready", "content": {"application/json": {}}},
                },
            }
        },
        "/livez": {
            "get": {
                "summary": "liveness: the proxy's event loop answers (engines are not consulted)",
                "security": [],
                "responses": {"200": {"description": "alive", "content": {"application/json": {}}}},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "security": [],
                "responses": {
                    "200": {"description": "OpenAPI document", "content": {"application/json": {}}}
                },
            }
        },
    }
    if config.metrics_port is None:
        paths["/metrics"] = {
            "get": {
                "summary": "Prometheus metrics (moved to --metrics-port when that is set)",
                "security": [],
                "responses": {"200": {"description": "text exposition", "content": {"text/plain": {}}}},
            }
        }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "pdorch proxy", "version": "1", "description": f"engine: {config.engine}"},
        "paths": paths,
        "components": {
            "schemas": {
                "CompletionRequest": _completion_request(config.engine),
                "ChatCompletionRequest": _chat_request(),
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "integer"]},
                            },
                        }
                    },
                },
            }
        },
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
