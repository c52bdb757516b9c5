"""Plain data of the rollout planner: what is observed, what is asked, what is decided.

Everything here is I/O free so the planner can be driven by the controller, by `pdorch plan` and by
property tests alike.

Definitions used throughout (see DESIGN.md "Rollout (ratio-preserving)"):

* A *cohort* is the set of groups of one revision (old = not yet updated, new = updated). Its P:D is
  (sum of prefill groups, sum of decode groups) of that revision that *exist*, ready or not: the
  controller decides existence atomically (partition/replicas), readiness it can only wait for.
* Ratio check: declared ratio rho = p/d. A cohort (P, D) is on ratio when it is empty (P == D == 0),
  or when P > 0, D > 0 and |P/D - rho| / rho <= tolerance (relative deviation), evaluated exactly
  as |P*d - D*p| <= tolerance * D * p with rationals. P > 0 with D == 0 (or the reverse) is never on
  ratio.
* If the desired replicas themselves are off the declared ratio, the effective tolerance is widened
  to their own deviation: the rollout cannot be stricter than the state it starts and ends in.
* maxSurge/maxUnavailable percentages resolve per role against its desired replicas; surge rounds
  up, unavailable rounds down (as Kubernetes does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

KV_TYPES = frozenset({"prefill", "decode", "worker"})


@dataclass(frozen=True)
class RoleObservation:
    """Observed state of one role's LWS.

    `partition` groups (indices below it) run the old revision, `desired + surge` groups exist, the
    rest run the new revision. `surge` is the number of groups currently requested above desired.
    """

    name: str
    type: str
    desired: int
    old_ready: int
    new_ready: int
    old_total: int
    new_total: int
    partition: int
    surge: int = 0
    # The old groups by revision, from index 0 up: ((revision, count), ...). More than one revision
    # when a new spec arrived mid-rollout (older runs sit below newer ones). Empty: one old revision.
    old_revisions: tuple[tuple[str, int], ...] = ()
    # The top old groups (just below the partition) that never became ready and run neither the
    # base old revision nor the update one: a rollout abandoned by a rollback or a newer spec left
    # them (its surge groups, at the top). Waiting for them would wait forever.
    abandoned: int = 0

    @property
    def replicas(self) -> int:
        """LWS replicas currently requested."""
        return self.desired + self.surge

    @property
    def all_ready(self) -> bool:
        """Every existing group is ready (a step may start)."""
        return self.old_ready == self.old_total and self.new_ready == self.new_total

    @property
    def ready(self) -> int:
        """Ready groups of both revisions."""
        return self.old_ready + self.new_ready


@dataclass(frozen=True)
class RolloutSpec:
    """The knobs of a rollout (from spec.ratio and spec.rolloutStrategy)."""

    ratio_p: int
    ratio_d: int
    # None: the smallest tolerance the budgets allow (`planner.auto_tolerance`), resolved before planning.
    tolerance: float | None
    max_surge: int | str = 0
    max_unavailable: int | str = 1
    paused: bool = False


def resolve_int_or_percent(value: int | str, total: int, *, round_up: bool) -> int:
    """Resolve an int-or-percent against `total` (surge rounds up, unavailable down)."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if not text.endswith("%"):
        return int(text)
    scaled = Fraction(int(text[:-1]) * total, 100)
    return math.ceil(scaled) if round_up else math.floor(scaled)


def deviation(p_groups: int, d_groups: int, ratio_p: int, ratio_d: int) -> Fraction | None:
    """Relative deviation |P/D - rho| / rho of a cohort; 0 when empty, None when one side is 0."""
    if p_groups == 0 and d_groups == 0:
        return Fraction(0)
    if p_groups == 0 or d_groups == 0:
        return None
    return Fraction(abs(p_groups * ratio_d - d_groups * ratio_p), d_groups * ratio_p)


def on_ratio(p_groups: int, d_groups: int, ratio_p: int, ratio_d: int, tolerance: Fraction) -> bool:
    """Whether a cohort (P, D) holds the ratio within `tolerance` (empty cohorts do)."""
    dev = deviation(p_groups, d_groups, ratio_p, ratio_d)
    return dev is not None and dev <= tolerance


@dataclass(frozen=True)
class RoleAction:
    """What the controller should set on one role's LWS."""

    replicas: int
    partition: int


@dataclass(frozen=True)
class Decision:
    """Result of one planner call.

    `kind`: "step" (apply `roles`), "wait" (groups not ready yet; hold), "paused", "done",
    or "blocked" (`reason` starts with "cannot progress:").
    """

    kind: str
    roles: dict[str, RoleAction]
    reason: str


@dataclass(frozen=True)
class RoleSnapshot:
    """One role at one instant of a simulated rollout."""

    name: str
    type: str
    desired: int
    replicas: int
    partition: int
    old_total: int
    new_total: int
    old_ready: int
    new_ready: int


@dataclass(frozen=True)
class Snapshot:
    """The whole group at one instant of a simulated rollout (after `decision`, if any)."""

    time: int
    step: int
    decision: Decision
    roles: tuple[RoleSnapshot, ...]
    old_cohort: tuple[int, int] = field(default=(0, 0))
    new_cohort: tuple[int, int] = field(default=(0, 0))
