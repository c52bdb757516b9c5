"""The rollout step being written, recorded on every KV role's LWS (write-ahead). Pure functions.

One planner step sets the replicas and partition of several LWS objects, and the controller writes
them one by one (concurrently, but not atomically). Each of those writes carries the whole step,
every role's target, in the `pdorch.io/rollout-step` annotation, numbered on from the last record
any LWS carries (so across a rollout replaced mid-way, too). A controller that stops between the
writes leaves some LWS on step n and the others on an earlier one; the next controller reads step n
back and writes the rest of it, as planned, instead of planning afresh from a half-written state
(which the planner can only hope to mend). `pdorch.rollout.live` decides when that applies.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pdorch.roles.labels import ANNOTATION_ROLLOUT_STEP


@dataclass(frozen=True)
class StepRecord:
    """Step `number` of the rollout to `revision`: every KV role's (replicas, partition)."""

    number: int
    revision: str
    targets: tuple[tuple[str, int, int], ...]  # (role, replicas, partition), sorted by role

    @staticmethod
    def of(number: int, revision: str, targets: dict[str, tuple[int, int]]) -> StepRecord:
        """A record of `targets` (role -> (replicas, partition))."""
        return StepRecord(number, revision, tuple(sorted((n, r, p) for n, (r, p) in targets.items())))

    def to_dict(self) -> dict[str, tuple[int, int]]:
        """role -> (replicas, partition)."""
        return {n: (r, p) for n, r, p in self.targets}

    def encode(self) -> str:
        """The annotation value: compact JSON with sorted keys, so one step renders one string."""
        doc = {"n": self.number, "revision": self.revision, "to": {n: [r, p] for n, r, p in self.targets}}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))


# A record names every KV role with two numbers: far below this even for hundreds of roles. A longer
# value was not written by pdorch and is not parsed (deeply nested JSON would exhaust the stack).
_MAX_CHARS = 32_768


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode(value: str) -> StepRecord | None:
    """The record in an annotation value; None for anything else (a hand-written or foreign value is
    ignored, never trusted: the planner then plans from the live state as before)."""
    if len(value) > _MAX_CHARS:
        return None
    try:
        doc = json.loads(value)
        number, revision, to = doc["n"], doc["revision"], doc["to"]
        if not (_count(number) and isinstance(revision, str) and isinstance(to, dict)):
            return None
        targets = {}
        for name, pair in to.items():
            replicas, partition = pair
            if not (_count(replicas) and _count(partition) and partition <= replicas):
                return None
            targets[str(name)] = (replicas, partition)
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return StepRecord.of(number, revision, targets)


def read(lws: dict[str, Any]) -> StepRecord | None:
    """The step record an LWS carries, if any."""
    value = ((lws.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_ROLLOUT_STEP)
    return decode(value) if isinstance(value, str) else None


def latest(records: Sequence[StepRecord | None]) -> StepRecord | None:
    """The highest-numbered record. Steps are numbered on from the last one of any rollout that an
    LWS still carries (a rollout replaced mid-way leaves its records), so the highest is the last
    step written, whichever rollout it belongs to."""
    return max((r for r in records if r is not None), key=lambda r: r.number, default=None)


def newer(step: StepRecord | None, written: StepRecord | None) -> bool:
    """Whether `step` comes after `written` (the last step a controller wrote in full): a controller
    never goes back to finish a step at or below its own, which an LWS can only seem to hold while
    the watch cache lags."""
    return step is not None and (written is None or step.number > written.number)


def next_number(records: Sequence[StepRecord | None], written: StepRecord | None) -> int:
    """The number of the next step: one above every record still carried and the last written."""
    highest = latest([*records, written])
    return highest.number + 1 if highest is not None else 1


@dataclass(frozen=True)
class LwsView:
    """What `unwritten` needs of one KV role's live LWS."""

    name: str
    replicas: int
    partition: int
    on_revision: bool  # its pod template is the update revision's
    record: StepRecord | None


def unwritten(step: StepRecord | None, roles: Sequence[LwsView], revision: str) -> list[str]:
    """The roles whose part of `step` was never written, when `step` is a half-written step of the
    rollout to `revision` that can be finished as planned; else [] (no such step, or the live state
    left it behind).

    Finishable means: the roles are the step's roles; every role that carries the step still has
    its target (no hand edit or scale since); every other role carries the step before it (or, for
    a rollout's first step, none), so none was recreated or written by anything else since. Those
    others are missing even when already at their target: the step is finished only once every
    role carries it, or a second cut (while finishing it) would leave a role two records behind,
    and the step after could then not be finished.
    """
    if step is None or step.revision != revision:
        return []  # the last step written was another rollout's (one replaced or rolled back since)
    targets = step.to_dict()
    if sorted(r.name for r in roles) != sorted(targets):
        return []  # a role was added or removed since: plan afresh
    missing = []
    for r in roles:
        at_target = (r.replicas, r.partition) == targets[r.name] and r.on_revision
        if r.record == step:
            if not at_target:
                return []  # changed after the step was written (a hand edit, a scale)
            continue
        before = r.record.number == step.number - 1 if r.record is not None else step.number == 1
        if not before:
            return []
        missing.append(r.name)
    return sorted(missing)
