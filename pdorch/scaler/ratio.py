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
    """(prefill, decode) raised into the band by the fewest replicas in all (bounded by the
    maxima), and a note if anything moved.

    Raising the short side alone can overshoot the other edge of a narrow band (1:2 exactly, from
    1P:3D, takes 2P:4D), so both sides may move. When the maxima leave no pair inside the band, the
    short side is raised as far as they allow and the note says the band is not kept.
    """
    if prefill == 0 or decode == 0:
        return prefill, decode, ""
    r = band.prefill / band.decode
    low, high = r * (1 - band.tolerance), r * (1 + band.tolerance)
    if low - 1e-9 <= prefill / decode <= high + 1e-9:
        return prefill, decode, ""
    # The smallest decode that has an in-band prefill also has the smallest such prefill (the
    # lowest in-band prefill grows with decode), so the first hit adds the fewest replicas.
    for d in range(decode, max(decode, max_decode) + 1):
        p = max(prefill, math.ceil(low * d - 1e-9))
        if p > max_prefill:
            break
        if p <= high * d + 1e-9:
            return p, d, f"{_raised(prefill, p, decode, d)} to keep P:D in [{low:.2f}, {high:.2f}]"
    if prefill / decode < low:
        p = max(prefill, min(math.ceil(low * decode - 1e-9), max_prefill))
        return (
            p,
            decode,
            f"{_raised(prefill, p, decode, decode) or 'nothing raised'}; P:D stays below {low:.2f}: maxReplicas bounds it",
        )
    d = max(decode, min(math.ceil(prefill / high - 1e-9), max_decode))
    return (
        prefill,
        d,
        f"{_raised(prefill, prefill, decode, d) or 'nothing raised'}; P:D stays above {high:.2f}: maxReplicas bounds it",
    )


def _raised(p0: int, p1: int, d0: int, d1: int) -> str:
    """What moved, e.g. "prefill raised 1->2 and decode raised 3->4" ("" when nothing did)."""
    return " and ".join(
        f"{name} raised {a}->{b}" for name, a, b in (("prefill", p0, p1), ("decode", d0, d1)) if b != a
    )
