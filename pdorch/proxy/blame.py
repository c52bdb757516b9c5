"""Which engine a silent SGLang pair is charged to.

An SGLang request puts both legs on the wire at once and the prefill waits for its decode to
connect, so when neither answers within the first-byte budget the silence alone does not say which
engine is stuck: a wedged prefill and a wedged decode look the same from the proxy. What does tell
them apart is what else each engine did meanwhile: one that served another request since this one
started is alive, and its partner is the suspect. Charging the decode by default used to open a
healthy decode's breaker (and take the whole proxy down) behind one wedged prefill.
"""

from __future__ import annotations

from typing import Literal

Leg = Literal["prefill", "decode"]


def silent_pair_blame(
    prefill_answered: bool, prefill_served_since: bool, decode_served_since: bool
) -> tuple[Leg, ...]:
    """The legs to mark failed after an SGLang pair stayed silent past its first-byte budget.

    `prefill_answered`: this request's prefill leg completed (its KV is sent), so the decode is the
    one that went quiet. Otherwise each engine's `*_served_since` (it completed another request's
    leg after this request started) clears it; when both or neither did, both are suspects.
    """
    if prefill_answered:
        return ("decode",)
    if decode_served_since and not prefill_served_since:
        return ("prefill",)
    if prefill_served_since and not decode_served_since:
        return ("decode",)
    return ("prefill", "decode")
