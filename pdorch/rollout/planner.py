"""The ratio-preserving rollout planner: observed state + spec -> next partitions/replicas.

Model of one role (one LWS): `replicas` T groups exist, indices below `partition` K are old, the
others new. Lowering K by m recreates m old groups on the new template (not ready until they start);
raising T adds new groups (surge); lowering T deletes the highest indices (new groups, since the
planner never lets T drop below K). The planner only acts when every group is ready ("each step
waits for readiness"), so the ready capacity right after a step is min(T, T') - m, and it only grows
until the next step. Per role the step must keep

* T' <= desired + maxSurge            (surge bound),
* min(T, T') - m >= desired - maxUnavailable   (capacity floor),

and across roles both cohorts (old groups, new groups) must stay on the P:D ratio (see
`pdorch.rollout.state`). Among the steps that do, the planner takes the one that moves the most old
groups, then the one with the old cohort closest to the ratio, then the one with the most new
groups (surge headroom for the next step). Worker roles carry no ratio and move independently.
A state where no step makes progress yields a "cannot progress: ..." decision instead of a loop.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import NamedTuple

from pdorch.rollout.state import (
    Decision,
    RoleAction,
    RoleObservation,
    RoleSnapshot,
    RolloutSpec,
    Snapshot,
    deviation,
    on_ratio,
    resolve_int_or_percent,
)

# Above this many (prefill + decode) old-count combinations the full search would be slow; one
# prefill and one decode role are searched by ratio band instead, so this bounds the full search of
# groups with several roles per type.
_MAX_COMBINATIONS = 200_000
# Up to this many, the best step (rank 0, what the lookahead follows) is searched in the full
# product too; past it, by totals, which is exact for it and much faster.
_SMALL_PRODUCT = 5_000
# Past it, several roles per type are searched by (P, D) totals: this bounds both the per-type
# merge of the roles' options and the pairs of totals.
_MAX_TOTAL_PAIRS = 200_000
TOO_LARGE = "cannot plan this rollout: too many step combinations"
# The tolerance search: candidate cohorts up to this many groups per type, and this many candidates
# tried in order before bisecting the rest.
_MAX_CANDIDATE_SIDE = 1000
_ORDERED_TRIES = 32


# How long no old prefill or decode group may be ready before all of them are recreated at once.
# One observation is not enough: readiness probes timing out under load can fail every group for a
# moment, and recreating them then would discard warm engines beyond maxUnavailable.
OLD_DOWN_GRACE_S = 60.0

# Per order, the steps below the best tried (each with a dry run) before a state the planned steps
# did not lead to is refused, when that order's best step would stall.
_RANKED_TRIES = 8
# Candidate steps the exhaustive search of a refused rollout looks at, at most (one prefill and one
# decode role): well past what roles of tens of groups need, and at most a few seconds of a blocked
# reconcile (cached per state; 2.5 s for 400-group roles), where an unbounded search took minutes.
_MAX_SEARCH_WORK = 300_000
# Every step moves a group, adds one within the surge bound or removes one above it, so plans are
# short (the searched steps of `_searched_step` too: a shortest plan); this only guards
# the dry run in `next_step` against a planner bug turning into a hang.
_MAX_LOOKAHEAD = 100_000


@dataclass(frozen=True)
class _Option:
    """One candidate new old-count for a role, with the new-count range it allows."""

    old: int
    new_lo: int
    new_hi: int


def budgets(role: RoleObservation, spec: RolloutSpec) -> tuple[int, int]:
    """(surge, unavailable) of a role, resolved against its desired replicas.

    Both are capped at the desired replicas: a surge of one whole new copy already lets every step
    happen, and the search below grows with the budgets (an unbounded maxSurge of 2000 on a
    4-group role took 24 s per decision, longer than the controller's lease renewal deadline).
    """
    surge = resolve_int_or_percent(spec.max_surge, role.desired, round_up=True)
    unavailable = resolve_int_or_percent(spec.max_unavailable, role.desired, round_up=False)
    return min(surge, role.desired), min(unavailable, role.desired)


def effective_tolerance(roles: Sequence[RoleObservation], spec: RolloutSpec) -> Fraction | None:
    """Tolerance the planner enforces; None when the ratio cannot apply (no P or no D desired)."""
    p_total = sum(r.desired for r in roles if r.type == "prefill")
    d_total = sum(r.desired for r in roles if r.type == "decode")
    dev = deviation(p_total, d_total, spec.ratio_p, spec.ratio_d)
    if dev is None or (p_total == 0 and d_total == 0):
        return None
    # The declared replicas may be off ratio themselves; the rollout starts and ends there.
    # limit_denominator: a tolerance that went through a float (1/3 -> 0.333...) must compare equal
    # to the exact cohort deviation it came from, not a hair below it.
    return max(Fraction(spec.tolerance).limit_denominator(1_000_000), dev)


def _options(role: RoleObservation, spec: RolloutSpec, climb: bool = True) -> list[_Option]:
    """Every (old', new' range) a single step may take this role to.

    `climb`: a role below its capacity floor with new groups (scaled up mid-rollout) reaches the
    floor in this step; without it, it may also get there over several steps, as a role does
    at the rollout's start.
    """
    surge, unavailable = budgets(role, spec)
    t_now, k_now, desired = role.replicas, role.partition, role.desired
    floor = desired - unavailable
    # Below the floor no group is recreated (the break below), so only the size to reach is relaxed.
    reach = floor if climb else min(floor, t_now)
    opts: list[_Option] = []
    for old in range(k_now, -1, -1):
        m = k_now - old
        if t_now - m < floor and m > 0:
            break  # recreating more old groups would dip below the floor
        if t_now > k_now:
            # New groups exist above K: T' >= K keeps them (a lower T' would delete them), and
            # T' >= floor + m keeps capacity.
            t_lo = max(k_now, reach + m, old)
        else:
            # No new group yet (the rollout's start): a T' below K deletes old groups only, which
            # is how a spec that scales down in the same apply gets there (requiring T' >= K
            # refused every such change). Capacity is the `old` groups kept, checked above; T'
            # stays at the desired count at least, so only a scale-down shrinks.
            t_lo = max(old, min(k_now, desired))
        # Above desired + surge (a scale-down arrived mid-rollout) the total may only shrink:
        # lowering partition and replicas together by m removes m old groups from the count while
        # the new cohort keeps its size; lowering replicas alone removes new groups.
        t_hi = max(desired + surge, t_now - m)
        if t_lo > t_hi:
            continue
        opts.append(_Option(old, t_lo - old, t_hi - old))
    return opts


def step_fits(role: RoleObservation, spec: RolloutSpec, action: RoleAction) -> bool:
    """Whether one step may take `role` (every group ready) to `action` within its surge and
    unavailability budgets at its current desired replicas (the moves `next_step` chooses among)."""
    new = action.replicas - action.partition
    options = _options(role, spec, climb=False)  # a superset of the climbing ones
    return any(o.old == action.partition and o.new_lo <= new <= o.new_hi for o in options)


def _split(total: int, opts: Sequence[_Option]) -> list[int]:
    """Distribute `total` new groups over roles within their ranges (lowest first)."""
    counts = [o.new_lo for o in opts]
    extra = total - sum(counts)
    for i, o in enumerate(opts):
        add = min(extra, o.new_hi - o.new_lo)
        counts[i] += add
        extra -= add
    return counts


def _best_new(
    p_range: tuple[int, int], d_range: tuple[int, int], spec: RolloutSpec, tol: Fraction | None
) -> tuple[int, int] | None:
    """The on-ratio (P, D) new cohort with the most groups, if any.

    The largest on-ratio P for a given D never shrinks as D grows, so P + D grows strictly with D:
    the answer is the largest D that has an on-ratio P. The scan starts at the largest D whose
    ratio band still reaches into `p_range` and stops at the first hit.
    """
    d_lo, d_hi = d_range
    if tol is not None and tol < 1 and d_hi > 0:
        # D * p/d * (1 - tol) <= P <= p_range[1] bounds D from above.
        d_hi = min(d_hi, math.floor(Fraction(p_range[1] * spec.ratio_d, spec.ratio_p) / (1 - tol)))
    if tol is not None and p_range[0] > 0:
        # ... and p_range[0] <= P <= D * p/d * (1 + tol) from below: a scan past it finds nothing
        # (it was most of a 54 s plan, on ranges with no on-ratio pair at all).
        d_lo = max(d_lo, math.ceil(Fraction(p_range[0] * spec.ratio_d, spec.ratio_p) / (1 + tol)))
    for n_d in range(d_hi, d_lo - 1, -1):
        n_p = _largest_on_ratio_p(n_d, p_range, spec, tol)
        if n_p is not None:
            return n_p, n_d
    return None


def _largest_on_ratio_p(
    n_d: int, p_range: tuple[int, int], spec: RolloutSpec, tol: Fraction | None
) -> int | None:
    """The most prefill groups in `p_range` on ratio with `n_d` decode groups, if any.

    Closed form of the ratio check: with n_d > 0, P is on ratio iff P > 0 and
    |P*d - n_d*p| <= tol*n_d*p, i.e. n_d*p*(1 - tol)/d <= P <= n_d*p*(1 + tol)/d.
    """
    band = _on_ratio_band(n_d, p_range, spec, tol)
    return band[-1] if band else None


def _on_ratio_band(n_d: int, p_range: tuple[int, int], spec: RolloutSpec, tol: Fraction | None) -> range:
    """The prefill counts in `p_range` on ratio with `n_d` decode groups (closed form of the ratio
    check, see `_largest_on_ratio_p`)."""
    lo, hi = p_range
    if tol is None:
        return range(lo, hi + 1)
    if n_d == 0:
        return range(0, 1 if lo == 0 else 0)  # only the empty cohort is on ratio without decode
    scale = Fraction(n_d * spec.ratio_p, spec.ratio_d)
    return range(max(lo, 1, math.ceil(scale * (1 - tol))), min(hi, math.floor(scale * (1 + tol))) + 1)


def next_step(
    observed: Sequence[RoleObservation], spec: RolloutSpec, old_down_for: float = math.inf
) -> Decision:
    """Decide the next partitions and replicas of every KV role (proxy roles are ignored).

    A step is only returned when the rest of the plan (same rules, every group ready) reaches the
    end too: a rollout that would stall half-way is refused before it touches anything.
    `old_down_for`: for how many seconds the caller has seen no old prefill or decode group ready
    (see `old_revision_serving_nothing`); they are recreated at once only after OLD_DOWN_GRACE_S.
    """
    roles = [r for r in observed if r.type in ("prefill", "decode", "worker")]
    hold = {r.name: RoleAction(r.replicas, r.partition) for r in roles}
    if spec.paused:
        return Decision("paused", hold, "rollout paused")
    # Old groups that serve nothing are recreated on the current template at once: that costs no
    # capacity and no pairing, and waiting for them (the rule below) would wait forever.
    stuck = [(r, r.abandoned) for r in roles if r.abandoned]
    if stuck:
        return _recreate(
            hold, stuck, "recreate never-ready groups of an abandoned revision ({}) on the current template"
        )
    down = [(r, r.partition) for r in old_revision_serving_nothing(roles)]
    if down and old_down_for < OLD_DOWN_GRACE_S:
        return Decision(
            "wait",
            hold,
            # No elapsed time in it: the reason is the Progressing message, rewritten whenever it changes.
            f"no old group of {', '.join(r.name for r, _ in down)} is ready: unless one is within "
            f"{OLD_DOWN_GRACE_S:.0f}s of the first pass that saw none, they are recreated on the current template",
        )
    if down:
        return _recreate(
            hold,
            down,
            "recreate the old groups ({}) on the current template at once: "
            "none of them is ready, so the old revision serves nothing",
        )
    if not all(r.all_ready for r in roles):
        waiting = ", ".join(r.name for r in roles if not r.all_ready)
        return Decision("wait", hold, f"waiting for readiness of {waiting}")
    # Two orders of the candidate steps, which differ only where the old cohort is off the ratio:
    # back onto it first (the usual case: a step whose writes were interrupted gets completed), or
    # the most groups moved first. Each is followed to the end; the first that finishes is taken.
    # Whichever is taken, the state it leads to is on that order's finishing path, so the next
    # decision finds a finishing order again: a plan that started never stalls half-way. From an
    # on-ratio old cohort every step keeps it on ratio, so the two orders are one plan.
    # Once a rollout has started, a state the planned steps did not lead to (an interrupted step, a
    # hand edit, a scale or spec change) may also need a step ranked below the best (with several
    # roles per type, steps tie on every count, the interrupted one among them): when an order's
    # best step would stall, its next few are tried before refusing. A rollout's first step gets no
    # such search: it is refused or taken as planned (and the tolerance search stays as fast).
    state = tuple(roles)
    kv = [r for r in roles if r.type in ("prefill", "decode")]
    # A new spec mid-rollout leaves every group old, on several revisions: that rollout started.
    layered = _several_old_revisions(kv)
    started = layered or any(r.new_total for r in kv)
    refused: Decision | None = None
    orders = [_STEADY_FIRST] + ([_Order(False)] if _old_cohort_off_ratio(roles, spec) else [])
    if layered:
        # Several old revisions: when keeping each of them no further off the ratio stalls, plan
        # the old side as one cohort (a revision may drift off, even one-sided, for a step) rather
        # than refuse a rollout that has a way through.
        orders.append(_Order(True, keep_revisions=False))
        # Steps that keep no revision paired are an outage until the new groups start: only when
        # no order finishes with steps that keep one (helper-86, helper-88).
        orders += [o._replace(keep_pair=False) for o in orders]
    if any(_below_floor(r, spec) for r in roles):
        # A role scaled up (mid-rollout, or in the apply that started it) need not reach its floor
        # in one step once it has new groups, when that stalls.
        orders += [o._replace(climb=False) for o in orders]
    for order in orders:
        decision, stalls = _attempt(state, spec, order, 0)
        if decision.kind in ("done", "step"):
            return decision
        refused = refused or decision
        for rank in range(1, _RANKED_TRIES + 1) if started and stalls else ():
            lower, _ = _attempt(state, spec, order, rank)
            if lower.kind == "step":
                return lower
            if lower.reason == _NO_RANK:
                break  # no more steps below in that order (a step that does nothing is skipped)
    assert refused is not None
    if started:
        # Last: every order's greedy plan stalls. With one prefill and one decode role the
        # shortest plan under the same rules is searched for; a refusal then means none exists.
        searched = _searched_step(state, spec)
        if searched is not None:
            return searched
    return refused


_NO_RANK = "no step of that rank"

# (prefill old, prefill new, decode old, decode new) groups: a state of the exhaustive search.
_Counts = tuple[int, int, int, int]


@functools.lru_cache(maxsize=64)
def _searched_step(roles: tuple[RoleObservation, ...], spec: RolloutSpec) -> Decision | None:
    """The first step of the shortest plan from `roles` (every group ready) to no old prefill or
    decode group, under the rules of `_plan_step` (per-role budgets, the new cohort on the ratio,
    the old one on it or no further off; any such new cohort, not only the largest), through
    states that keep a new group (see `_search_moves`), or None: none exists, the search passed
    _MAX_SEARCH_WORK, or the roles are not one prefill and one decode (worker roles with old
    groups included). Along the plan the shortest remaining plan only gets shorter, so taking
    its first step at each reconcile finishes."""
    kv = [r for r in roles if r.type in ("prefill", "decode")]
    if len(kv) != 2 or kv[0].type == kv[1].type or any(r.partition for r in roles if r not in kv):
        return None
    p, d = kv if kv[0].type == "prefill" else kv[::-1]
    tol = effective_tolerance(roles, spec)
    start: _Counts = (p.partition, p.new_total, d.partition, d.new_total)
    first: dict[_Counts, _Counts | None] = {start: None}  # state -> the first step towards it
    queue = deque([start])
    work = 0
    while queue:
        state = queue.popleft()
        if state[0] == 0 and state[2] == 0:
            step = first[state]
            assert step is not None  # the start has old groups, or the planner had finished
            hold = {r.name: RoleAction(r.replicas, r.partition) for r in roles}
            actions = {**hold, p.name: RoleAction(step[0] + step[1], step[0])}
            actions[d.name] = RoleAction(step[2] + step[3], step[2])
            # A shortest plan's step only removing new groups within the bound says so too.
            what = _describe_step(kv, actions, spec) or "remove new groups"
            return Decision("step", actions, f"{what} (a searched plan)")
        moves, cost = _search_moves(p, d, state, spec, tol, _MAX_SEARCH_WORK - work)
        work += cost
        if work > _MAX_SEARCH_WORK:
            return None
        for nxt in moves:
            if nxt not in first:
                first[nxt] = first[state] or nxt
                queue.append(nxt)
    return None


def _search_moves(
    p: RoleObservation,
    d: RoleObservation,
    state: _Counts,
    spec: RolloutSpec,
    tol: Fraction | None,
    budget: int,
) -> tuple[list[_Counts], int]:
    """Every state one step of `_plan_step`'s rules takes `state` to (roles below their floor may
    climb to it over several steps, as with `_Order.climb` False), for each old choice the most
    new groups first (as `_plan_step` prefers them), and the work it took; cut short once the work
    passes `budget`.

    A state with old groups and no new one is left out: `next_step` plans it as a rollout's start,
    without this search, so a plan through it could be refused half-way (helper-90)."""
    old_p, new_p, old_d, new_d = state
    now = deviation(old_p, old_d, spec.ratio_p, spec.ratio_d)
    out: list[_Counts] = []
    p_options = _options(applied(p, RoleAction(old_p + new_p, old_p)), spec, climb=False)
    d_options = _options(applied(d, RoleAction(old_d + new_d, old_d)), spec, climb=False)
    work = len(p_options) + len(d_options)
    for a, b in itertools.product(p_options, d_options):
        work += 1
        if work > budget:
            break
        if tol is not None and not on_ratio(a.old, b.old, spec.ratio_p, spec.ratio_d, tol):
            dev = deviation(a.old, b.old, spec.ratio_p, spec.ratio_d)
            if dev is None or (now is not None and dev > now):
                continue
        for y in range(b.new_hi, b.new_lo - 1, -1):
            band = _on_ratio_band(y, (a.new_lo, a.new_hi), spec, tol)
            work += 1 + len(band)
            out += [(a.old, x, b.old, y) for x in reversed(band) if x or y or not (a.old or b.old)]
    return out, work


def _recreate(
    hold: dict[str, RoleAction], moves: Sequence[tuple[RoleObservation, int]], why: str
) -> Decision:
    """A step that recreates the top `n` old groups of each (role, n) in `moves` on the current
    template (its partition lowered by n); `why` gets the list of what moves at its `{}`."""
    actions = dict(hold)
    for r, n in moves:
        actions[r.name] = RoleAction(r.replicas, r.partition - n)
    return Decision("step", actions, why.format(", ".join(f"{n} of {r.name}" for r, n in moves)))


def old_revision_serving_nothing(roles: Sequence[RoleObservation]) -> list[RoleObservation]:
    """The prefill and decode roles with old groups, when not one old group of either type is
    ready. The old revision then serves nothing, so recreating all its groups on the new template
    at once costs no capacity (as a Deployment replaces unavailable old pods first), and it leaves
    both cohorts on the ratio: the old one empty, the new one whole. Waiting for them waits for
    ever when their pods cannot start (a template the new spec fixed, pods an admission policy
    refused). While any old group is ready (one role's engine restarting, say) they are waited
    for: recreating one role's groups alone would leave two one-sided cohorts, none pairing.
    `next_step` acts on it only once it has held for OLD_DOWN_GRACE_S."""
    kv = [r for r in roles if r.type in ("prefill", "decode") and r.partition > 0]
    if not kv or any(r.old_ready > 0 for r in kv):
        return []
    return kv


class _Order(NamedTuple):
    """How `_plan_step` ranks candidate steps. `steady_first`: steps that bring an off-ratio old
    cohort back onto the ratio above those that move the most. `keep_revisions`: with several old
    revisions, steps that leave each of them no further off the ratio above all others.
    `keep_pair`: with several old revisions and no new pair, only steps that keep some revision
    with a ready prefill and decode (the orders without it are tried after those with it).
    `climb`: a role below its capacity floor that has new groups (scaled up mid-rollout, or in
    the apply that started it, after the first step) reaches the floor in one step; the orders
    without it are tried after those with it (see `_options`)."""

    steady_first: bool
    keep_revisions: bool = True
    keep_pair: bool = True
    climb: bool = True


def _below_floor(role: RoleObservation, spec: RolloutSpec) -> bool:
    """Whether `role` has fewer groups than its capacity floor (scaled up)."""
    return role.replicas < role.desired - budgets(role, spec)[1]


_STEADY_FIRST = _Order(True)


@functools.lru_cache(maxsize=256)
def _attempt(
    state: tuple[RoleObservation, ...], spec: RolloutSpec, order: _Order, rank: int
) -> tuple[Decision, bool]:
    """The step of that order and rank if its plan finishes, else why not, and whether that is a
    step whose plan stalls. Cached apart from `_plan_step`: the dry runs of a refused state can
    fill that cache, and a blocked group is reconciled again every half minute."""
    decision = _plan_step(state, spec, order, rank)
    if decision.kind != "step":
        return decision, False
    stall = _stall_ahead(state, decision, spec, order)
    if stall is None:
        return decision, False
    return Decision("blocked", {r.name: RoleAction(r.replicas, r.partition) for r in state}, stall), True


def clear_caches() -> None:
    """Forget every cached planning result (tests that swap a search strategy)."""
    _plan_step.cache_clear()
    _attempt.cache_clear()
    _searched_step.cache_clear()
    _auto_tolerance.cache_clear()


def _old_cohort_off_ratio(roles: Sequence[RoleObservation], spec: RolloutSpec) -> bool:
    tol = effective_tolerance(roles, spec)
    old_p = sum(r.partition for r in roles if r.type == "prefill")
    old_d = sum(r.partition for r in roles if r.type == "decode")
    return tol is not None and not on_ratio(old_p, old_d, spec.ratio_p, spec.ratio_d, tol)


def _stall_ahead(
    state: tuple[RoleObservation, ...], decision: Decision, spec: RolloutSpec, order: _Order
) -> str | None:
    """Why the plan after `decision` would stall (None when it reaches the end). Decisions depend
    only on the all-ready state, so this dry run is exactly the future plan of that order.
    `_plan_step` is cached, so the next reconcile (which observes the first of these states) replays
    the rest of the dry run from the cache instead of searching again."""
    steps = 0
    ahead = decision
    while ahead.kind == "step" and steps <= _MAX_LOOKAHEAD:
        state = tuple(applied(r, ahead.roles[r.name]) for r in state)
        ahead = _plan_step(state, spec, order, 0)  # the key `_attempt` uses: one cache entry per state
        steps += 1
    if ahead.kind == "blocked":
        return f"{ahead.reason} (the plan would stall after {steps} more step(s))"
    if ahead.kind == "step":
        # Cut off, not finished: taking the step could start a plan that never ends.
        return f"cannot progress: the plan does not finish within {_MAX_LOOKAHEAD} steps (a planner bug)"
    return None


def applied(role: RoleObservation, action: RoleAction) -> RoleObservation:
    """`role` after `action`, every group ready."""
    old, new = action.partition, action.replicas - action.partition
    return RoleObservation(
        role.name,
        role.type,
        role.desired,
        old_ready=old,
        new_ready=new,
        old_total=old,
        new_total=new,
        partition=old,
        surge=action.replicas - role.desired,
        old_revisions=_lowest(role.old_revisions, old),  # below the new partition: unchanged
    )


# A candidate step: its rank key (kept, steady, moved, -deviation, new groups), old and new counts.
_Candidate = tuple[tuple[bool, bool, int, Fraction, int], list[int], list[int]]


@functools.lru_cache(maxsize=1024)
def _plan_step(
    roles: tuple[RoleObservation, ...], spec: RolloutSpec, order: _Order = _STEADY_FIRST, rank: int = 0
) -> Decision:
    """The next step from a state where every group is ready (no lookahead), ranked by `order`;
    `rank` > 0 asks for the step that many places below the best. Cached: callers must not mutate
    the returned decision."""
    hold = {r.name: RoleAction(r.replicas, r.partition) for r in roles}
    if all(r.partition == 0 and r.replicas == r.desired for r in roles):
        return Decision("done", hold, "every group runs the new revision")
    if all(r.partition == 0 for r in roles):
        # Every group is new and ready: drop the surge (deletes ready new groups; T' = desired
        # keeps capacity at 100% and the new cohort at the desired, accepted, ratio).
        final = {r.name: RoleAction(r.desired, 0) for r in roles}
        return Decision("step", final, "remove surge groups")

    tol = effective_tolerance(roles, spec)
    actions = dict(hold)
    moved = 0
    grew = 0
    # Worker roles: no ratio, take the largest move, then the most surge.
    for r in (r for r in roles if r.type == "worker"):
        opts = _options(r, spec, order.climb)
        if opts:
            o = opts[-1]
            actions[r.name] = RoleAction(o.old + o.new_hi, o.old)
            moved += r.partition - o.old
            grew += max(0, o.new_hi - r.new_total)
    kv = [r for r in roles if r.type in ("prefill", "decode")]
    per_role = [_options(r, spec, order.climb) for r in kv]
    is_p = [r.type == "prefill" for r in kv]
    # An old cohort already off the ratio (a hand scale-down of an LWS, a scale-up that tightened
    # the tolerance mid-rollout) may not move further off it; without this, no step would be
    # allowed and the rollout would wedge. Staying as far off is allowed: surge groups can then
    # build up before the old cohort moves.
    old_now = deviation(
        sum(r.partition for r in kv if r.type == "prefill"),
        sum(r.partition for r in kv if r.type == "decode"),
        spec.ratio_p,
        spec.ratio_d,
    )
    layered = _several_old_revisions(kv)
    choices = None if layered else _banded_choices(per_role, is_p, spec, tol, old_now)
    if choices is None:
        combos = 1
        for opts in per_role:
            combos *= max(1, len(opts))
        # The best step by totals is as good as the product's; the product still serves the ranks
        # below it, where steps that tie on every count (the interrupted one among them) differ.
        by_totals = not layered and (combos > _MAX_COMBINATIONS or (not rank and combos > _SMALL_PRODUCT))
        merged = _per_type_choices(per_role, is_p) if by_totals else None
        if merged is not None:
            choices = merged
        elif combos <= _MAX_COMBINATIONS:
            choices = itertools.product(*per_role)
        else:
            return Decision(
                "blocked",
                hold,
                f"{TOO_LARGE}: {combos} combinations of per-role steps across {len(kv)} prefill/decode "
                f"roles (limit {_MAX_COMBINATIONS}); use one prefill and one decode role, or lower "
                "maxSurge/maxUnavailable",
            )
    before = _revision_cohorts(kv, [r.partition for r in kv]) if layered else {}
    # With several old revisions a step may leave one of them one-sided, but not every one: a step
    # that leaves no revision with a ready pair (while one has one now) is an outage until its new
    # groups start (helper-86).
    new_pair = all(sum(r.new_total for r in kv if r.type == t) for t in ("prefill", "decode"))
    guard_pair = order.keep_pair and layered and not new_pair and _paired(before)
    best: _Candidate | None = None
    ranked: list[_Candidate] = []
    for choice in choices:
        old_p = sum(o.old for o, p in zip(choice, is_p, strict=True) if p)
        old_d = sum(o.old for o, p in zip(choice, is_p, strict=True) if not p)
        steady = tol is None or on_ratio(old_p, old_d, spec.ratio_p, spec.ratio_d, tol)
        if not steady:
            dev_after = deviation(old_p, old_d, spec.ratio_p, spec.ratio_d)
            if dev_after is None or (old_now is not None and dev_after > old_now):
                continue
        p_opts = [o for o, p in zip(choice, is_p, strict=True) if p]
        d_opts = [o for o, p in zip(choice, is_p, strict=True) if not p]
        p_range = (sum(o.new_lo for o in p_opts), sum(o.new_hi for o in p_opts))
        d_range = (sum(o.new_lo for o in d_opts), sum(o.new_hi for o in d_opts))
        new = _best_new(p_range, d_range, spec, tol)
        if new is None:
            continue
        m = sum(r.partition - o.old for r, o in zip(kv, choice, strict=True))
        dev = deviation(old_p, old_d, spec.ratio_p, spec.ratio_d) or Fraction(0)
        # With several old revisions (a new spec mid-rollout) the proxy pairs within each of them:
        # prefer steps that leave none of them further off the ratio than it is.
        after = _revision_cohorts(kv, [o.old for o in choice]) if layered else {}
        if guard_pair and not _paired(after):
            continue
        kept = not layered or not order.keep_revisions or _no_worse(before, after, spec, tol)
        # An old cohort off the ratio (a controller killed between the writes of one step, a hand
        # scale-down) goes back onto it first, before moving the most: the step that does is usually
        # the interrupted one, completed.
        key = (kept, steady and order.steady_first, m, -dev, new[0] + new[1])
        if rank or best is None or key > best[0]:
            news_p, news_d = iter(_split(new[0], p_opts)), iter(_split(new[1], d_opts))
            news = [next(news_p) if p else next(news_d) for p in is_p]
            if rank:
                ranked.append((key, [o.old for o in choice], news))
            else:
                best = (key, [o.old for o in choice], news)
    if rank:
        # Stable: steps of equal key keep the search's order, so rank 0 would be `best` above. Below
        # a step that leaves every old revision no further off the ratio (`kept`), only such steps.
        ranked.sort(key=lambda c: c[0], reverse=True)
        ranked = [c for c in ranked if c[0][0] == ranked[0][0][0]]
        if rank >= len(ranked):
            return Decision("blocked", hold, _NO_RANK)
        best = ranked[rank]
    if best is not None:
        for r, old, new in zip(kv, best[1], best[2], strict=True):
            actions[r.name] = RoleAction(old + new, old)
    what = _describe_step(kv, actions, spec, moved, grew)
    if not what:
        return Decision("blocked", hold, _why_stuck(roles, spec, tol))
    return Decision("step", actions, what)


def _describe_step(
    roles: Sequence[RoleObservation],
    actions: dict[str, RoleAction],
    spec: RolloutSpec,
    moved: int = 0,
    grew: int = 0,
) -> str:
    """What a step from `roles` to `actions` does, or "" when it makes no progress. `moved` and
    `grew`: what it does to roles outside `roles` (worker roles counted by the caller)."""
    shrank = removed = 0
    for r in roles:
        old, new = actions[r.name].partition, actions[r.name].replicas - actions[r.name].partition
        moved += r.partition - old
        grew += max(0, new - r.new_total)
        # Groups above the surge bound (a scale-down mid-rollout) removed: progress too. A step
        # never adds groups above the bound, so shrinking toward it cannot repeat for ever.
        shrank += max(0, r.replicas - max(old + new, r.desired + budgets(r, spec)[0]))
        removed += max(0, r.replicas - old - new)
    if moved:
        return f"move {moved} group(s) to the new revision"
    if grew:
        return "surge new groups"
    return f"remove {removed} group(s) ({shrank} above the surge bound)" if shrank else ""


def _banded_choices(
    per_role: Sequence[Sequence[_Option]],
    is_p: Sequence[bool],
    spec: RolloutSpec,
    tol: Fraction | None,
    old_now: Fraction | None,
) -> list[tuple[_Option, ...]] | None:
    """The choices of one prefill and one decode role whose old cohort is on ratio or no further
    off it than now, in the order `itertools.product` would give them; None where that shortcut
    does not apply (no ratio, other roles, an old cohort now one-sided).

    Only such choices can be taken, and for each decode option their prefill counts form a band
    (the ratio band at the larger of the tolerance and today's deviation): enumerating it instead
    of every pair keeps a 1000-group role's step in milliseconds (the full product was ~250k pairs
    per step, and an off-ratio old cohort of 550 + 550 groups took 54 s to plan).
    """
    if tol is None or len(per_role) != 2 or is_p[0] == is_p[1] or old_now is None:
        return None
    pi, di = (0, 1) if is_p[0] else (1, 0)
    p_index = {o.old: i for i, o in enumerate(per_role[pi])}
    p_range = (0, max(p_index, default=0))
    picked: list[tuple[int, int]] = []
    for j, od in enumerate(per_role[di]):
        band = _on_ratio_band(od.old, p_range, spec, max(tol, old_now))
        picked += [(p_index[p], j) for p in band if p in p_index]
    picked.sort(key=lambda ij: (ij[0], ij[1]) if pi == 0 else (ij[1], ij[0]))
    return [
        (per_role[0][i], per_role[1][j]) if pi == 0 else (per_role[0][j], per_role[1][i]) for i, j in picked
    ]


# One role's pick for the per-type search: (index in the KV role list, option).
_Picks = tuple[tuple[int, _Option], ...]


def _per_type_choices(
    per_role: Sequence[Sequence[_Option]], is_p: Sequence[bool]
) -> list[tuple[_Option, ...]] | None:
    """Choices for several roles per type whose full product is too large: per type and total old
    count, the splits whose new-group range no other split of that total contains (a Pareto front
    of (low, high)), then every pairing of the two types' fronts. The ratio, the moved count and
    the deviation depend on the totals only, and any split's range lies inside a front member's,
    so the best step found is as good as the full product's. None if that is still too many."""
    by_type: list[dict[int, list[_Picks]]] = []
    work = 0
    for want_p in (True, False):
        table: dict[int, list[tuple[_Picks, int, int]]] = {0: [((), 0, 0)]}  # total -> picks, lo, hi
        for i, opts in enumerate(per_role):
            if is_p[i] != want_p:
                continue
            work += sum(map(len, table.values())) * len(opts)
            if work > _MAX_TOTAL_PAIRS:
                return None  # thousands of options per role: too slow per step even by totals
            nxt: dict[int, list[tuple[_Picks, int, int]]] = {}
            for total, entries in table.items():
                for picks, lo, hi in entries:
                    for o in opts:
                        _add_to_front(
                            nxt.setdefault(total + o.old, []),
                            ((*picks, (i, o)), lo + o.new_lo, hi + o.new_hi),
                        )
            table = nxt
        by_type.append({total: [picks for picks, _lo, _hi in front] for total, front in table.items()})
    p_table, d_table = by_type
    if sum(map(len, p_table.values())) * sum(map(len, d_table.values())) > _MAX_TOTAL_PAIRS:
        return None
    out = []
    for p_total in sorted(p_table, reverse=True):
        for d_total in sorted(d_table, reverse=True):
            for p_picks in p_table[p_total]:
                for d_picks in d_table[d_total]:
                    slots = dict(p_picks + d_picks)
                    out.append(tuple(slots[i] for i in range(len(per_role))))
    return out


def _add_to_front(front: list[tuple[_Picks, int, int]], cand: tuple[_Picks, int, int]) -> None:
    """Add `cand` to `front` unless a member's new-group range contains its range; drop the members
    whose range it contains. The widest range stays first."""
    _, lo, hi = cand
    if any(m_lo <= lo and m_hi >= hi for _, m_lo, m_hi in front):
        return
    front[:] = [m for m in front if not (lo <= m[1] and hi >= m[2])]
    front.append(cand)
    front.sort(key=lambda m: (-m[2], m[1]))


def _layers(role: RoleObservation) -> tuple[tuple[str, int], ...]:
    return role.old_revisions or (("", role.partition),)


def _several_old_revisions(kv: Sequence[RoleObservation]) -> bool:
    """Whether the old groups run more than one revision (a new spec arrived mid-rollout). A role
    with no old group left has no revision among them."""
    return len({rev for r in kv for rev, n in _layers(r) if n}) > 1


def _lowest(layers: tuple[tuple[str, int], ...], keep: int) -> tuple[tuple[str, int], ...]:
    """The revision runs of the lowest `keep` old groups (a lower partition keeps these)."""
    out: list[tuple[str, int]] = []
    for rev, n in layers:
        if keep <= 0:
            break
        out.append((rev, min(n, keep)))
        keep -= n
    return tuple(out)


def _revision_cohorts(kv: Sequence[RoleObservation], olds: Sequence[int]) -> dict[str, tuple[int, int]]:
    """(P, D) per old revision when each role keeps its lowest `olds[i]` old groups."""
    out: dict[str, tuple[int, int]] = {}
    for r, keep in zip(kv, olds, strict=True):
        for rev, n in _lowest(_layers(r), keep):
            p, d = out.get(rev, (0, 0))
            out[rev] = (p + n, d) if r.type == "prefill" else (p, d + n)
    return out


def _paired(cohorts: dict[str, tuple[int, int]]) -> bool:
    """Whether some revision has both a prefill and a decode group."""
    return any(p and d for p, d in cohorts.values())


def _no_worse(
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
    spec: RolloutSpec,
    tol: Fraction | None,
) -> bool:
    """Every old revision's cohort after the step is empty, on ratio, or no further off than before."""
    for rev, (p, d) in after.items():
        if (p == 0 and d == 0) or tol is None or on_ratio(p, d, spec.ratio_p, spec.ratio_d, tol):
            continue
        now = deviation(p, d, spec.ratio_p, spec.ratio_d)
        was = deviation(*before.get(rev, (0, 0)), spec.ratio_p, spec.ratio_d)
        if now is None and was is None:
            continue  # one-sided before and after: not worse
        if now is None or (was is not None and now > was):
            return False
    return True


def _why_stuck(roles: Sequence[RoleObservation], spec: RolloutSpec, tol: Fraction | None) -> str:
    """A human reason for a state where no step makes progress."""
    for r in roles:
        surge, unavailable = budgets(r, spec)
        if r.partition > 0 and surge == 0 and unavailable == 0:
            return (
                f"cannot progress: role {r.name} ({r.desired} replicas) resolves maxSurge and "
                "maxUnavailable to 0 groups; allow at least 1 of either"
            )
    return (
        f"cannot progress: no step keeps both cohorts within the P:D ratio "
        f"{spec.ratio_p}:{spec.ratio_d} (tolerance {float(tol or 0):g}) under maxSurge "
        f"{spec.max_surge} / maxUnavailable {spec.max_unavailable}; raise maxSurge or "
        "maxUnavailable so each role can move a whole ratio unit per step, or the tolerance"
    )


def auto_tolerance(observed: Sequence[RoleObservation], spec: RolloutSpec) -> float:
    """The smallest ratio tolerance under which the plan from `observed` completes.

    Used when the user set no tolerance: the rollout then keeps each cohort as close to the ratio as
    the surge/unavailable budgets allow, instead of refusing to start. Candidates are the deviations
    a cohort can take; feasibility is the planner's own lookahead (it refuses plans that would stall).
    Feasibility is not monotone in the tolerance (the greedy planner may take another path), so the
    candidates are tried in order; the result is cached per state and spec.
    """
    return _auto_tolerance(tuple(observed), replace(spec, tolerance=None, paused=False))


@functools.lru_cache(maxsize=256)
def _auto_tolerance(observed: tuple[RoleObservation, ...], spec: RolloutSpec) -> float:
    ready = [replace(r, old_ready=r.old_total, new_ready=r.new_total) for r in observed]

    def feasible(tol: float) -> bool:
        return next_step(ready, replace(spec, tolerance=tol, paused=False)).kind != "blocked"

    first = next_step(ready, replace(spec, tolerance=0.0, paused=False))
    if first.kind != "blocked" or first.reason.startswith(TOO_LARGE):
        # The common case; or a search too large at any tolerance, which next_step reports.
        return 0.0
    if first.reason.startswith("cannot progress: role "):
        # A role's budgets both resolve to 0 groups (`_why_stuck`): no tolerance makes a step.
        return 1.0
    p_max = sum(r.desired + r.surge + 1 for r in observed if r.type == "prefill")
    d_max = sum(r.desired + r.surge + 1 for r in observed if r.type == "decode")
    rp, rd = spec.ratio_p, spec.ratio_d
    # The deviations a cohort can take. Floats, not Fractions: the tolerance reaches the planner as
    # a float anyway, int / int rounds exactly as float(Fraction) does, and sorting ~10^6 Fractions
    # took seconds. Cohort sizes beyond _MAX_CANDIDATE_SIDE add deviations finer than any step of a
    # plan can tell apart, and made the set ~10^8 floats (GBs) for 10000-group roles.
    p_top, d_top = min(p_max, _MAX_CANDIDATE_SIDE), min(d_max, _MAX_CANDIDATE_SIDE)
    cands = {abs(p * rd - d * rp) / (d * rp) for p in range(1, p_top + 2) for d in range(1, d_top + 2)}
    # The planner never enforces less than the desired replicas' own deviation (`effective_tolerance`),
    # so candidates at or below it plan as tolerance 0 did.
    floor = effective_tolerance(observed, replace(spec, tolerance=0.0)) or 0
    ordered = sorted(c for c in cands if floor < c <= 1) or [0.0]
    # Feasibility is nearly monotone in the tolerance: try the smallest few in order (the exact
    # answer in practice), then bisect the rest, so a hopeless state costs ~50 plans, not ~10^6.
    for t in ordered[:_ORDERED_TRIES]:
        if feasible(t):
            return t
    lo, hi = _ORDERED_TRIES, len(ordered) - 1
    if lo > hi or not feasible(ordered[hi]):
        return ordered[-1]
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(ordered[mid]):
            hi = mid
        else:
            lo = mid + 1
    return ordered[hi]


# --- simulation -------------------------------------------------------------------------------

DelayModel = Callable[[str, int, int], int]
"""(role name, group index, time of creation) -> ticks until the group is ready (>= 0)."""


@dataclass
class _Group:
    new: bool
    ready_at: int
    revision: str = ""  # an old group's revision, when a live state says (several old revisions)
    abandoned: bool = False  # never ready, on a revision a rollback or newer spec replaced


def _observe(
    name: str, typ: str, desired: int, groups: list[_Group], partition: int, now: int
) -> RoleObservation:
    old = [g for g in groups if not g.new]
    new = [g for g in groups if g.new]
    runs = [(rev, len(list(run))) for rev, run in itertools.groupby(g.revision for g in old)]
    abandoned = 0
    for g in reversed(old):
        if not g.abandoned:
            break
        abandoned += 1
    return RoleObservation(
        old_revisions=tuple(runs) if any(rev for rev, _ in runs) else (),
        abandoned=abandoned,
        name=name,
        type=typ,
        desired=desired,
        old_ready=sum(g.ready_at <= now for g in old),
        new_ready=sum(g.ready_at <= now for g in new),
        old_total=len(old),
        new_total=len(new),
        partition=partition,
        surge=len(groups) - desired,
    )


def _snapshot(time: int, step: int, decision: Decision, obs: list[RoleObservation]) -> Snapshot:
    def total(typ: str, new: bool) -> int:
        return sum(o.new_total if new else o.old_total for o in obs if o.type == typ)

    return Snapshot(
        time=time,
        step=step,
        decision=decision,
        roles=tuple(
            RoleSnapshot(
                o.name,
                o.type,
                o.desired,
                o.replicas,
                o.partition,
                o.old_total,
                o.new_total,
                o.old_ready,
                o.new_ready,
            )
            for o in obs
        ),
        old_cohort=(total("prefill", False), total("decode", False)),
        new_cohort=(total("prefill", True), total("decode", True)),
    )


def simulate(
    spec: RolloutSpec,
    initial: Sequence[RoleObservation],
    readiness_delay_model: DelayModel | None = None,
    *,
    max_ticks: int = 10_000,
    scale_events: dict[int, dict[str, int]] | None = None,
) -> list[Snapshot]:
    """Run the planner against a modelled LWS until done or blocked; one snapshot per tick.

    `initial` gives each role's desired replicas and where the rollout stands: `initial_state`
    starts it as the controller does (new templates applied with partition = replicas, every old
    group ready); an observation of a live group continues from there. Each tick the planner
    is asked for a decision, the decision is applied (recreated and added groups become ready after
    the modelled delay), and the state after it is recorded. `scale_events` maps a tick to new
    desired replicas per role (a scaler acting mid-rollout).
    """
    delay = readiness_delay_model or (lambda _name, _index, _time: 1)
    state: dict[str, list[_Group]] = {}
    parts: dict[str, int] = {}
    meta: dict[str, tuple[str, int]] = {}
    for r in initial:
        if r.type not in ("prefill", "decode", "worker"):
            continue
        # Old groups below the partition, new ones above; groups not ready yet become ready after
        # one tick (a live state read by `pdorch plan --from-live` may be mid-rollout), except the
        # abandoned ones, which never do (the planner recreates them). Old groups keep their
        # revisions, so several old revisions are planned as the controller plans them.
        revisions = [rev for rev, n in r.old_revisions for _ in range(n)]
        old = []
        for i in range(r.partition):
            abandoned = i >= r.partition - r.abandoned
            ready_at = max_ticks + 1 if abandoned else 0 if i < r.old_ready else 1
            old.append(_Group(False, ready_at, revisions[i] if i < len(revisions) else "", abandoned))
        new = [_Group(True, 0 if i < r.new_ready else 1) for i in range(r.new_total)]
        state[r.name] = old + new
        parts[r.name] = r.partition
        meta[r.name] = (r.type, r.desired)
    snaps: list[Snapshot] = []
    step = 0

    def observe(now: int) -> list[RoleObservation]:
        return [_observe(n, meta[n][0], meta[n][1], state[n], parts[n], now) for n in state]

    start = Decision("start", {}, "new templates applied with partition = replicas")
    snaps.append(_snapshot(0, 0, start, observe(0)))
    for now in range(max_ticks):
        for name, desired in (scale_events or {}).get(now, {}).items():
            meta[name] = (meta[name][0], desired)
        decision = next_step(observe(now), spec)
        if decision.kind in ("done", "blocked", "paused"):
            snaps.append(_snapshot(now, step, decision, observe(now)))
            return snaps
        if decision.kind == "step":
            step += 1
            for name, action in decision.roles.items():
                groups, k_old = state[name], parts[name]
                for i in range(action.partition, k_old):  # recreated on the new template
                    groups[i] = _Group(True, now + max(0, delay(name, i, now)))
                while len(groups) < action.replicas:  # surge / scale-up: new groups on top
                    groups.append(_Group(True, now + max(0, delay(name, len(groups), now))))
                del groups[action.replicas :]  # scale-down deletes the highest indices
                parts[name] = action.partition
            snaps.append(_snapshot(now, step, decision, observe(now)))
        else:
            snaps.append(_snapshot(now, step, decision, observe(now)))
    blocked = Decision("blocked", {}, f"cannot progress: not finished after {max_ticks} ticks")
    snaps.append(_snapshot(max_ticks, step, blocked, observe(max_ticks)))
    return snaps


def with_auto_tolerance(spec: RolloutSpec, start: Sequence[RoleObservation]) -> RolloutSpec:
    """`spec` with a None tolerance resolved once from the rollout's start state `start`
    (`auto_tolerance`), not from a state the rollout has since moved to."""
    if spec.tolerance is not None:
        return spec
    return replace(spec, tolerance=auto_tolerance(start, spec))


def initial_state(roles: Sequence[tuple[str, str, int]]) -> list[RoleObservation]:
    """Observations of a group about to roll out: (name, type, desired) per role, all old, ready."""
    return [
        RoleObservation(n, t, d, old_ready=d, new_ready=0, old_total=d, new_total=0, partition=d)
        for n, t, d in roles
    ]


__all__ = [
    "DelayModel",
    "auto_tolerance",
    "budgets",
    "effective_tolerance",
    "initial_state",
    "next_step",
    "old_revision_serving_nothing",
    "simulate",
]
