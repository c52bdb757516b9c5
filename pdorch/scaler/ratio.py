"""Keep a prefill/decode pair inside the declared P:D ratio band (pure).

Only raises: a pool below the band is grown to meet it, never the other one shrunk, so the
band costs capacity instead of SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RatioBand:
    """`spec.ratio`: prefill:decode with a relative tolerance."""

    prefill: int
    decode: int
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.prefill < 1 or self.decode < 1 or not 0 <= self.tolerance <= 1:
            raise ValueError("ratio needs prefill >= 1, decode >= 1 and 0 <= tolerance <= 1")


def within_band(
    band: RatioBand, prefill: int, decode: int, max_prefill: int, max_decode: int
) -> tuple[int, int, str]:
    """(prefill, decode) raised into the band (bounded by the maxima) and a note if anything moved."""
    if prefill == 0 or decode == 0:
        return prefill, decode, ""
    r = band.prefill / band.decode
    low, high = r * (1 - band.tolerance), r * (1 + band.tolerance)
    if prefill / decode < low:
        p = min(math.ceil(low * decode - 1e-9), max_prefill)
        return p, decode, f"prefill raised {prefill}->{p} to keep P:D >= {low:.2f}"
    if prefill / decode > high:
        d = min(math.ceil(prefill / high - 1e-9), max_decode)
        return prefill, d, f"decode raised {decode}->{d} to keep P:D <= {high:.2f}"
    return prefill, decode, ""
