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


def test_prompts_the_ratio_may_underestimate_are_sampled_to_teach_it() -> None:
    """The ratio learns from prefill answers only. A prompt it puts under the threshold, but that a
    plausible ratio would put over it, counts at the threshold (goes P/D) while few prompts were
    counted, then one in EXPLORE_EVERY; prompts too short to reach it at any ratio never do."""
    from pdorch.proxy.token_ratio import EXPLORE_EVERY, MIN_SAMPLES

    r = TokenRatio()
    assert r.against(1500, 512) == 512  # 375 at the default ratio: sampled while unlearned
    assert r.against(200, 512) == 50  # 400 even at 2 tokens per character: never sampled
    assert r.against(4000, 512) == 1000  # over the threshold on its own estimate
    for _ in range(MIN_SAMPLES):
        r.observe(1000, 250)
    sampled = [c for c in range(1000, 2000) if r.against(c, 512) == 512]
    assert sampled and all(c % EXPLORE_EVERY == 0 for c in sampled)
    assert len(sampled) == len(range(1024, 2000, EXPLORE_EVERY))
