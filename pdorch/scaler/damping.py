"""Stabilization windows, cooldown and bounds applied to raw recommendations (pure).

Semantics follow the HPA's `behavior`: before scaling up, take the lowest recommendation of the
scale-up window; before scaling down, the highest of the scale-down window; then clamp to
[min, max]. On top, `cooldown_s` is the minimum time between two changes of the role, except that
a scale-up right after a scale-down is never held back (a burst must not wait for a cooldown).
With `scale_down_after_miss_s`, an SLO miss in the last `miss_memory_s` swaps in that (longer)
scale-down window: a burst that hurt once keeps its capacity through the lull before the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DampingConfig:
    """A role's damping and bounds (from `scaling` in the ServingGroup)."""

    min_replicas: int = 0
    max_replicas: int = 1000
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    cooldown_s: float = 60.0
    scale_down_after_miss_s: float | None = None
    miss_memory_s: float = 3600.0

    def scale_down_window(self, now_s: float, last_miss_s: float | None) -> float:
        """The scale-down window in force at `now_s`, given the group's last SLO miss."""
        if self.scale_down_after_miss_s is None or last_miss_s is None:
            return self.scale_down_stabilization_s
        if now_s - last_miss_s >= self.miss_memory_s:
            return self.scale_down_stabilization_s
        # A miss only ever lengthens the window: a shorter after-miss value would scale down faster
        # right after the SLO was missed.
        return max(self.scale_down_after_miss_s, self.scale_down_stabilization_s)

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}..{self.max_replicas}"
            )


@dataclass
class DampingState:
    """Recent raw recommendations and the last change, per role."""

    history: list[tuple[float, int]] = field(default_factory=list)
    last_change_s: float | None = None
    last_direction: int = 0  # +1 up, -1 down


@dataclass(frozen=True)
class Damped:
    """The replicas to write and why (`held` names what held a raw recommendation back)."""

    replicas: int
    changed: bool
    held: str = ""


def damp(
    state: DampingState,
    cfg: DampingConfig,
    now_s: float,
    current: int,
    raw: int,
    last_miss_s: float | None = None,
) -> Damped:
    """Record `raw` at `now_s` and decide the replicas; updates `state` in place.

    `last_miss_s` is when the group last missed an SLO target (None: never, or not tracked).
    """
    down_s = cfg.scale_down_window(now_s, last_miss_s)
    keep = max(
        cfg.scale_up_stabilization_s, cfg.scale_down_stabilization_s, cfg.scale_down_after_miss_s or 0.0
    )
    state.history = [(t, r) for t, r in state.history if now_s - t <= keep]
    if not state.history:
        # Like the HPA, the first decision remembers the current replicas as a recommendation, so
        # a (re)started scaler does not drop a warm fleet before the window has seen any load; the
        # same after a gap longer than the windows (a metrics outage held every tick in between).
        state.history.append((now_s - 1e-6, current))
    state.history.append((now_s, raw))
    up_window = [r for t, r in state.history if now_s - t <= cfg.scale_up_stabilization_s]
    down_window = [r for t, r in state.history if now_s - t <= down_s]
    held = ""
    target = current
    if raw > current:
        target = max(min(up_window), current)
        if target < raw:
            held = f"scale-up stabilization {cfg.scale_up_stabilization_s:.0f}s"
    elif raw < current:
        target = min(max(down_window), current)
        if target > raw:
            held = f"scale-down stabilization {down_s:.0f}s" + (
                " after an SLO miss" if down_s != cfg.scale_down_stabilization_s else ""
            )
    bounded = min(max(target, cfg.min_replicas), cfg.max_replicas)
    if bounded != target:
        held = f"bounds [{cfg.min_replicas}, {cfg.max_replicas}]"
    target = bounded
    if target == current:
        return Damped(current, False, held)
    direction = 1 if target > current else -1
    in_cooldown = state.last_change_s is not None and now_s - state.last_change_s < cfg.cooldown_s
    if in_cooldown and not (direction > 0 and state.last_direction < 0):
        return Damped(current, False, f"cooldown {cfg.cooldown_s:.0f}s")
    state.last_change_s = now_s
    state.last_direction = direction
    return Damped(target, True, held)


def rebaseline(state: DampingState, now_s: float, replicas: int) -> None:
    """Start the role's damping afresh from a size another writer set (`kubectl scale`, an HPA).

    The new size is the windows' only recommendation, so a scale-down waits a whole scale-down
    window, and it starts the cooldown in both directions: the burst exemption (a scale-up right
    after a scale-down) is for the scaler's own scale-downs, and would otherwise reverse an
    operator's or another scaler's scale-down at the next tick."""
    state.history = [(now_s - 1e-6, replicas)]
    state.last_change_s = now_s
    state.last_direction = 0
