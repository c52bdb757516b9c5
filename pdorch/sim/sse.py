"""Server-sent-events framing as OpenAI-compatible servers emit it."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
CONTENT_TYPE = "text/event-stream"


def event(obj: Any) -> bytes:
    """One ``data: <json>\\n\\n`` event (compact JSON, like vLLM)."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


def parse_events(raw: bytes) -> list[Any]:
    """Split an SSE body into decoded JSON events; ``[DONE]`` is returned as the string "[DONE]"."""
    out: list[Any] = []
    for block in raw.decode("utf-8").split("\n\n"):
        for line in block.splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
