"""The proxy's OpenAPI document follows its config (metrics placement, bearer auth)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdorch.proxy.config import ProxyConfig
from pdorch.proxy.openapi import openapi_document

pytestmark = pytest.mark.unit


def cfg(**kw: object) -> ProxyConfig:
    return ProxyConfig(engine="vllm", decode=("http://127.0.0.1:1",), **kw)  # type: ignore[arg-type]


def test_default_document_lists_metrics_and_no_security() -> None:
    doc = openapi_document(cfg())
    assert doc["openapi"].startswith("3.")
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(
        doc["paths"]
    )
    assert "security" not in doc
    req = doc["components"]["schemas"]["CompletionRequest"]
    assert req["required"] == ["model", "prompt"]


def test_metrics_port_and_api_key_change_the_document() -> None:
    doc = openapi_document(cfg(metrics_port=9100, api_key="k"))
    assert "/metrics" not in doc["paths"]
    assert doc["security"] == [{"bearer": []}]
    assert "401" in doc["paths"]["/v1/completions"]["post"]["responses"]
    assert doc["paths"]["/health"]["get"]["security"] == []  # probes need no key


def test_metrics_port_must_differ_from_client_port() -> None:
    with pytest.raises(ValidationError, match="--metrics-port"):
        cfg(port=8000, metrics_port=8000)


def test_a_vllm_proxy_documents_one_prompt_per_completion_request() -> None:
    """It refuses several prompts (vLLM P/D hands over one prompt's KV); SGLang fans them out."""

    def prompt_lists(engine: str) -> list[dict[str, object]]:
        doc = openapi_document(ProxyConfig(engine=engine, decode=("http://127.0.0.1:1",)))  # type: ignore[arg-type]
        alts = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["oneOf"]
        return [a for a in alts if a.get("type") == "array" and a["items"].get("type") != "integer"]

    assert [a.get("maxItems") for a in prompt_lists("vllm")] == [1, 1]
    assert [a.get("maxItems") for a in prompt_lists("sglang")] == [None, None]
