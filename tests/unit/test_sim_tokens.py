"""Pseudo-tokenizer, chat rendering and deterministic generation."""

from __future__ import annotations

import pytest

from pdorch.sim import tokens

pytestmark = pytest.mark.unit


def test_split_is_about_four_chars_per_token_and_lossless() -> None:
    text = "hello world, internationalization is long"
    pieces = tokens.split_pieces(text)
    assert "".join(pieces) == text
    assert all(len(p.strip()) <= 4 for p in pieces)
    # "internationalization" (20 chars) -> 5 pieces
    assert tokens.count_tokens("internationalization") == 5
    assert tokens.count_tokens("") == 0


def test_token_ids_are_stable_and_in_vocab() -> None:
    a = tokens.tokenize("the same prompt")
    assert a == tokens.tokenize("the same prompt")
    assert a != tokens.tokenize("another prompt")
    assert all(0 <= t < tokens.VOCAB_SIZE for t in a)


def test_generated_text_is_deterministic_and_retokenizes_to_its_length() -> None:
    seed = tokens.prompt_seed(tokens.tokenize("abc def"))
    text = tokens.generated_text(seed, 0, 37)
    assert text == tokens.generated_text(seed, 0, 37)
    assert tokens.count_tokens(text) == 37
    assert text == tokens.generated_text(seed, 0, 10) + tokens.generated_text(seed, 10, 37)
    assert all(len(w) <= tokens.PIECE_CHARS for w in tokens.WORDS)


def test_natural_length_bounds() -> None:
    for seed in range(200):
        assert 8 <= tokens.natural_length(seed) <= 64


def test_render_chat_and_content_parts() -> None:
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]  # fmt: skip
    out = tokens.render_chat(msgs)
    assert "be brief" in out and "hi there" in out
    assert out.endswith("assistant<|end_header_id|>\n\n")
    with pytest.raises(TypeError):
        tokens.render_chat([{"content": "x"}])
    with pytest.raises(TypeError):
        tokens.content_text(42)
