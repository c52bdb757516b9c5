"""Proxy access control: bearer auth on the API routes, and /metrics kept off the client port on request."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.compat.helpers import sample
from tests.compat.test_proxy import MODEL, WAIT_S, expected_text, stack

pytestmark = pytest.mark.compat

KEY = "s3cret-key-0123456789"
BODY = {"model": MODEL, "prompt": "secured", "max_tokens": 2}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as s:
        yield s


@pytest.mark.parametrize(
    "authorization",
    [
        None,  # missing
        "",
        "Bearer",
        "Bearer ",
        f"Basic {KEY}",  # right secret, wrong scheme
        "Bearer wrong",
        f"Bearer {KEY[:-1]}",  # a prefix of the key
        f"Bearer {KEY}x",
        f"Bearer {KEY.upper()}",
    ],
)
async def test_missing_or_wrong_tokens_get_401_json(
    http: aiohttp.ClientSession, authorization: str | None
) -> None:
    async with stack("vllm", api_key=KEY) as s:
        headers = {} if authorization is None else {"Authorization": authorization}
        for method, path in (
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
        ):
            async with http.request(method, s.url + path, json=BODY, headers=headers) as r:
                assert r.status == 401, (path, authorization)
                assert r.headers["Content-Type"].startswith("application/json")
                err = (await r.json())["error"]
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            assert "Bearer" in err["message"] and KEY not in err["message"]
        async with http.get(s.url + "/metrics") as m:
            text = await m.text()
        assert sample(text, "pdorch_proxy_rejected_total", {"reason": "unauthorized"}) == 3
        # Nothing reached an engine.
        async with http.get(s.prefill_url + "/metrics") as m:
            assert sample(await m.text(), "vllm:prompt_tokens_total") == 0


async def test_right_token_is_accepted(http: aiohttp.ClientSession) -> None:
    async with stack("vllm", api_key=KEY) as s:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.post(s.url + "/v1/completions", json=BODY, headers=headers) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["text"] == expected_text("secured", 2)
        async with http.get(s.url + "/v1/models", headers={"Authorization": f"bearer  {KEY} "}) as r:
            assert r.status == 200  # scheme is case-insensitive, surrounding blanks ignored
        # Probes and the API description need no key.
        for path in ("/health", "/openapi.json"):
            async with http.get(s.url + path) as r:
                assert r.status == 200, path
        async with http.get(s.url + "/openapi.json") as r:
            assert (await r.json())["security"] == [{"bearer": []}]


async def test_metrics_port_keeps_metrics_off_the_client_port(http: aiohttp.ClientSession) -> None:
    async with stack("vllm", metrics_port=0) as s:
        assert s.proxy.metrics_port is not None and s.proxy.metrics_port != s.proxy.port
        metrics_url = f"http://127.0.0.1:{s.proxy.metrics_port}"
        async with http.post(s.url + "/v1/completions", json=BODY) as r:
            assert r.status == 200
        async with http.get(s.url + "/metrics") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == 404
        async with http.get(metrics_url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        assert sample(text, "pdorch_proxy_requests_total", {"status": "200"}) == 1
        # The metrics listener serves nothing else.
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/openapi.json")):
            async with http.request(method, metrics_url + path, json=BODY) as r:
                assert r.status == 404, path
        async with http.get(s.url + "/openapi.json") as r:
            assert "/metrics" not in (await r.json())["paths"]


async def test_default_serves_metrics_on_the_client_port(http: aiohttp.ClientSession) -> None:
    # Documented default (docs/reliability.md): without --metrics-port, /metrics sits next to the API.
    async with stack("vllm") as s:
        assert s.proxy.metrics_port is None
        async with http.get(s.url + "/metrics") as r:
            assert r.status == 200
            assert "pdorch_proxy_requests_total" in await r.text()
