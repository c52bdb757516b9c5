"""Prompt tokens per character of prompt text, learned from the engines' own counts. Pure.

The proxy has no tokenizer, so it estimates a prompt's tokens from its characters: conditional
disaggregation compares that with ``minPromptTokens``, and the prefill queue caps the tokens in
flight by it. Four characters per token holds for English prose; code runs nearer three, and
Chinese or Japanese text nearer one, where a fixed ratio sends prompts of thousands of tokens down
the decode-only path. vLLM's prefill answer says how many tokens the prompt had
(``usage.prompt_tokens``, chat template included), so the ratio is learned from recent prompts
of the same kind of request.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

DEFAULT_TOKENS_PER_CHAR = 0.25
# Recent prompts the ratio is read from: enough to smooth one odd prompt, few enough to follow a
# change of traffic within minutes.
WINDOW = 256
# Shorter prompts are mostly chat template, which would skew the ratio of long ones.
MIN_CHARS = 64
# A ratio outside this range is a reading error (an engine counting something else), not text.
MIN_TOKENS_PER_CHAR, MAX_TOKENS_PER_CHAR = 0.05, 2.0
# The ratio is learned from prefill answers only, so prompts it puts under minPromptTokens (sent
# decode-only) never correct it: CJK text at 4x the default would stay misjudged for good. Such a
# prompt that could reach the threshold at a plausible ratio goes P/D while fewer than MIN_SAMPLES
# prompts were counted, and one in EXPLORE_EVERY (by character count, so every look at one
# request decides alike) after that.
MIN_SAMPLES = 16
EXPLORE_EVERY = 32


@dataclass
class TokenRatio:
    """Tokens per character over the last `WINDOW` prompts that were counted."""

    samples: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    chars: int = 0
    tokens: int = 0

    def observe(self, chars: int, tokens: int) -> None:
        """A prompt of `chars` characters had `tokens` tokens (short or implausible ones are skipped)."""
        if chars < MIN_CHARS or not MIN_TOKENS_PER_CHAR <= tokens / chars <= MAX_TOKENS_PER_CHAR:
            return
        if len(self.samples) == self.samples.maxlen:
            old_chars, old_tokens = self.samples[0]
            self.chars -= old_chars
            self.tokens -= old_tokens
        self.samples.append((chars, tokens))
        self.chars += chars
        self.tokens += tokens

    @property
    def per_char(self) -> float:
        """The learned ratio; `DEFAULT_TOKENS_PER_CHAR` before any prompt was counted."""
        return self.tokens / self.chars if self.chars else DEFAULT_TOKENS_PER_CHAR

    def estimate(self, chars: int) -> int:
        """Tokens of a prompt of `chars` characters."""
        return math.ceil(chars * self.per_char)

    def against(self, chars: int, threshold: int) -> int:
        """The estimate conditional disaggregation compares with `threshold`: `estimate`, or the
        threshold itself for a prompt under it sampled to teach the ratio (see MIN_SAMPLES)."""
        tokens = self.estimate(chars)
        if tokens >= threshold or chars * MAX_TOKENS_PER_CHAR < threshold:
            return tokens
        if len(self.samples) < MIN_SAMPLES or chars % EXPLORE_EVERY == 0:
            return threshold
        return tokens
