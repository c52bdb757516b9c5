"""SSE framing and OpenAI response shapes."""

from __future__ import annotations

import json

import pytest

from pdorch.sim import openai_api, sse
from pdorch.sim.openai_api import SGLANG, VLLM, BadRequest, parse_request

pytestmark = pytest.mark.unit


def test_event_framing_and_parse_roundtrip() -> None:
    ev = sse.event({"a": "é", "b": [1]})
    assert ev.startswith(b"data: {") and ev.endswith(b"\n\n") and b"\n" not in ev[:-2]
    assert json.loads(ev[len(b"data: ") :]) == {"a": "é", "b": [1]}
    assert sse.parse_events(ev + sse.DONE) == [{"a": "é", "b": [1]}, "[DONE]"]
    assert sse.DONE == b"data: [DONE]\n\n"


def test_parse_completion_and_chat() -> None:
    req = parse_request(
        {
            "prompt": "hi you",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": False,
        },
        "completion",
    )
    assert req.max_tokens == 3 and req.stream and req.include_usage and req.prompt_tokens == 2
    chat = parse_request(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9, "max_completion_tokens": 4}, "chat"
    )
    assert chat.max_tokens == 4  # max_completion_tokens wins
    ids = parse_request({"prompt": [1, 2, 3]}, "completion")
    assert ids.prompt_ids == [1, 2, 3]
    assert parse_request({"prompt": ["one"]}, "completion").prompt_text == "one"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": [1, 2.5]}, "prompt"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "model": 3}, "model"),
    ],
)
def test_bad_completion_fields(body: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse_request(body, "completion")
    assert exc.value.param == param and exc.value.status == 400


def test_integral_floats_read_as_integers_like_pydantic_lax_mode() -> None:
    r = parse_request({"prompt": [1.0, 2, 3.0], "max_tokens": 4.0}, "completion")
    assert r.prompt_ids == [1, 2, 3] and r.max_tokens == 4 and isinstance(r.max_tokens, int)


def test_bad_chat_and_non_object() -> None:
    with pytest.raises(BadRequest, match="messages"):
        parse_request({"messages": []}, "chat")
    with pytest.raises(BadRequest):
        parse_request([1, 2], "chat")


def test_output_plan() -> None:
    explicit = parse_request({"prompt": "x", "max_tokens": 7}, "completion")
    assert openai_api.output_plan(explicit, 1000) == (7, None)
    default = parse_request({"prompt": "x"}, "completion")
    assert openai_api.output_plan(default, 1000)[0] == openai_api.DEFAULT_COMPLETION_MAX_TOKENS
    chat = parse_request({"messages": [{"role": "user", "content": "x"}]}, "chat")
    max_tokens, eos = openai_api.output_plan(chat, 100_000)
    assert eos == max_tokens and eos is not None and 8 <= eos <= 64


def test_ids_and_error_shapes() -> None:
    assert VLLM.response_id("completion", "abc") == "cmpl-abc"
    assert VLLM.response_id("chat", "abc") == "chatcmpl-abc"
    assert len(SGLANG.response_id("chat", None)) == 32
    assert VLLM.error_body("m", "BadRequestError", "p", 400) == {
        "error": {"message": "m", "type": "BadRequestError", "param": "p", "code": 400}
    }
    assert SGLANG.error_body("m", "BadRequestError", None, 400)["object"] == "error"


def test_chunks() -> None:
    req = parse_request({"messages": [{"role": "user", "content": "x"}]}, "chat")
    first = openai_api.chunk(VLLM, req, "id", "m", 1, text=None, finish_reason=None, role=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = openai_api.usage_chunk(req, "id", "m", 1, 5)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == req.prompt_tokens + 5
