"""Request validation and proxy configuration."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdorch.proxy.config import ProxyConfig, build_config, router_settings
from pdorch.proxy.errors import ProxyError
from pdorch.proxy.server import shutdown_plan
from pdorch.proxy.validation import (
    check_vllm_single_prompt,
    decode_json,
    model_ids,
    model_lengths,
    parse_json,
    prompt_count,
    validate,
)

pytestmark = pytest.mark.unit
MODELS = frozenset({"m"})

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["model", "prompt", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n",
     "temperature", "top_p", "stop", "logprobs", "echo", "min_tokens", "seed", "kv_transfer_params", "role", "content"]
)  # fmt: skip
bodies = st.dictionaries(field_names | st.text(max_size=6), json_values, max_size=8)


@settings(max_examples=400)
@given(st.one_of(bodies, json_values), st.sampled_from(["completion", "chat"]))
def test_random_bodies_never_give_server_errors(body: Any, kind: str) -> None:
    raw = json.dumps(body).encode()
    try:
        validate(parse_json(raw), kind, MODELS)  # type: ignore[arg-type]
    except ProxyError as exc:
        assert 400 <= exc.status < 500
        assert exc.body()["error"]["message"]


@given(st.binary(max_size=64))
def test_random_bytes_never_give_server_errors(raw: bytes) -> None:
    try:
        parse_json(raw)
    except ProxyError as exc:
        assert exc.status == 400


def err(body: dict[str, Any], kind: str = "completion") -> ProxyError:
    with pytest.raises(ProxyError) as e:
        validate(body, kind, MODELS)  # type: ignore[arg-type]
    return e.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": 3, "prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": float("inf")}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 0.0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "n": 10**9}, "n"),  # would mint 10^9 SGLang rooms
        ({"model": "m", "prompt": "x", "stream": 1}, "stream"),
        ({"model": "m", "prompt": "x", "stream_options": {}}, "stream_options"),
        ({"model": "m", "prompt": "x", "stream": True, "stream_options": []}, "stream_options"),
        ({"model": "m", "prompt": "x", "top_p": 2}, "top_p"),
        ({"model": "m", "prompt": "x", "stop": [1]}, "stop"),
        ({"model": "m", "prompt": "x", "logprobs": -1}, "logprobs"),
        ({"model": "m", "prompt": "x", "bootstrap_room": 1}, "bootstrap_room"),
    ],
)
def test_bad_completion_fields_named(body: dict[str, Any], param: str) -> None:
    e = err(body)
    assert e.status == 400 and e.param == param and param in e.message


def test_chat_and_model_checks() -> None:
    assert err({"model": "m", "messages": "hi"}, "chat").param == "messages"
    assert (
        err({"model": "m", "messages": [{"role": "user", "content": 5}]}, "chat").param
        == "messages[0].content"
    )
    assert err({"model": "m", "messages": [{"role": "u"}], "logprobs": 1}, "chat").param == "logprobs"
    e = err({"model": "other", "prompt": "x"})
    assert e.status == 404 and e.param == "model" and e.code == "model_not_found"
    validate({"model": "other", "prompt": "x"}, "completion", None)  # unknown served list: accepted
    validate(
        {"model": "m", "messages": [{"role": "user", "content": None}], "stream": True, "stream_options": {}},
        "chat",
        MODELS,
    )
    validate(
        {"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 5, "extra_engine_field": {"x": 1}},
        "completion",
        MODELS,
    )


def test_parse_json_errors() -> None:
    for raw in (b"{", b"[]", b'"x"', b"\xff"):
        with pytest.raises(ProxyError) as e:
            parse_json(raw)
        assert e.value.status == 400 and e.value.param is None


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_request_with_a_non_finite_number_is_a_400_that_says_so(constant: str) -> None:
    """The legs are re-encoded with msgspec, which writes NaN and infinities as null (helper-85: a
    -Infinity logit bias reached the engine as null); JSON has no such numbers, so they are refused."""
    raw = b'{"model": "m", "prompt": "x", "logit_bias": {"50256": ' + constant.encode() + b"}}"
    with pytest.raises(ProxyError) as e:
        parse_json(raw)
    assert e.value.status == 400 and f"{constant} is not a JSON number" in e.value.message
    assert parse_json(b'{"logit_bias": {"50256": -100}}') == {"logit_bias": {"50256": -100}}
    with pytest.raises(ProxyError) as e:  # a literal beyond a double's range reads as an infinity
        parse_json(b'{"logit_bias": {"50256": -1e400}}')
    assert e.value.status == 400 and "-1e400 is beyond a double's range" in e.value.message
    assert parse_json(b'{"top_p": 1e-400}') == {"top_p": 0.0}  # underflow is finite: kept


def test_deeply_nested_body_is_a_400() -> None:
    with pytest.raises(ProxyError) as e:
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    assert e.value.status == 400 and "nested too deeply" in e.value.message


@settings(max_examples=300)
@given(st.one_of(bodies, json_values))
def test_decode_json_reads_what_the_stdlib_reads(body: Any) -> None:
    # The fast decoder must not change what is accepted or how it is read, NaN and infinities included.
    raw = json.dumps(body).encode()
    assert json.dumps(decode_json(raw)) == json.dumps(json.loads(raw))


@given(st.binary(max_size=64))
def test_decode_json_refuses_what_the_stdlib_refuses(raw: bytes) -> None:
    try:
        expected: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        with pytest.raises(type(exc)):
            decode_json(raw)
        return
    assert json.dumps(decode_json(raw)) == json.dumps(expected)


def test_router_config_env_and_flag_precedence() -> None:
    wire = {
        "policy": "cache_aware",
        "conditionalDisaggregation": {"minPromptTokens": 256},
        "prefillQueue": {"maxInflightTokens": 16384, "ttftSeconds": 1.5, "maxWaitSeconds": 20},
        "timeouts": {"connectSeconds": 2, "firstByteSeconds": 60, "requestSeconds": 600},
        "retries": {"maxRetries": 4},
        "auth": {"secretName": "k"},
    }
    assert router_settings(json.dumps(wire)) == {
        "policy": "cache_aware",
        "min_prompt_tokens": 256,
        "prefill_queue_tokens": 16384,
        "prefill_queue_ttft_s": 1.5,
        "prefill_queue_max_wait_s": 20,
        "connect_timeout_s": 2,
        "first_byte_timeout_s": 60,
        "request_timeout_s": 600,
        "max_retries": 4,
    }
    env = {"PDORCH_ROUTER_CONFIG": json.dumps(wire), "PDORCH_API_KEY": "k1"}
    cfg = build_config(
        {"engine": "vllm", "group": "g", "namespace": "ns", "policy": "round_robin", "port": None}, env
    )
    assert cfg.policy == "round_robin" and cfg.max_retries == 4 and cfg.api_key == "k1" and cfg.port == 8000
    assert not cfg.static


def test_config_requires_one_discovery_mode() -> None:
    with pytest.raises(ValueError):
        ProxyConfig(engine="vllm")
    with pytest.raises(ValueError):
        ProxyConfig(engine="vllm", group="g", namespace="n", decode=("http://d:1",))
    with pytest.raises(ValueError):
        ProxyConfig(engine="vllm", group="g")
    assert ProxyConfig(engine="sglang", decode=("http://d:1",)).static


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": "x", "max_tokens": 16.0, "n": 1.0},  # pydantic lax mode: 16.0 is 16
    {"model": "m", "prompt": [1.0, 2, 3.0]},
])  # fmt: skip
def test_integral_floats_are_integers_as_in_the_engines(body: dict[str, Any]) -> None:
    validate(body, "completion", MODELS)


def test_conditional_disaggregation_is_refused_for_sglang() -> None:
    # A real SGLang decode aborts requests without bootstrap_room (HTTP 400): no decode-only path.
    with pytest.raises(ValueError, match="needs --engine vllm"):
        ProxyConfig(engine="sglang", decode=("http://d:1",), min_prompt_tokens=64)
    assert ProxyConfig(engine="vllm", decode=("http://d:1",), min_prompt_tokens=64).min_prompt_tokens == 64
    assert ProxyConfig(engine="sglang", decode=("http://d:1",), min_prompt_tokens=0).static


@pytest.mark.parametrize(
    ("raw", "ids"),
    [
        (b'{"object": "list", "data": [{"id": "a"}, {"id": 7}, {"x": 1}, "b"]}', frozenset({"a", "7"})),
        (b'{"data": []}', frozenset()),
        (b'{"data": null}', None),
        (b'{"data": {"id": "a"}}', None),
        (b'{"object": "list"}', None),
        (b'[{"id": "a"}]', None),
        (b"not json", None),
        (b"\xff\xfe", None),
        (b"[" * 100_000, None),
    ],
)
def test_an_engine_model_list_is_read_only_in_the_openai_shape(
    raw: bytes, ids: frozenset[str] | None
) -> None:
    assert model_ids(raw) == ids


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        ({"model": "m", "prompt": "x", "min_tokens": 5, "max_tokens": 2}, "completion", "min_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "min_tokens": 8, "max_completion_tokens": 7}, "chat", "min_tokens"),
        # Chat's max_completion_tokens is the cap when both are given, as vLLM reads them.
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "min_tokens": 8, "max_tokens": 100, "max_completion_tokens": 7}, "chat", "min_tokens"),
    ],
)  # fmt: skip
def test_a_minimum_above_the_maximum_is_refused_up_front(body: dict[str, Any], kind: str, param: str) -> None:
    """The vLLM decode refuses it (400), but only after the prefill ran and leased its KV for 30 s
    (review helper-72, finding 1): refused before anything goes upstream."""
    e = err(body, kind)
    assert e.status == 400 and e.param == param
    assert "less than or equal to" in e.message


def test_min_completion_tokens_is_left_to_the_engine() -> None:
    """helper-74: vLLM may not read it; a proxy check would refuse what the engine serves."""
    validate({"model": "m", "prompt": "x", "min_completion_tokens": 5, "max_tokens": 2}, "completion")
    validate({"model": "m", "prompt": "x", "min_completion_tokens": "many"}, "completion")


def test_a_minimum_within_the_maximum_passes() -> None:
    validate({"model": "m", "prompt": "x", "min_tokens": 2, "max_tokens": 2}, "completion", MODELS)
    validate({"model": "m", "prompt": "x", "min_tokens": 50}, "completion", MODELS)  # no explicit cap
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    validate({**chat, "min_tokens": 8, "max_tokens": 7, "max_completion_tokens": 9}, "chat", MODELS)


def test_max_tokens_beyond_the_served_context_length_is_refused_when_known() -> None:
    lens = model_lengths(b'{"object":"list","data":[{"id":"m","max_model_len":2048},{"id":"n"}]}')
    assert lens == {"m": 2048}
    body = {"model": "m", "prompt": "x", "max_tokens": 10**9}
    with pytest.raises(ProxyError) as e:
        validate(body, "completion", MODELS, lens)
    assert e.value.status == 400 and e.value.param == "max_tokens" and "2048" in e.value.message
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4096}
    with pytest.raises(ProxyError) as e:
        validate(chat, "chat", MODELS, lens)
    assert e.value.param == "max_completion_tokens"
    validate({**body, "max_tokens": 2048}, "completion", MODELS, lens)
    validate(body, "completion", MODELS, None)  # length not known: the engine decides
    assert model_lengths(b"not json") == {} and model_lengths(b'{"data": 3}') == {}


@pytest.mark.parametrize(
    ("prompt", "count"),
    [("a", 1), ([1, 2, 3], 1), (["a"], 1), ([[1, 2]], 1), (["a", "b"], 2), ([[1], [2], [3]], 3)],
)
def test_prompt_count(prompt: Any, count: int) -> None:
    assert prompt_count({"prompt": prompt}) == count


def test_several_prompts_are_refused_for_vllm_pd_with_what_to_do() -> None:
    """vLLM's prefill returns the kv_transfer_params of prompt 0 only (review helper-72, finding 2)."""
    for prompt in ("a", [1, 2, 3], ["a"], [[1, 2]]):
        check_vllm_single_prompt({"prompt": prompt})
    for prompt in (["a", "b"], [[1], [2]]):
        with pytest.raises(ProxyError) as e:
            check_vllm_single_prompt({"prompt": prompt})
        assert e.value.status == 400 and e.value.param == "prompt"
        assert "one prompt per request" in e.value.message


def test_the_drain_delay_and_the_final_error_fit_in_the_grace() -> None:
    assert shutdown_plan(30.0, 5.0) == (5.0, 1.0)
    delay, margin = shutdown_plan(3.0, 5.0)  # a delay longer than the grace is cut to fit
    assert delay + margin == pytest.approx(3.0) and margin == pytest.approx(0.3)
    assert shutdown_plan(0.0, 5.0) == (0.0, 0.0)
    assert ProxyConfig(engine="vllm", decode=("http://d:1",)).shutdown_drain_delay_s == 5.0
