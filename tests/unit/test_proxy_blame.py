"""Who a silent SGLang pair is charged to (pdorch.proxy.blame)."""

from __future__ import annotations

import pytest

from pdorch.proxy.blame import silent_pair_blame

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("answered", "prefill_alive", "decode_alive", "blamed"),
    [
        (True, False, False, ("decode",)),  # the KV was sent: the decode went quiet
        (True, False, True, ("decode",)),
        (False, False, True, ("prefill",)),  # the decode served another prefill meanwhile
        (False, True, False, ("decode",)),  # the prefill served another decode meanwhile
        (False, True, True, ("prefill", "decode")),  # both alive elsewhere: this pairing is stuck
        (False, False, False, ("prefill", "decode")),  # no evidence either way
    ],
)
def test_the_engine_without_a_sign_of_life_is_charged(
    answered: bool, prefill_alive: bool, decode_alive: bool, blamed: tuple[str, ...]
) -> None:
    assert silent_pair_blame(answered, prefill_alive, decode_alive) == blamed
