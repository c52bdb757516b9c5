"""The rollout step being written, recorded on every KV role's LWS (write-ahead). Pure functions.

One planner step sets the replicas and partition of several LWS objects, and the controller writes
them one by one (concurrently, but not atomically). Each of those writes carries the whole step,
every role's target, in the `pdorch.io/rollout-step` annotation, numbered within the rollout. A
controller that stops between the writes leaves some LWS on step n and the others on an earlier
one; the next controller reads step n back and writes the rest of it, exactly as planned, instead
of planning afresh from a half-written state (which the planner can only hope to mend).
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


def decode(value: str) -> StepRecord | None:
    """The record in an annotation value; None for anything else (a hand-written or foreign value is
    ignored, never trusted: the planner then plans from the live state as before)."""
    try:
        doc = json.loads(value)
        number, revision, to = doc["n"], doc["revision"], doc["to"]
        if not (isinstance(number, int) and isinstance(revision, str) and isinstance(to, dict)):
            return None
        targets = {}
        for name, pair in to.items():
            replicas, partition = pair
            if not (isinstance(replicas, int) and isinstance(partition, int)):
                return None
            if not 0 <= partition <= replicas:
                return None
            targets[str(name)] = (replicas, partition)
    except (ValueError, KeyError, TypeError):
        return None
    return StepRecord.of(number, revision, targets)


def read(lws: dict[str, Any]) -> StepRecord | None:
    """The step record an LWS carries, if any."""
    value = ((lws.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_ROLLOUT_STEP)
    return decode(value) if isinstance(value, str) else None


def latest(records: Sequence[StepRecord | None], revision: str) -> StepRecord | None:
    """The highest-numbered record of the rollout to `revision` (records of earlier rollouts and
    unreadable ones are ignored)."""
    mine = [r for r in records if r is not None and r.revision == revision]
    return max(mine, key=lambda r: r.number, default=None)


def newer(step: StepRecord | None, written: StepRecord | None) -> bool:
    """Whether `step` comes after `written` (the last step a controller wrote in full): a controller
    never goes back to finish a step older than its own, which an LWS can only seem to hold while
    the watch cache lags."""
    if step is None:
        return False
    return written is None or written.revision != step.revision or step.number > written.number


@dataclass(frozen=True)
class LwsView:
    """What `unwritten` needs of one KV role's live LWS."""

    name: str
    replicas: int
    partition: int
    on_revision: bool  # its pod template is the update revision's
    record: StepRecord | None


def unwritten(step: StepRecord | None, roles: Sequence[LwsView]) -> list[str]:
    """The roles whose part of `step` was never written, when `step` is a half-written step that
    can be finished as planned; else [] (no step, or the live state left the step behind).

    Finishable means: the roles are the step's roles, every role that carries the step still has
    its target (no hand edit or scale since), the others carry no step or an earlier one of the
    same rollout, and some of those is not at its target yet.
    """
    if step is None:
        return []
    targets = step.to_dict()
    if sorted(r.name for r in roles) != sorted(targets):
        return []  # a role was added or removed since: plan afresh
    missing = []
    for r in roles:
        at_target = (r.replicas, r.partition) == targets[r.name] and r.on_revision
        if r.record == step:
            if not at_target:
                return []  # changed after the step was written (a hand edit, a scale)
        elif r.record is not None and (r.record.revision != step.revision or r.record.number > step.number):
            return []  # a later rollout's step wrote it (e.g. one rolled back since): plan afresh
        elif not at_target:
            missing.append(r.name)
    return sorted(missing)
