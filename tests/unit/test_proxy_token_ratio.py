"""The proxy's learned tokens per character (pure)."""

from __future__ import annotations

import pytest

from pdorch.proxy.protocols import estimate_prompt_tokens
from pdorch.proxy.token_ratio import DEFAULT_TOKENS_PER_CHAR, MIN_CHARS, WINDOW, TokenRatio

pytestmark = pytest.mark.unit


def test_before_any_count_a_token_is_four_characters() -> None:
    ratio = TokenRatio()
    assert ratio.per_char == DEFAULT_TOKENS_PER_CHAR
    assert ratio.estimate(401) == 101 == estimate_prompt_tokens({"prompt": "x" * 401}, "completion")


def test_the_ratio_follows_the_engines_counts_over_a_window() -> None:
    ratio = TokenRatio()
    for _ in range(10):
        ratio.observe(1000, 900)  # CJK-like text: about a token per character
    assert ratio.per_char == pytest.approx(0.9)
    assert estimate_prompt_tokens({"prompt": "漢" * 300}, "completion", ratio=ratio) == 270
    # A window later, only the new traffic counts.
    for _ in range(WINDOW):
        ratio.observe(1000, 300)
    assert ratio.per_char == pytest.approx(0.3)
    assert len(ratio.samples) == WINDOW


@pytest.mark.parametrize(
    ("chars", "tokens"),
    [(MIN_CHARS - 1, 10), (1000, 0), (1000, 10), (1000, 5000)],
)
def test_short_prompts_and_implausible_counts_are_not_learned(chars: int, tokens: int) -> None:
    ratio = TokenRatio()
    ratio.observe(chars, tokens)
    assert ratio.per_char == DEFAULT_TOKENS_PER_CHAR and not ratio.samples


def test_token_id_prompts_are_counted_exactly_whatever_the_ratio() -> None:
    ratio = TokenRatio()
    ratio.observe(1000, 900)
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}, "completion", ratio=ratio) == 3
