"""How the real engines read an integer field of a JSON request.

vLLM's and SGLang's OpenAI request models are pydantic models in lax mode: an integer field takes
an int or a float with no fractional part (``16.0`` is 16), never a bool; ``16.5`` is refused. The
proxy's validator and the simulated engines follow the same rule, so a request either engine
accepts is not refused in front of it.
"""

from __future__ import annotations

import math
from typing import Any


def lax_int(value: Any) -> int | None:
    """The integer ``value`` stands for under pydantic's lax mode, or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None
