"""Engine body transforms: vLLM NixlConnector legs, SGLang bootstrap fields, rooms, token estimates."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdorch.proxy.protocols import (
    RoomMinter,
    estimate_prompt_tokens,
    routing_text,
    sglang_batch_size,
    sglang_body,
    vllm_decode_body,
    vllm_prefill_body,
)

pytestmark = pytest.mark.unit


def test_vllm_prefill_body_exactly() -> None:
    client = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 100,
        "max_completion_tokens": 100,
        "min_tokens": 5,
        "min_completion_tokens": 5,
        "temperature": 0.2,
    }
    before = copy.deepcopy(client)
    assert vllm_prefill_body(client) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "temperature": 0.2,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    assert client == before  # the client's body is kept intact for the decode leg


def test_vllm_prefill_adds_max_tokens_but_not_max_completion_tokens() -> None:
    out = vllm_prefill_body({"model": "m", "prompt": "x"})
    assert out["max_tokens"] == 1 and "max_completion_tokens" not in out and out["stream"] is False


def test_vllm_decode_body_carries_prefill_params_verbatim() -> None:
    params = {
        "do_remote_prefill": True,
        "remote_block_ids": [[1, 2]],
        "remote_engine_id": "e",
        "tp_size": 1,
        "x": {"y": 1},
    }
    client = {
        "model": "m",
        "prompt": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 9,
    }
    out = vllm_decode_body(client, params)
    assert out == {**client, "kv_transfer_params": params}
    assert out["kv_transfer_params"] is params


def test_sglang_body_same_for_both_legs() -> None:
    client = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 4}
    out = sglang_body(client, "10.1.2.3", 8998, 42)
    assert out == {**client, "bootstrap_host": "10.1.2.3", "bootstrap_port": 8998, "bootstrap_room": 42}
    assert sglang_body(client, "fd00::1", None, 1)["bootstrap_host"] == "[fd00::1]"


def test_rooms_unique_and_63_bit() -> None:
    m = RoomMinter()
    rooms = [m.mint() for _ in range(100_000)]
    assert len(set(rooms)) == len(rooms)
    assert all(0 <= r < 2**63 for r in rooms)
    # Not a plain counter: consecutive rooms spread over the range.
    assert max(rooms) > 2**62 and min(rooms) < 2**61


@given(st.integers(0, 2**63 - 1))
def test_rooms_unique_around_any_start_including_wraparound(seed: int) -> None:
    m = RoomMinter(seed)
    rooms = [m.mint() for _ in range(200)]
    assert len(set(rooms)) == 200 and all(0 <= r < 2**63 for r in rooms)


def test_routing_text_and_estimates() -> None:
    assert routing_text({"prompt": "abcd"}, "completion") == "abcd"
    assert routing_text({"prompt": ["ab", "cd"]}, "completion") == "ab\ncd"
    chat = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
        ]
    }
    assert routing_text(chat, "chat").startswith("sys\n")
    assert estimate_prompt_tokens({"prompt": "x" * 400}, "completion") == 100
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}, "completion") == 3
    assert estimate_prompt_tokens({"prompt": [[1, 2], [3]]}, "completion") == 3


def test_sglang_batches_get_one_room_per_sequence() -> None:
    assert sglang_batch_size({"prompt": "x"}, "completion") is None
    assert sglang_batch_size({"prompt": ["x"]}, "completion") is None
    assert sglang_batch_size({"prompt": ["a", "b", "c"]}, "completion") == 3
    assert sglang_batch_size({"prompt": [[1], [2]]}, "completion") == 2
    assert sglang_batch_size({"prompt": [1, 2, 3]}, "completion") is None  # one token-id prompt
    assert sglang_batch_size({"messages": [], "n": 2}, "chat") == 2
    assert sglang_batch_size({"messages": [], "n": 1}, "chat") is None
    # Parallel samples need rooms of their own: SGLang repeats the list n times and reads prompts x n.
    assert sglang_batch_size({"prompt": "x", "n": 3}, "completion") == 3
    assert sglang_batch_size({"prompt": ["a", "b"], "n": 2}, "completion") == 4
    assert sglang_batch_size({"prompt": [1, 2], "n": 2}, "completion") == 2
    assert sglang_batch_size({"prompt": ["a", "b"], "n": True}, "completion") == 2
    # `n: 2.0` is two samples to the engine (lax integers), so two rooms.
    assert sglang_batch_size({"prompt": "x", "n": 2.0}, "completion") == 2
    out = sglang_body({"prompt": ["a", "b"]}, "h", 9, [5, 6])
    assert (
        out["bootstrap_host"] == ["h", "h"]
        and out["bootstrap_port"] == [9, 9]
        and out["bootstrap_room"] == [5, 6]
    )


def test_routing_text_survives_content_nested_too_deep_to_render() -> None:
    deep: list[object] = []
    for _ in range(5000):  # json.dumps recurses once per level
        deep = [deep]
    body = {"messages": [{"role": "user", "content": deep}, {"role": "user", "content": "tail"}]}
    assert routing_text(body, "chat") == "tail"


@pytest.mark.parametrize("prompts,n", [(1, 1), (1, 4), (3, 1), (3, 2), (2, 5)])
def test_every_sglang_sequence_gets_a_distinct_room(prompts: int, n: int) -> None:
    # SGLang's GenerateReqInput (io_struct, _normalize_bootstrap_params) repeats a room list n
    # times, or counts up from a single room, and sequence i reads entry i of prompts x n.
    body: dict[str, Any] = {"prompt": [f"p{i}" for i in range(prompts)] if prompts > 1 else "p", "n": n}
    count = sglang_batch_size(body, "completion")
    minter = RoomMinter(seed=7)
    rooms: int | list[int] = minter.mint() if count is None else [minter.mint() for _ in range(count)]
    sent = sglang_body(body, "h", 1, rooms)["bootstrap_room"]
    expanded = [sent + i for i in range(prompts * n)] if isinstance(sent, int) else sent * n
    per_sequence = expanded[: prompts * n]
    assert len(set(per_sequence)) == prompts * n


def test_sglang_fanout_past_the_room_limit_is_a_400_naming_the_prompt() -> None:
    from pdorch.proxy.errors import ProxyError
    from pdorch.proxy.validation import MAX_SEQUENCES, check_sglang_fanout

    check_sglang_fanout(MAX_SEQUENCES)
    with pytest.raises(ProxyError) as err:
        check_sglang_fanout(sglang_batch_size({"prompt": ["x"] * 100_000, "n": 128}, "completion") or 1)
    assert err.value.status == 400 and "12800000 sequences" in str(err.value)
