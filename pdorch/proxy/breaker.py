"""Per-endpoint circuit breaker as a pure state machine (the caller passes the time in).

closed --(failure_threshold consecutive failures)--> open --(cooldown elapsed)--> half-open
half-open --(success_threshold successes)--> closed;  half-open --(any failure)--> open

A half-open endpoint takes only ``half_open_inflight`` requests at a time (probes), so an engine
that is still sick fails a few requests, not a burst of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class BreakerState(enum.StrEnum):
    """Breaker states; `metric_value` gives the Prometheus encoding."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    @property
    def metric_value(self) -> int:
        """0 closed, 1 open, 2 half-open (same encoding as the SGLang gateway's cb_state)."""
        return {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}[self]


@dataclass(frozen=True)
class BreakerConfig:
    """Thresholds of every endpoint's breaker."""

    failure_threshold: int = 5
    cooldown_s: float = 10.0
    success_threshold: int = 2
    half_open_inflight: int = 1


@dataclass(frozen=True)
class Breaker:
    """State of one endpoint's breaker; never mutated, every transition returns a new value."""

    state: BreakerState = BreakerState.CLOSED
    failures: int = 0  # consecutive failures while closed
    successes: int = 0  # consecutive successes while half-open
    opened_at: float = 0.0


def effective_state(b: Breaker, cfg: BreakerConfig, now: float) -> BreakerState:
    """The state at ``now``: an open breaker whose cooldown elapsed is half-open."""
    if b.state is BreakerState.OPEN and now - b.opened_at >= cfg.cooldown_s:
        return BreakerState.HALF_OPEN
    return b.state


def allows(b: Breaker, cfg: BreakerConfig, now: float, inflight: int = 0) -> bool:
    """Whether one more request may go to the endpoint at ``now``, with ``inflight`` already there."""
    state = effective_state(b, cfg, now)
    if state is BreakerState.HALF_OPEN:
        return inflight < cfg.half_open_inflight
    return state is BreakerState.CLOSED


def record_success(b: Breaker, cfg: BreakerConfig, now: float) -> Breaker:
    """Transition after a successful call or health check."""
    state = effective_state(b, cfg, now)
    if state is BreakerState.CLOSED:
        return Breaker() if b.failures else b
    if state is BreakerState.HALF_OPEN:
        successes = b.successes + 1
        if successes >= cfg.success_threshold:
            return Breaker()
        return replace(b, state=BreakerState.HALF_OPEN, successes=successes)
    return b  # still open: a late success of an old call does not close it


def record_failure(b: Breaker, cfg: BreakerConfig, now: float) -> Breaker:
    """Transition after a failed call or health check."""
    state = effective_state(b, cfg, now)
    if state is BreakerState.HALF_OPEN:
        return Breaker(state=BreakerState.OPEN, opened_at=now)
    if state is BreakerState.OPEN:
        return b  # do not extend the cooldown on failures of calls started before it opened
    failures = b.failures + 1
    if failures >= cfg.failure_threshold:
        return Breaker(state=BreakerState.OPEN, opened_at=now)
    return replace(b, failures=failures)
