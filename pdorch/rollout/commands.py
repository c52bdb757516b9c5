"""`pdorch plan`: print the whole ratio-preserving rollout trajectory of a ServingGroup, offline."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from pdorch.api.errors import SpecError, load_servinggroups
from pdorch.api.servinggroup import KV_ROLE_TYPES, RoleType, RolloutStrategy, ServingGroup
from pdorch.cli_args import namespace_name, non_negative_int
from pdorch.rollout import live
from pdorch.rollout.planner import applied, effective_tolerance, initial_state, simulate, with_auto_tolerance
from pdorch.rollout.state import RoleAction, RoleObservation, RolloutSpec, Snapshot


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdorch plan`."""
    p = subparsers.add_parser(
        "plan",
        help="print the rollout trajectory of a ServingGroup (no cluster needed)",
        description="Simulate a ratio-preserving rollout of a ServingGroup to a new revision and "
        "print every step: per role old/new groups (ready/total), the P:D of each cohort and the "
        "ready capacity. Nothing is changed anywhere.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-f", "--filename", help="ServingGroup YAML file, or - for stdin")
    src.add_argument(
        "--from-live",
        metavar="GROUP",
        help="plan from a ServingGroup on the cluster with the controller's inputs (scaler replicas, "
        "the rollout's starting tolerance), continuing a rollout in progress from its live state",
    )
    p.add_argument(
        "-n", "--namespace", type=namespace_name, default="default", help="namespace of --from-live"
    )
    p.add_argument("--kubeconfig", default=None, help="kubeconfig for --from-live (default: $KUBECONFIG)")
    p.add_argument(
        "--from-replicas",
        action="append",
        default=[],
        metavar="ROLE=N",
        help="desired replicas of a role instead of roles[].replicas (e.g. from its scaler); repeatable",
    )
    p.add_argument(
        "--delay", type=non_negative_int, default=1, help="ticks until a new group becomes ready (default 1)"
    )
    p.set_defaults(func=run)
    add_rollback_parser(subparsers)


def rollout_spec(
    sg: ServingGroup, *, honour_pause: bool = False, desired: dict[str, int] | None = None
) -> RolloutSpec:
    """The planner's view of spec.ratio and spec.rolloutStrategy.

    Without spec.ratio the declared ratio is the ratio of the desired replicas (DESIGN.md "API"):
    `desired` (role name -> replicas, e.g. what the role's ServingRoleScaler asks for now) where
    given, else `roles[].replicas`, which for an autoscaled role is only its initial size.
    Without a tolerance (neither rolloutStrategy.ratioTolerance nor ratio.tolerance) it is None:
    the planner then uses the smallest one the surge/unavailable budgets allow.
    """
    spec = sg.spec
    strategy = spec.rollout_strategy
    if spec.ratio is not None:
        p, d = spec.ratio.prefill, spec.ratio.decode
    else:
        now = desired or {}
        p = sum(now.get(r.name, r.replicas) for r in spec.roles if r.type == RoleType.PREFILL)
        d = sum(now.get(r.name, r.replicas) for r in spec.roles if r.type == RoleType.DECODE)
        g = math.gcd(p, d) or 1
        p, d = max(1, p // g), max(1, d // g)
    tol = None if strategy is None else strategy.ratio_tolerance
    if tol is None and spec.ratio is not None:
        tol = spec.ratio.tolerance
    return RolloutSpec(
        ratio_p=p,
        ratio_d=d,
        tolerance=tol,
        max_surge=(strategy or RolloutStrategy()).max_surge,
        max_unavailable=(strategy or RolloutStrategy()).max_unavailable,
        # `pdorch plan` shows what would happen once resumed; the controller honours the pause.
        paused=honour_pause and strategy is not None and strategy.paused,
    )


def _ratio(p: int, d: int) -> str:
    if p == 0 and d == 0:
        return "-"
    return f"{p}:{d}" if d == 0 else f"{p}:{d} ({p / d:.2f})"


def format_plan(snaps: list[Snapshot]) -> str:
    """Render the steps of a simulated rollout as a table (readiness waits are folded)."""
    names = [r.name for r in snaps[0].roles]
    header = ["step", "time"] + [f"{n} old/new" for n in names] + ["old P:D", "new P:D", "capacity"]
    rows: list[list[str]] = []
    for snap in snaps:
        if snap.decision.kind in ("wait", "done", "blocked", "paused"):
            continue  # readiness waits are folded; the outcome is printed below the table
        cells = [str(snap.step), str(snap.time)]
        for r in snap.roles:
            cells.append(f"{r.old_ready}/{r.old_total} {r.new_ready}/{r.new_total}")
        cells += [_ratio(*snap.old_cohort), _ratio(*snap.new_cohort)]
        # Lowest ready/desired over the roles, right after the step (readiness only grows after).
        cap = min(((r.old_ready + r.new_ready) / r.desired for r in snap.roles if r.desired), default=1)
        cells.append(f"{cap:.0%}")
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Execute `pdorch plan`; exit code 1 on an invalid spec, 3 when the rollout cannot progress."""
    if args.from_live:
        return _run_live(args)
    source = args.filename
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        groups = load_servinggroups(text, source)
    except OSError as exc:
        print(f"error: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return 1
    except SpecError as exc:
        print(f"error: invalid ServingGroup in {exc.source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    overrides: dict[str, int] = {}
    for item in args.from_replicas:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            print(f"error: --from-replicas expects ROLE=N, got {item!r}", file=sys.stderr)
            return 1
        overrides[name] = int(value)
    code = 0
    for sg in groups:
        unknown = set(overrides) - {r.name for r in sg.spec.roles}
        if unknown:
            print(f"error: no role named {', '.join(sorted(unknown))} in {sg.name}", file=sys.stderr)
            return 1
        desired = {r.name: overrides.get(r.name, r.replicas) for r in sg.spec.roles}
        start = initial_state(
            [(r.name, r.type.value, desired[r.name]) for r in sg.spec.roles if r.type != RoleType.PROXY]
        )
        spec, auto = planning_spec(sg, desired, start)
        code = max(code, _print_plan(sg, spec, auto, start, args.delay))
    return code


def planning_spec(
    sg: ServingGroup, desired: dict[str, int], start: list[RoleObservation]
) -> tuple[RolloutSpec, bool]:
    """The RolloutSpec the controller plans with, and whether its tolerance is the automatic one.

    As the controller: the ratio of the desired replicas (`desired`: the scalers' where they set
    one) unless spec.ratio is set, and an automatic tolerance computed once from the rollout's
    start state `start` (`initial_state` of the desired replicas of the roles with an LWS, as
    `live.plan` does), not from a state the rollout has since moved to.
    """
    spec = rollout_spec(sg, desired=desired)
    return with_auto_tolerance(spec, start), spec.tolerance is None


def _print_plan(
    sg: ServingGroup, spec: RolloutSpec, auto: bool, initial: list[RoleObservation], delay: int
) -> int:
    """Simulate from `initial`, print the table and the outcome; 3 if it does not finish."""
    snaps = simulate(spec, initial, lambda _n, _i, _t: max(0, delay))
    enforced = effective_tolerance(initial, spec)
    widened = enforced is not None and enforced > Fraction(spec.tolerance).limit_denominator(1_000_000)
    note = " (auto: the smallest the budgets allow)" if auto else ""
    if widened:
        # The planner never holds cohorts closer to the ratio than the desired replicas are.
        note += f" (enforced: {float(enforced):g}, the desired replicas' own deviation)"
    print(
        f"# {sg.name}: ratio {spec.ratio_p}:{spec.ratio_d} tolerance {spec.tolerance:g}{note} "
        f"maxSurge {spec.max_surge} maxUnavailable {spec.max_unavailable}"
    )
    print(format_plan(snaps))
    last = snaps[-1].decision
    print(f"# {last.kind}: {last.reason}")
    return 0 if last.kind == "done" else 3


def _cluster(kubeconfig: str | None) -> tuple[Any, Any]:
    """A lightkube client (`kubeconfig`, else $KUBECONFIG or in-cluster) and the ServingGroup resource.

    lightkube is imported here, not at the top: `pdorch plan -f` needs no cluster.
    """
    from lightkube import Client, KubeConfig
    from lightkube.generic_resource import create_namespaced_resource

    client = Client(KubeConfig.from_file(kubeconfig)) if kubeconfig else Client()
    return client, create_namespaced_resource("pdorch.io", "v1alpha1", "ServingGroup", "servinggroups")


@dataclass(frozen=True)
class LivePlan:
    """What `pdorch plan --from-live` simulates: from where (`initial`) and under which spec."""

    rolling: bool
    initial: list[RoleObservation]
    spec: RolloutSpec
    auto: bool
    # A step whose LWS writes were cut short, which the controller finishes before anything else:
    # its number and the roles it had not written. `initial` is then the state after it.
    finishing: tuple[int, list[str]] | None = None


def live_plan(sg: ServingGroup, roles: Sequence[live.LiveRole], revision: str) -> LivePlan:
    """The planning inputs of a live group, exactly as the controller builds them.

    `roles` are the KV roles with the desired replicas the controller uses (the scalers' where
    they set one, see `scaled_replicas`) and their live LWS. During a rollout the simulation
    continues from the observed state, with the ratio and the automatic tolerance of the
    rollout's start state (`live.plan`); otherwise it plans the next template change.
    """
    rolling = live.is_rolling(roles, revision)
    basis = [r for r in roles if r.lws is not None] if rolling else list(roles)
    start = initial_state([(r.name, r.type, r.desired) for r in basis])
    spec, auto = planning_spec(sg, {r.name: r.desired for r in roles}, start)
    if not rolling:
        return LivePlan(rolling, start, spec, auto)
    base = sg.status.current_revision if sg.status is not None else None
    initial = live.observations(basis, revision, base)
    cut = live.cut_short(basis, initial, revision, spec)
    if cut is None:
        return LivePlan(rolling, initial, spec, auto)
    # The controller finishes it first (once its roles are ready): plan from the state after it.
    targets = cut.step.to_dict()
    after = [applied(o, RoleAction(*targets[o.name])) for o in initial]
    return LivePlan(rolling, after, spec, auto, (cut.step.number, cut.missing))


def _run_live(args: argparse.Namespace) -> int:
    """`pdorch plan --from-live`: the same simulation, starting from the group's live LWS and pods."""
    from lightkube import ApiError
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.resources.core_v1 import Pod

    from pdorch.roles.labels import LABEL_GROUP, LABEL_ROLE
    from pdorch.roles.naming import lws_name, scaler_name
    from pdorch.roles.revision import compute_revision
    from pdorch.roles.rolescaler import needs_scaler, scaled_replicas, status_desired

    def res(group: str, version: str, kind: str, plural: str) -> Any:
        return create_namespaced_resource(group, version, kind, plural)

    client, sg_res = _cluster(args.kubeconfig)
    srs_res = res("pdorch.io", "v1alpha1", "ServingRoleScaler", "servingrolescalers")
    lws_res = res("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets")
    ns, name = args.namespace, args.from_live

    def get(r: Any, n: str) -> dict[str, Any] | None:
        try:
            return client.get(r, n, namespace=ns).to_dict()
        except ApiError as e:
            if e.status.code == 404:
                return None
            raise

    obj = get(sg_res, name)
    if obj is None:
        print(f"error: servinggroup {ns}/{name} not found", file=sys.stderr)
        return 1
    sg = ServingGroup.model_validate(obj)
    revision = compute_revision(sg.spec)
    last_desired = status_desired(sg)
    roles = []
    for r in sg.spec.roles:
        if r.type not in KV_ROLE_TYPES:
            continue
        lws = get(lws_res, lws_name(name, r.name))
        srs = get(srs_res, scaler_name(name, r.name)) if needs_scaler(r) else None
        scaled = scaled_replicas(r, srs, lws, last_desired.get(r.name))
        pods = [
            p.to_dict()
            for p in client.list(Pod, namespace=ns, labels={LABEL_GROUP: name, LABEL_ROLE: r.name})
        ]
        roles.append(
            live.LiveRole(
                r.name,
                r.type.value,
                r.replicas if scaled is None else scaled,
                lws,
                live.group_states(pods, r.size),
            )
        )
    plan = live_plan(sg, roles, revision)
    if plan.finishing:
        number, missing = plan.finishing
        print(
            f"# rollout to {revision} in progress: step {number} was cut short before "
            f"{', '.join(missing)} was written; the controller writes the rest first, planning from there"
        )
    elif plan.rolling:
        paused = sg.spec.rollout_strategy is not None and sg.spec.rollout_strategy.paused
        print(
            f"# rollout to {revision} in progress: planning from the live state"
            + ("; paused (spec.rolloutStrategy.paused): no step is taken until it is false" if paused else "")
        )
    else:
        print(f"# no rollout in progress ({revision} everywhere): the plan for the next template change")
    return _print_plan(sg, plan.spec, plan.auto, plan.initial, args.delay)


def add_rollback_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `pdorch rollback`."""
    p = subparsers.add_parser(
        "rollback",
        help="put a ServingGroup back on an earlier revision (rolled out like any other change)",
        description="Restore an earlier revision of a ServingGroup from its revision history "
        "(ControllerRevisions the controller records): the fields that define a revision (engine; "
        "per prefill/decode/worker role its templates, size, ports and LWS policies, and the set of "
        "those roles) come back, while replicas, scaling, the proxy role, ratio, rolloutStrategy and "
        "router keep their live values. During a rollout the default target is the revision the group "
        "ran before it; otherwise the newest earlier one.",
    )
    p.add_argument("group", help="ServingGroup name")
    p.add_argument("-n", "--namespace", type=namespace_name, default="default")
    p.add_argument("--to-revision", default=None, help="a recorded pdorch.io/revision (default: see above)")
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig path (default: $KUBECONFIG or ~/.kube/config)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the target revision and the spec diff, change nothing"
    )
    p.set_defaults(func=run_rollback)


def spec_diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A unified diff of two specs as YAML with sorted keys (so only real changes show)."""
    import difflib

    import yaml

    def lines(spec: dict[str, Any]) -> list[str]:
        return yaml.safe_dump(spec, sort_keys=True, default_flow_style=False).splitlines(keepends=True)

    return "".join(difflib.unified_diff(lines(before), lines(after), "spec (live)", "spec (rolled back)"))


def run_rollback(args: argparse.Namespace) -> int:
    """Execute `pdorch rollback`; exit code 1 when there is nothing to roll back to or it is refused."""
    from lightkube import ApiError
    from lightkube.resources.apps_v1 import ControllerRevision

    from pdorch.roles.labels import LABEL_GROUP
    from pdorch.rollout.history import (
        live_update_revision,
        owned_records,
        restore_revision,
        revision_of_object,
        rollback_target,
    )

    client, sg_res = _cluster(args.kubeconfig)
    try:
        sg = client.get(sg_res, args.group, namespace=args.namespace).to_dict()
    except ApiError as e:
        print(
            f"error: cannot read servinggroup {args.namespace}/{args.group}: {e.status.message}",
            file=sys.stderr,
        )
        return 1
    records = owned_records(
        [
            c.to_dict()
            for c in client.list(
                ControllerRevision, namespace=args.namespace, labels={LABEL_GROUP: args.group}
            )
        ],
        (sg.get("metadata") or {}).get("uid"),
    )
    status = sg.get("status") or {}
    update = live_update_revision(sg)
    try:
        target = rollback_target(records, status.get("currentRevision"), update, args.to_revision)
        rev = revision_of_object(target)
        recorded = (target.get("data") or {}).get("spec")
        if not isinstance(recorded, dict):
            raise ValueError(f"the record of revision {rev} holds no spec; pass another --to-revision")
        restored = restore_revision(sg["spec"], recorded, rev)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"servinggroup {args.namespace}/{args.group}: {update} -> {rev}")
    print(
        "restoring the revision's templates, sizes, ports and engine settings; replicas, scaling, "
        "the proxy, ratio, rolloutStrategy and router keep their live values"
    )
    for note in restored.notes:
        print(f"note: {note}")
    diff = spec_diff(sg["spec"], restored.spec)
    if not diff:
        print("nothing to change: the spec already has this revision")
        return 0
    print(diff, end="")
    if args.dry_run:
        print("(dry run: nothing changed)")
        return 0
    # The resourceVersion read above goes with the write: a spec changed meanwhile is not overwritten.
    # A conflict from a status write alone (the controller reports a stalled rollout every few
    # seconds; the generation is unchanged) is retried on the fresh object.
    generation = sg["metadata"].get("generation")
    for attempt in range(5):
        sg["spec"] = restored.spec
        try:
            client.replace(sg_res.from_dict(sg), namespace=args.namespace)
            break
        except ApiError as e:
            fresh = (
                client.get(sg_res, args.group, namespace=args.namespace).to_dict()
                if e.status.code == 409
                else None
            )
            if fresh is None or fresh["metadata"].get("generation") != generation or attempt == 4:
                print(f"error: the update was refused: {e.status.message}", file=sys.stderr)
                return 1
            sg = fresh
    print("rolled back; follow it with `kubectl get sg -w` (Progressing, RolloutStalled)")
    return 0
