"""Deterministic pseudo-tokenizer and text generator (no real model).

Tokenization: text is cut into whitespace-delimited words, each word (with its leading whitespace) into
pieces of at most 4 non-space characters, so a token is ~4 characters as with real BPE vocabularies.
Token ids are a stable hash of the piece. Generation: output token i of a request is a short word drawn
from a fixed list at a position derived from a hash of the prompt, so the same prompt always yields the
same text, whichever engine (or P/D pair) produced it, and re-tokenizing the output gives back exactly
the number of generated tokens.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

VOCAB_SIZE = 128256  # Llama-3 vocabulary size; ids are taken modulo this
PIECE_CHARS = 4
_WORD = re.compile(r"\s*\S+|\s+$")

# Words of at most PIECE_CHARS characters: each generated word (" " + word) is exactly one token.
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "was", "with", "as", "by", "at",
    "from", "this", "have", "or", "are", "an", "not", "but", "all", "one", "can", "more", "time", "new",
    "some", "they", "will", "each", "make", "like", "long", "look", "many", "day", "come", "part", "word",
    "kv", "gpu", "pod", "node", "fast", "slow", "data", "load", "page", "flow", "path", "unit", "byte",
    "sum", "map", "set", "key", "log", "run", "step", "edge", "core",
)  # fmt: skip


def split_pieces(text: str) -> list[str]:
    """Split text into token pieces (leading whitespace stays attached to the first piece of a word)."""
    pieces: list[str] = []
    for match in _WORD.finditer(text):
        word = match.group(0)
        stripped = word.lstrip()
        lead = word[: len(word) - len(stripped)]
        if not stripped:  # trailing whitespace only
            pieces.append(word)
            continue
        chunks = [stripped[i : i + PIECE_CHARS] for i in range(0, len(stripped), PIECE_CHARS)]
        chunks[0] = lead + chunks[0]
        pieces.extend(chunks)
    return pieces


def piece_id(piece: str) -> int:
    """Stable token id of one piece."""
    return zlib.crc32(piece.encode("utf-8", "surrogatepass")) % VOCAB_SIZE


def tokenize(text: str) -> list[int]:
    """Token ids of ``text``."""
    return [piece_id(p) for p in split_pieces(text)]


def count_tokens(text: str) -> int:
    """Number of tokens of ``text``."""
    return len(split_pieces(text))


def content_text(content: Any) -> str:
    """Text of an OpenAI message ``content``: a string, a list of parts, or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
        return "".join(texts)
    raise TypeError("message content must be a string or a list of content parts")


def render_chat(messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Render chat messages into one prompt string with a simple Llama-3-like template."""
    out: list[str] = ["<|begin_of_text|>"]
    for msg in messages:
        role = msg.get("role")
        if not isinstance(role, str):
            raise TypeError("each message needs a string 'role'")
        out.append(
            f"<|start_header_id|>{role}<|end_header_id|>\n\n{content_text(msg.get('content'))}<|eot_id|>"
        )
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def prompt_seed(prompt_ids: Sequence[int]) -> int:
    """Seed of the generated sequence: a hash of the prompt token ids."""
    return zlib.crc32(",".join(map(str, prompt_ids)).encode("ascii"))


def generated_token(seed: int, index: int) -> str:
    """Text of generated token ``index`` (0-based) for a prompt with ``seed``."""
    return " " + WORDS[(seed + index * 7) % len(WORDS)]


def generated_text(seed: int, start: int, stop: int) -> str:
    """Concatenated text of generated tokens ``start``..``stop - 1``."""
    return "".join(generated_token(seed, i) for i in range(start, stop))


def natural_length(seed: int, low: int = 8, high: int = 64) -> int:
    """Output length at which the simulated model emits EOS when no token limit applies."""
    return low + seed % (high - low + 1)
