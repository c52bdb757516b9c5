"""Circuit breaker state machine."""

from __future__ import annotations

import pytest

from pdorch.proxy.breaker import (
    Breaker,
    BreakerConfig,
    BreakerState,
    allows,
    effective_state,
    record_failure,
    record_success,
)

pytestmark = pytest.mark.unit
CFG = BreakerConfig(failure_threshold=3, cooldown_s=10.0, success_threshold=2)


def fail(b: Breaker, n: int, now: float) -> Breaker:
    for _ in range(n):
        b = record_failure(b, CFG, now)
    return b


def test_opens_after_consecutive_failures_only() -> None:
    b = fail(Breaker(), 2, 0.0)
    assert b.state is BreakerState.CLOSED and allows(b, CFG, 0.0)
    b = record_success(b, CFG, 0.0)  # a success resets the streak
    b = fail(b, 2, 1.0)
    assert b.state is BreakerState.CLOSED
    b = record_failure(b, CFG, 2.0)
    assert b.state is BreakerState.OPEN and not allows(b, CFG, 2.0)


def test_cooldown_then_half_open_then_closed() -> None:
    b = fail(Breaker(), 3, 100.0)
    assert not allows(b, CFG, 109.9)
    assert effective_state(b, CFG, 110.0) is BreakerState.HALF_OPEN and allows(b, CFG, 110.0)
    b = record_success(b, CFG, 110.0)
    assert b.state is BreakerState.HALF_OPEN
    b = record_success(b, CFG, 111.0)
    assert b == Breaker()


def test_failure_in_half_open_reopens_with_new_cooldown() -> None:
    b = fail(Breaker(), 3, 0.0)
    b = record_failure(b, CFG, 10.5)
    assert b.state is BreakerState.OPEN and b.opened_at == 10.5
    assert not allows(b, CFG, 20.0) and allows(b, CFG, 20.5)


def test_open_breaker_ignores_late_outcomes() -> None:
    b = fail(Breaker(), 3, 0.0)
    assert record_failure(b, CFG, 5.0) == b  # cooldown is not extended
    assert record_success(b, CFG, 5.0) == b  # a late success does not close it


def test_half_open_admits_probes_only() -> None:
    b = Breaker(state=BreakerState.OPEN, opened_at=100.0)
    assert allows(b, CFG, 110.0, inflight=0)  # one probe
    assert not allows(b, CFG, 110.0, inflight=1)  # not a burst behind it
    closed = Breaker()
    assert allows(closed, CFG, 110.0, inflight=500)  # a closed breaker does not limit load


def test_metric_encoding() -> None:
    assert [s.metric_value for s in BreakerState] == [0, 1, 2]
