"""Who set a role's size: the scaler's own writes against everyone else's (pure, no I/O).

The scaler writes `spec.replicas` of a ServingRoleScaler through `/scale`; so can `kubectl scale`,
an HPA or KEDA pointed at the same object. Each tick the scaler compares the object's
`metadata.generation` with the one it last knew of: the generation its own write produced (its
writes are conditional on the resourceVersion it read, so a write is exactly one generation on),
or the one it took as a baseline. Only a change of the spec moves the generation (the status
subresource does not), and every `/scale` write that changes the size does, whoever wrote it and
under whatever field-manager name; a write of the same size changes nothing and moves nothing.
`metadata.managedFields` only names the other writer (`replicas_manager`): manager names are
free-form and a writer may not set one, so they do not decide whether the size is foreign.

A foreign size is the role's new baseline (the caller restarts the role's damping from it). A
writer that replaces sizes this scaler wrote again and again (`CONFLICT_WRITES` times within
`CONFLICT_WINDOW_S`) is a second scaler on the same object: `SizeSeen.warn` says when to say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Foreign writes over this scaler's sizes within this window count together. An HPA that keeps a
# floor above the scaler's size replaces each of its scale-downs within a sync period (15 s); the
# scaler's next attempt waits for its cooldown and scale-down window (300 s by default) and a drain.
CONFLICT_WINDOW_S = 3600.0
# That many such replacements within the window: another scaler, not an operator's one-off change.
CONFLICT_WRITES = 2


@dataclass
class SizeOwnership:
    """What one role's scaler knows of who set its ServingRoleScaler's size (kept between ticks)."""

    uid: str | None = None  # the object's; another uid is another object (a group re-created)
    generation: int | None = None  # after this scaler's last write, or the baseline it took
    replicas: int | None = None  # the size at `generation`
    mine: bool = False  # whether this scaler wrote the size at `generation`
    # When another writer replaced a size this scaler had written (monotonic s, within the window).
    overridden_at: list[float] = field(default_factory=list)
    warned_at: float | None = None  # when the last conflict warning was due
    # The (generation, replicas) a write of this scaler in flight produces, if the server applies it.
    pending: tuple[int, int] | None = None


@dataclass(frozen=True)
class SizeSeen:
    """What one tick's read of the size says (all False/None: nothing new, or a first baseline)."""

    foreign: bool = False  # someone else changed the size since this scaler last knew it
    previous: int | None = None  # the size before, as this scaler knew it
    overrode: bool = False  # the change replaced a size this scaler had written
    overrides: int = 0  # such replacements within CONFLICT_WINDOW_S, this one included
    warn: bool = False  # another writer keeps replacing this scaler's sizes: warn now

    @property
    def conflicting(self) -> bool:
        return self.overrides >= CONFLICT_WRITES


def see_size(
    state: SizeOwnership,
    uid: str | None,
    generation: int | None,
    replicas: int,
    now_s: float,
    window_s: float = CONFLICT_WINDOW_S,
) -> SizeSeen:
    """Compare the object as read this tick with what this scaler last knew; updates `state`.

    The first sight of an object (a started or newly leading scaler, a re-created group) is a
    baseline, not a foreign write. An object without a generation is never taken as foreign."""
    state.overridden_at = [t for t in state.overridden_at if now_s - t < window_s]
    if not state.overridden_at:
        state.warned_at = None
    if uid != state.uid or state.generation is None or generation is None:
        state.uid, state.generation, state.replicas, state.mine = uid, generation, replicas, False
        return SizeSeen()
    pending, state.pending = state.pending, None
    if generation == state.generation:
        return SizeSeen()
    if pending == (generation, replicas):
        # This scaler's write, applied though its answer was lost (a timeout, a restart of the
        # apiserver), or the same size from someone else at that moment: nothing to tell apart.
        state.generation, state.replicas, state.mine = generation, replicas, True
        return SizeSeen()
    previous, overrode = state.replicas, state.mine
    state.generation, state.replicas, state.mine = generation, replicas, False
    if overrode:
        state.overridden_at.append(now_s)
    n = len(state.overridden_at)
    warn = (
        overrode and n >= CONFLICT_WRITES and (state.warned_at is None or now_s - state.warned_at >= window_s)
    )
    if warn:
        state.warned_at = now_s
    return SizeSeen(foreign=True, previous=previous, overrode=overrode, overrides=n, warn=warn)


def intend_size(state: SizeOwnership, read_generation: int | None, replicas: int) -> None:
    """Record, before it is sent, a write of `replicas` over the object read at `read_generation`."""
    state.pending = (read_generation + 1, replicas) if read_generation is not None else None


def wrote_size(state: SizeOwnership, read_generation: int | None, replicas: int) -> None:
    """Record this scaler's write of `replicas` over the object it read at `read_generation` (the
    write was conditional on that read, so the spec is one generation on)."""
    state.generation = read_generation + 1 if read_generation is not None else None
    state.replicas, state.mine, state.pending = replicas, True, None


def replicas_manager(obj: Mapping[str, Any], own: str) -> str | None:
    """The field manager other than `own` that owns `spec.replicas` of `obj` (the last writer that
    changed it, as `metadata.managedFields` records it), or None when none does."""
    owners = [
        m
        for m in (obj.get("metadata") or {}).get("managedFields") or []
        if m.get("manager")
        and m.get("manager") != own
        and "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {})
    ]
    if not owners:
        return None
    # Several only if several applied the same value; the latest one names the last writer best.
    latest = max(owners, key=lambda m: str(m.get("time") or ""))
    return str(latest["manager"])


def foreign_note(seen: SizeSeen, current: int, who: str | None, window_s: float = CONFLICT_WINDOW_S) -> str:
    """The reason recorded for a size another writer set."""
    by = who or "another writer"
    note = (
        f"{seen.previous} -> {current} by {by}, not pdorch's scaler: kept as the new baseline "
        "(no change before the role's cooldownSeconds, no scale-down before its scale-down window)"
    )
    if seen.conflicting:
        note += (
            f"; {seen.overrides} sizes pdorch's scaler wrote were replaced within "
            f"{window_s / 60:.0f}m: another scaler (an HPA or KEDA?) writes this ServingRoleScaler; "
            "remove it, or set the role's scaling.mode to External"
        )
    return note
