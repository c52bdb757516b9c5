"""schemathesis against a running `pdorch proxy` (its own /openapi.json) in front of `pdorch sim`.

Both run as subprocesses on loopback. schemathesis generates valid and invalid requests for every
documented operation; each must be answered (bounded by a client timeout: no hang) without a 5xx,
with a status the document lists and the content type it declares.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance

from tests.compat.helpers import free_port, spawn, stop, wait_http_ok

pytestmark = pytest.mark.compat

MODEL = "sim-model"
REQUEST_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def proxy_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    p, d, port = free_port(), free_port(), free_port()
    roles = tmp / "roles.json"
    roles.write_text(json.dumps({f"127.0.0.1:{p}": "prefill", f"127.0.0.1:{d}": "decode"}))
    # A 2048-token context (distserve preset) keeps generated max_tokens from running long.
    sim_cmd = [sys.executable, "-m", "pdorch.cli", "sim", "--host", "127.0.0.1", "--model", MODEL]
    sim_cmd += ["--port", str(p), "--port", str(d), "--role-map", str(roles), "--time-scale", "0.0001"]
    sim_cmd += ["--coefficients", "distserve-opt13b-a100"]
    px_cmd = [sys.executable, "-m", "pdorch.cli", "proxy", "--engine", "vllm", "--host", "127.0.0.1"]
    px_cmd += ["--metrics-port", "0"]
    px_cmd += ["--port", str(port), "--prefill", f"http://127.0.0.1:{p}", "--decode", f"http://127.0.0.1:{d}"]
    px_cmd += ["--max-body-bytes", str(1024 * 1024), "--body-timeout", "5"]
    sim = spawn(sim_cmd, tmp / "sim.log")
    proxy = spawn(px_cmd, tmp / "proxy.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"http://127.0.0.1:{d}/health", 30, sim, tmp / "sim.log")
        wait_http_ok(base + "/health", 30, proxy, tmp / "proxy.log")
        yield base
        assert proxy.poll() is None, (tmp / "proxy.log").read_text()[-3000:]
    finally:
        stop(proxy)
        stop(sim)


def fuzz_operation(op: schemathesis.APIOperation, mode: GenerationMode) -> dict[int, int]:
    """Run schemathesis' generated cases for ``op``; returns how often each status came back."""
    seen: dict[int, int] = {}

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), served=st.booleans())
    def run(case: schemathesis.Case, served: bool) -> None:
        if served and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # half the cases name the served model, to get past 404
        resp = case.call_and_validate(
            checks=[not_a_server_error, status_code_conformance, content_type_conformance],
            timeout=REQUEST_TIMEOUT_S,
        )
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1

    run()
    return seen


# schemathesis's own pytest plugin does not load under this pytest; its Python API drives each
# operation's hypothesis strategy directly instead.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_proxy_survives_schema_driven_fuzzing(proxy_url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(proxy_url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"} <= labels, labels
    # Operations without a request body or parameters have no invalid form to generate.
    fuzzed = [op for op in operations if mode is GenerationMode.POSITIVE or op.method.upper() == "POST"]
    statuses = {op.label: fuzz_operation(op, mode) for op in fuzzed}
    print(f"[reliability] schemathesis {mode.value}: {json.dumps(statuses)}")
    assert all(code < 500 for seen in statuses.values() for code in seen), statuses
    if mode is GenerationMode.POSITIVE:
        # Valid requests do get completions. Many generated ones still get a 400: JSON Schema's
        # "integer" admits 1.0, which the proxy refuses by name, and the sim serves one prompt, n=1.
        ok = statuses["POST /v1/completions"].get(200, 0) + statuses["POST /v1/chat/completions"].get(200, 0)
        assert ok > 0, statuses
