"""Reconcile one ServingGroup: read the caches, render, apply what changed, prune, report status.

Level-triggered and idempotent: it never looks at which event caused it. The only reads that go
to the API server are server-side dry runs of changed objects (to catch what LWS would refuse
before anything is created); everything else comes from the informers' caches.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx2
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from pdorch.api.errors import format_validation_error
from pdorch.api.servinggroup import Role, ServingGroup
from pdorch.controller import status as st
from pdorch.controller.events import EventRecorder
from pdorch.controller.failures import FAILED_CREATE, creation_failures, last_applied
from pdorch.controller.informer import Informer
from pdorch.controller.intent import (
    changed_by_others,
    intent_hash,
    needs_apply,
    same_values,
    stamp,
    version_marker,
)
from pdorch.controller.kubeapi import (
    CONTROLLER_REVISION,
    CORE_EVENT,
    LWS,
    POD_TEMPLATE,
    ROLE,
    ROLE_BINDING,
    SERVICE,
    SERVICE_ACCOUNT,
    SERVING_GROUP,
    SERVING_ROLE_SCALER,
    ApiError,
    KubeApi,
    Resource,
    resource_of,
)
from pdorch.controller.scheduling import UNSCHEDULABLE, unschedulable
from pdorch.roles.labels import (
    LABEL_GROUP,
    LABEL_ROLE,
    LABEL_ROLE_TYPE,
    leader_selector,
    selector_string,
)
from pdorch.roles.naming import lws_name, scaler_name
from pdorch.roles.render import RenderOptions, RoleOverride, render
from pdorch.roles.revision import compute_revision
from pdorch.roles.rolescaler import held_for_drain, needs_scaler, scaled_replicas, status_desired
from pdorch.rollout import history
from pdorch.rollout import live as rlive
from pdorch.rollout.commands import rollout_spec
from pdorch.rollout.planner import old_revision_serving_nothing
from pdorch.rollout.state import KV_TYPES
from pdorch.rollout.step_record import StepRecord

log = logging.getLogger(__name__)

RECONCILE_SECONDS = Histogram(
    "pdorch_reconcile_duration_seconds",
    "Time per reconcile of one ServingGroup.",
    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter("pdorch_reconcile_errors_total", "Reconciles that raised and were retried.")
RECONCILES = Counter("pdorch_reconcile_total", "Reconciles by result.", ["result"])
RATIO_DEVIATION = Gauge(
    "pdorch_ratio_deviation",
    "|log(ready P:D / declared P:D)| per group (0 = on ratio).",
    ["namespace", "group"],
)
ROLLOUT_STEPS = Counter(
    "pdorch_rollout_steps_total",
    "Rollout steps taken (partitions/replicas moved); a step whose writes are retried counts once.",
    ["namespace", "group"],
)
COHORT_DEVIATION = Gauge(
    "pdorch_rollout_cohort_ratio_deviation",
    "Largest relative P:D deviation among ready groups of any one revision (1 = one-sided cohort).",
    ["namespace", "group"],
)
ROLLOUT_STALLED = Gauge(
    "pdorch_rollout_stalled", "1 while the group's RolloutStalled condition is True.", ["namespace", "group"]
)
PODS_UNSCHEDULABLE = Gauge(
    "pdorch_pods_unschedulable",
    "1 while the group's PodsUnschedulable condition is True (pods the scheduler could not place).",
    ["namespace", "group"],
)
CHILD_KINDS: tuple[Resource, ...] = (LWS, SERVICE, SERVICE_ACCOUNT, ROLE, ROLE_BINDING, SERVING_ROLE_SCALER)
# Retry interval of a ControllerRevision write the API refused (the pass itself succeeded).
REVISION_RETRY_S = 10.0
# How long after writing a rollout step an LWS that still shows an older step is taken for the watch
# cache lagging (held at the step written) rather than a change since: a lag is milliseconds, and a
# record removed by hand must not hold the rollout for good.
WATCH_LAG_S = 30.0
# An Invalid condition's message (a refused spec can quote a whole template); the CRD allows 32768.
MAX_INVALID_MESSAGE = 4000
# A role lacking groups this long gets its FailedCreate warnings read, at most this often.
FAILURE_GRACE_S = 15.0
FAILURE_CHECK_S = 15.0
# How long a Builtin role is held above a lowered maxReplicas for pdorch's scaler to drain it.
MAX_DRAIN_HOLD_S = 600.0
# Kinds carrying user-supplied content (pod templates, scaling bounds): dry-run before writing.
USER_CONTENT_KINDS = frozenset({LWS.kind, SERVING_ROLE_SCALER.kind})


@dataclass
class _Render:
    key: tuple[str, str, str]
    desired: list[dict[str, Any]]
    revision: str
    stamps: dict[tuple[int, bool], tuple[dict[str, Any], str]] = field(default_factory=dict)


@dataclass
class Caches:
    """The informers the reconciler reads from."""

    groups: Informer
    children: dict[Resource, Informer]
    # Pods of pdorch's groups: per-group readiness by revision while a rollout is active.
    pods: Informer | None = None


@dataclass
class Reconciler:
    api: KubeApi
    caches: Caches
    events: EventRecorder
    options: RenderOptions
    # (resource plural, namespace, name) -> (version marker right after our own apply, intent hash,
    # monotonic time of that apply)
    _applied: dict[tuple[str, str, str], tuple[str, str, float]] = field(default_factory=dict)
    # Per group key: the validated model (or error message) for one (uid, resourceVersion) ...
    _models: dict[str, tuple[tuple[str, str], ServingGroup | str]] = field(default_factory=dict)
    # ... and its rendered, stamped intents for one set of overrides.
    _renders: dict[str, _Render] = field(default_factory=dict)
    # Groups with a rollout in progress (pod events enqueue only these), and per group its progress
    # mark (`status.progress_mark`: the step being taken, the most groups ready in it, and when the
    # mark last moved, monotonic and as written to status.lastProgressTime; for RolloutStalled, a
    # restarted controller resumes from status).
    rolling: set[str] = field(default_factory=set)
    _progress: dict[str, st.ProgressMark] = field(default_factory=dict)
    # Per group: the last rollout step whose LWS writes all went through (step_record).
    _written_steps: dict[str, tuple[StepRecord, float]] = field(default_factory=dict)
    # Per group: the last step counted in ROLLOUT_STEPS, as (revision, number): a retried write is
    # no new step, and the first step of a new revision is one even where numbering starts over.
    _counted_steps: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Per group: LWS name -> when this process last changed it (creation failures older than that
    # concern an earlier spec).
    _lws_changed_at: dict[str, dict[str, dt.datetime]] = field(default_factory=dict)
    # Per namespace: its FailedCreate warnings and when they were listed (at most every
    # FAILURE_CHECK_S, and only while one of its groups lacks groups), and a list under way.
    _warnings: dict[str, tuple[float, list[dict[str, Any]] | None]] = field(default_factory=dict)
    _warnings_listing: dict[str, asyncio.Future[list[dict[str, Any]] | None]] = field(default_factory=dict)
    # Per group: LWS name -> hash of the pod templates a dry-run PodTemplate last accepted.
    _templates_passed: dict[str, dict[str, str]] = field(default_factory=dict)
    # Per group: since when (monotonic) its rollout has seen no old prefill or decode group ready.
    _old_down_since: dict[str, float] = field(default_factory=dict)
    # Per group, per role: since when a Builtin role has been held above a lowered maxReplicas.
    _drain_hold_since: dict[str, dict[str, float]] = field(default_factory=dict)

    async def reconcile(self, key: str) -> float | None:
        """Reconcile `namespace/name`. Returns seconds until a wanted requeue, or None."""
        t0 = time.perf_counter()
        try:
            return await self._reconcile(key)
        except Exception:
            RECONCILE_ERRORS.inc()
            RECONCILES.labels("error").inc()
            raise
        finally:
            RECONCILE_SECONDS.observe(time.perf_counter() - t0)

    async def _reconcile(self, key: str) -> float | None:
        namespace, name = key.split("/", 1)
        obj = self.caches.groups.get(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            self._models.pop(key, None)
            self._renders.pop(key, None)
            self.rolling.discard(key)
            self._progress.pop(key, None)
            self._written_steps.pop(key, None)
            self._counted_steps.pop(key, None)
            self._lws_changed_at.pop(key, None)
            self._templates_passed.pop(key, None)
            self._old_down_since.pop(key, None)
            self._drain_hold_since.pop(key, None)
            forget_group_metrics(namespace, name)
            RECONCILES.labels("gone").inc()
            return None  # owner references let the garbage collector remove the children
        generation = int(obj["metadata"].get("generation") or 0)
        prev_status = obj.get("status") or {}

        # Validation, rendering and hashing depend only on the ServingGroup version and the
        # scaler overrides; most passes are triggered by LWS status changes and reuse them.
        uid, rv = obj["metadata"].get("uid", ""), obj["metadata"].get("resourceVersion", "")
        cached_sg = self._models.get(key)
        if cached_sg is not None and cached_sg[0] == (uid, rv):
            sg_or_error = cached_sg[1]
        else:
            try:
                sg_or_error = ServingGroup.model_validate(obj)
            except ValidationError as e:
                sg_or_error = _validation_message(e)
            self._models[key] = ((uid, rv), sg_or_error)
        if isinstance(sg_or_error, str):
            return await self._invalid(obj, generation, prev_status, sg_or_error)
        sg = sg_or_error

        # What the operator asked for (spec, or the ServingRoleScaler) stays apart from the
        # rollout's temporary replicas: status reports the former, the LWS get the latter.
        scaled = self._overrides(sg, namespace, name)
        rollout = await self._plan_rollout(sg, key, namespace, name, scaled)
        overrides = dict(scaled)
        for role_name, (replicas, partition) in rollout.actions.items():
            overrides[role_name] = RoleOverride(
                replicas=replicas,
                partition=partition,
                scaler_replicas=scaled[role_name].scaler_replicas if role_name in scaled else None,
                rollout=True,
                step=record.encode() if (record := rollout.records.get(role_name)) is not None else None,
            )
        rkey = (uid, rv, repr(sorted(overrides.items())))
        cached = self._renders.get(key)
        if cached is None or cached.key != rkey:
            try:
                rendered = render(sg, self.options, overrides)
            except Exception as e:
                # The models accepted a spec render cannot handle (a pdorch bug): say so in status
                # once instead of failing and retrying the pass forever without a word.
                log.exception("rendering %s failed", key)
                return await self._invalid(
                    obj,
                    generation,
                    prev_status,
                    f"the spec could not be rendered ({type(e).__name__}: {e}); "
                    "check the role templates, and report this to pdorch if the spec is valid",
                    _desired(sg, scaled),
                )
            cached = _Render(rkey, rendered, compute_revision(sg.spec))
            self._renders[key] = cached
        desired, revision = cached.desired, cached.revision

        # Dry-run every object that would change, before writing anything: a template LWS (or
        # any API) refuses marks the group Invalid and leaves the cluster untouched.
        unseen_wait: float | None = None  # the shortest watch lag still allowed to a write of ours
        plan: list[tuple[dict[str, Any], str, dict[str, Any] | None]] = []
        checks: list[tuple[dict[str, Any], dict[str, Any] | None, bool]] = []
        # LWS someone else changed since our last apply (a hand edit), by name: only those whose
        # apply then changes them again were put back (a field pdorch does not set stays).
        edited: set[str] = set()
        reverted: list[str] = []
        kept: list[str] = []
        for i, intent in enumerate(desired):
            res = resource_of(intent)
            live = self.caches.children[res].get(namespace, intent["metadata"]["name"])
            owner = foreign_owner(live, uid) if live is not None else None
            if owner is None and res is LWS:
                # LWS names a headless Service after each LeaderWorkerSet: another group's proxy
                # Service (named after that group) must not hold the name.
                svc = self.caches.children[SERVICE].get(namespace, intent["metadata"]["name"])
                owner = foreign_owner(svc, uid) if svc is not None else None
                if owner == (LWS.kind, intent["metadata"]["name"]):
                    owner = None  # that headless Service itself (should it carry our labels)
            if owner is not None:
                if owner == (SERVING_GROUP.kind, name):
                    return 2.0  # a deleted group of the same name: wait for its children to go
                return await self._invalid(
                    obj,
                    generation,
                    prev_status,
                    _name_clash(intent, f"belongs to {owner[0]} {owner[1]}"),
                    _desired(sg, scaled),
                )
            skey = (i, live is None)
            if skey not in cached.stamps:
                cached.stamps[skey] = stamp(_without_scaler_replicas(intent, live))
            stamped, h = cached.stamps[skey]
            mkey = (res.plural, namespace, intent["metadata"]["name"])
            mine = self._applied.get(mkey)
            if live is None and mine is not None and mine[1] == h:
                # We just wrote it and the watch has not delivered it yet; for a lag, not for good
                # (an object deleted before the watch saw it brings no DELETED event to forget it).
                lag_left = WATCH_LAG_S - (time.monotonic() - mine[2])
                if lag_left > 0:
                    unseen_wait = min(unseen_wait or lag_left, lag_left)
                    continue
            if needs_apply(h, live, mine[0] if mine else None, stamped):
                plan.append((stamped, h, live))
                if (
                    res is LWS
                    and changed_by_others(h, live, mine[0] if mine else None)
                    and not (live or {}).get("metadata", {}).get("deletionTimestamp")
                ):
                    edited.add(stamped["metadata"]["name"])  # a hand edit (kubectl edit/scale)
                # A name this process never wrote and no managed object holds may still be taken
                # by an object pdorch does not watch (an LWS's headless Service, a hand-made LWS):
                # a dry-run create finds it, where an apply would silently take it over.
                unseen = live is None and mine is None
                if unseen or stamped["kind"] in USER_CONTENT_KINDS:
                    checks.append((stamped, live, unseen))
        refusal = await self._dry_run(key, checks)
        if refusal is not None:
            return await self._invalid(obj, generation, prev_status, refusal, _desired(sg, scaled))
        self._announce_step(key, namespace, name, rollout)

        # Independent objects go out concurrently; RoleBindings last, since RBAC checks that the
        # Role they bind exists when the binder is not a cluster admin.
        created = []
        for wave in (
            [p for p in plan if p[0]["kind"] != ROLE_BINDING.kind],
            [p for p in plan if p[0]["kind"] == ROLE_BINDING.kind],
        ):
            results = await asyncio.gather(
                *(self._write(o, live, dry_run=False) for o, _, live in wave), return_exceptions=True
            )
            failures: list[tuple[dict[str, Any], BaseException]] = []
            for (stamped, h, live), written in zip(wave, results, strict=True):
                if isinstance(written, BaseException):
                    failures.append((stamped, written))
                    continue
                result, was_created = written
                res = resource_of(stamped)
                self._applied[(res.plural, namespace, stamped["metadata"]["name"])] = (
                    version_marker(result),
                    h,
                    time.monotonic(),
                )
                if res == LWS:
                    changed = self._lws_changed_at.setdefault(key, {})
                    changed[stamped["metadata"]["name"]] = dt.datetime.now(dt.UTC)
                if was_created:
                    created.append(f"{stamped['kind']}/{stamped['metadata']['name']}")
                elif stamped["metadata"]["name"] in edited:
                    put_back = not same_values(result.get("spec"), live.get("spec"))
                    (reverted if put_back else kept).append(
                        f"{stamped['kind']}/{stamped['metadata']['name']}"
                    )
            if failures:
                o, err = failures[0]
                await self._apply_failed(
                    obj, generation, prev_status, f"{o['kind']}/{o['metadata']['name']}: {err}"
                )
                raise err  # retried with per-key backoff
        if rollout.step is not None:
            # Every LWS write of it went through (monotonic time: see WATCH_LAG_S).
            self._written_steps[key] = (rollout.step, time.monotonic())
        if created:
            self.events.emit_soon(obj, "Normal", "Created", "created " + ", ".join(created))
        if reverted:
            self.events.emit_soon(
                obj,
                "Warning",
                "Reverted",
                f"put back {', '.join(reverted)}: it was changed outside pdorch; what the ServingGroup "
                "sets is restored (fields it does not set stay); change the ServingGroup (or its "
                "ServingRoleScaler) instead",
            )
        if kept:
            self.events.emit_soon(
                obj,
                "Warning",
                "ChangedOutside",
                f"{', '.join(kept)} was changed outside pdorch in fields the ServingGroup does not set; "
                "left as it is (a pod-template change rolls a group at a time): remove it, or set it "
                "through the ServingGroup",
            )

        pruned = await self._prune(obj, desired)
        if pruned:
            self.events.emit_soon(obj, "Normal", "Pruned", "deleted " + ", ".join(pruned))

        # A rollout that takes no step by itself: paused, blocked, or waiting past its deadline.
        stalled = st.find_condition(prev_status.get("conditions") or [], st.ROLLOUT_STALLED) or {}
        decision = rollout.decision
        stuck = (
            decision.reason
            if decision
            and (
                decision.kind in ("paused", "blocked")
                or (decision.kind == "wait" and stalled.get("reason") == "ProgressDeadlineExceeded")
            )
            else None
        )
        await self._sync_scaler_status(sg, namespace, name, scaled, set(rollout.actions), stuck)

        desired = _desired(sg, scaled)
        # The planner's count of ready groups on the update revision is exact (per-group pod
        # revisions); LWS's own counts are the fallback outside a rollout.
        updated_ready = {o.name: o.new_ready for o in rollout.observations}
        roles = []
        for role in sg.spec.roles:
            lws = self.caches.children[LWS].get(namespace, lws_name(name, role.name))
            obs = st.observe_role(role.name, str(role.type), desired[role.name], lws)
            if role.name in updated_ready:
                obs = replace(obs, updated_ready=updated_ready[role.name])
            roles.append(obs)
        new_status = st.compute_status(
            generation,
            roles,
            revision,
            prev_status,
            prev_status.get("currentRevision"),
            rolling=rollout.active,
            cohorts=rollout.cohorts if rollout.active else None,
        )
        requeue = self._rollout_status(sg, key, obj, generation, prev_status, new_status, rollout)
        if await self._add_pod_trouble(new_status, key, roles, generation, prev_status):
            requeue = min(requeue or FAILURE_CHECK_S, FAILURE_CHECK_S)
        holds = self._drain_hold_since.get(key, {}).values()
        if holds:  # to apply the bound when a hold above a lowered maxReplicas runs out
            left = max(1.0, MAX_DRAIN_HOLD_S - (time.monotonic() - min(holds)))
            requeue = min(requeue or left, left)
        new_status["summary"]["rollout"] = st.rollout_state(new_status["conditions"])
        _record_ratio(obj, roles)
        # Recorded before the status that announces it, so a pass that raises here leaves the old
        # updateRevision in status and its retry records it. A refusal is kept in status as
        # RevisionRecordFailed and retried every REVISION_RETRY_S, also after a controller restart
        # (recording is idempotent).
        update_revision = new_status["updateRevision"]
        prev_conditions = prev_status.get("conditions") or []
        if update_revision != prev_status.get("updateRevision") or st.find_condition(
            prev_conditions, st.REVISION_RECORD_FAILED
        ):
            refusal = await self._record_revision(obj, update_revision)
            if refusal is not None:
                new_status["conditions"].append(
                    st.condition(
                        st.REVISION_RECORD_FAILED,
                        True,
                        "RecordRefused",
                        f"revision {update_revision} is not kept for `pdorch rollback` yet "
                        f"(retried every {REVISION_RETRY_S:.0f}s): {refusal}"[:1000],
                        generation,
                        prev_conditions,
                    )
                )
                requeue = min(requeue or REVISION_RETRY_S, REVISION_RETRY_S)
        if unseen_wait is not None:  # to write it again if the watch never shows it
            requeue = min(requeue or unseen_wait, unseen_wait)
        await self._write_status(obj, prev_status, new_status)
        RECONCILES.labels("ok").inc()
        return requeue

    async def _creation_failures(
        self, key: str, namespace: str, name: str, roles: list[st.RoleObservation]
    ) -> dict[str, str]:
        """Per role lacking groups for FAILURE_GRACE_S, why its LWS or StatefulSets could not
        create them (their FailedCreate warnings since this process last changed the LWS)."""
        now = time.monotonic()
        wall = dt.datetime.now(dt.UTC)
        lacking: dict[str, str] = {}
        since: dict[str, dt.datetime | None] = {}
        for r in roles:
            lws = self.caches.children[LWS].get(namespace, lws_name(name, r.name)) if r.exists else None
            if lws is None or not _lacking(r):
                continue
            created = st.parse_rfc3339((lws.get("metadata") or {}).get("creationTimestamp"))
            changed = self._lws_changed_at.get(key, {}).get(lws["metadata"]["name"])
            # After a restart this process has no record: the LWS's own managedFields do.
            applied = last_applied(lws, self.api.field_manager)
            start = max((t for t in (created, changed, applied) if t is not None), default=None)
            if start is not None and (wall - start).total_seconds() < FAILURE_GRACE_S:
                continue  # groups take a moment to appear: do not read events for every new group
            lacking[r.name] = lws["metadata"]["name"]
            since[r.name] = start
        if not lacking:
            return {}
        events = await self._failed_create_warnings(namespace, now)
        return creation_failures(events, lacking, since) if events is not None else {}

    async def _add_pod_trouble(
        self,
        status: dict[str, Any],
        key: str,
        roles: list[st.RoleObservation],
        generation: int,
        prev: dict[str, Any],
    ) -> bool:
        """Add ReplicaFailure (groups that cannot be created) and PodsUnschedulable (pods that find
        no node) to `status` while they hold, and set the latter's gauge. Returns whether to look
        again in FAILURE_CHECK_S: pod events do not reconcile, so the warnings and the pods'
        scheduling are read again on a timer while a role lacks ready groups or pods are unplaced."""
        namespace, name = key.split("/", 1)
        failing = await self._creation_failures(key, namespace, name, roles)
        unplaced = self._unschedulable(namespace, name, roles)
        PODS_UNSCHEDULABLE.labels(namespace, name).set(1 if unplaced else 0)
        for ctype, reason, found in (
            (st.REPLICA_FAILURE, FAILED_CREATE, failing),
            (st.PODS_UNSCHEDULABLE, UNSCHEDULABLE, unplaced),
        ):
            if found:
                message = "; ".join(f"{role}: {msg}" for role, msg in sorted(found.items()))[:2000]
                status["conditions"].append(
                    st.condition(ctype, True, reason, message, generation, prev.get("conditions") or [])
                )
        return bool(unplaced) or any(r.exists and _lacking(r) for r in roles)

    def _unschedulable(self, namespace: str, name: str, roles: list[st.RoleObservation]) -> dict[str, str]:
        """Per role, what its pods the scheduler could not place say (also a rollout's surge groups,
        which leave the ready count at the desired one)."""
        if self.caches.pods is None:
            return {}
        now = dt.datetime.now(dt.UTC)
        out = {}
        for r in roles:
            if not r.exists:
                continue
            found = unschedulable(
                self.caches.pods.list(namespace, {LABEL_GROUP: name, LABEL_ROLE: r.name}), now
            )
            if found is not None:
                out[r.name] = found
        return out

    async def _failed_create_warnings(self, namespace: str, now: float) -> list[dict[str, Any]] | None:
        """The namespace's FailedCreate warnings, listed at most every FAILURE_CHECK_S for all its
        groups together (None if unreadable). One list per group lacking groups, each a scan of the
        namespace's events in the apiserver, made 500 new groups in one namespace swamp it: the
        lists slowed the pods' readiness, which kept more groups lacking and listing."""
        for ns in [ns for ns, (t, _) in self._warnings.items() if now - t >= FAILURE_CHECK_S]:
            del self._warnings[ns]  # stale: listed again when needed, not kept for the process's life
        cached = self._warnings.get(namespace)
        if cached is not None:
            return cached[1]
        listing = self._warnings_listing.get(namespace)
        if listing is None:
            listing = asyncio.ensure_future(self._list_warnings(namespace))
            self._warnings_listing[namespace] = listing
            listing.add_done_callback(lambda f: self._listed(namespace, f))
        return await asyncio.shield(listing)  # a cancelled reconcile must not cancel the others' list

    def _listed(self, namespace: str, listing: asyncio.Future[list[dict[str, Any]] | None]) -> None:
        self._warnings_listing.pop(namespace, None)
        if not listing.cancelled() and listing.exception() is not None:
            # Its waiters got it, unless all were cancelled (a shutdown): then it is logged here.
            log.debug("%s: listing FailedCreate warnings failed", namespace, exc_info=listing.exception())

    async def _list_warnings(self, namespace: str) -> list[dict[str, Any]] | None:
        events: list[dict[str, Any]] | None
        try:
            events, _ = await self.api.list(
                CORE_EVENT, namespace, field_selector=f"type=Warning,reason={FAILED_CREATE}"
            )
        except (ApiError, httpx2.HTTPError) as e:
            # Unreadable is cached too: a timing-out apiserver must not be asked again at once.
            log.debug("%s: FailedCreate warnings not readable: %s", namespace, e)
            events = None
        # Stamped when the list ends: a slow list must not leave its waiters a shorter cache.
        self._warnings[namespace] = (time.monotonic(), events)
        return events

    # ------------------------------------------------------------------ rollout
    async def _plan_rollout(
        self, sg: ServingGroup, key: str, namespace: str, name: str, overrides: dict[str, RoleOverride]
    ) -> rlive.RolloutPlan:
        """Ask the planner for this pass's partitions/replicas (no-op when no rollout is active)."""
        update_revision = self._revision(key, sg)
        roles = []
        for role in sg.spec.roles:
            if str(role.type) not in KV_TYPES:
                continue
            desired = overrides[role.name].replicas if role.name in overrides else role.replicas
            lws = self.caches.children[LWS].get(namespace, lws_name(name, role.name))
            roles.append(rlive.LiveRole(role.name, str(role.type), int(desired or 0), lws))
        if not rlive.is_rolling(roles, update_revision) or self.caches.pods is None:
            self.rolling.discard(key)
            self._progress.pop(key, None)
            self._written_steps.pop(key, None)
            self._counted_steps.pop(key, None)
            self._old_down_since.pop(key, None)
            return rlive.RolloutPlan(False, {}, None)
        self.rolling.add(key)
        size = {r.name: r.size for r in sg.spec.roles}
        roles = [
            rlive.LiveRole(
                r.name,
                r.type,
                r.desired,
                r.lws,
                rlive.group_states(
                    self.caches.pods.list(namespace, {LABEL_GROUP: name, LABEL_ROLE: r.name}), size[r.name]
                ),
            )
            for r in roles
        ]
        spec = rollout_spec(sg, honour_pause=True, desired={r.name: r.desired for r in roles})
        # In a thread: the first decision of a large rollout searches for seconds (later ones hit the
        # planner's cache), and the event loop must keep renewing the Lease and serving other keys.
        written, at = self._written_steps.get(key, (None, 0.0))
        now = time.monotonic()
        lag = written is not None and now - at < WATCH_LAG_S
        down_for = now - self._old_down_since.get(key, now)
        base = sg.status.current_revision if sg.status is not None else None
        plan = await asyncio.to_thread(rlive.plan, roles, update_revision, spec, written, lag, down_for, base)
        assert plan.decision is not None
        if old_revision_serving_nothing(plan.observations):
            self._old_down_since.setdefault(key, now)
        else:
            self._old_down_since.pop(key, None)
        if plan.decision.kind == "done":
            # The plain render drops every record; a step written before must not be held after it.
            self._written_steps.pop(key, None)
            self._counted_steps.pop(key, None)
        COHORT_DEVIATION.labels(namespace, name).set(
            rlive.max_cohort_deviation(plan.cohorts, spec.ratio_p, spec.ratio_d)
        )
        return plan

    def _announce_step(self, key: str, namespace: str, name: str, plan: rlive.RolloutPlan) -> None:
        """A RolloutStep event and the step counter, for a step about to be written (after the dry
        run: a step the API refuses outright was never taken)."""
        if plan.decision is None or plan.decision.kind != "step":
            return
        step = (plan.step.revision, plan.step.number) if plan.step is not None else None
        if step is None or self._counted_steps.get(key) != step:
            ROLLOUT_STEPS.labels(namespace, name).inc()
        if step is not None:
            self._counted_steps[key] = step
        moves = ", ".join(f"{n} replicas={r} partition={k}" for n, (r, k) in sorted(plan.actions.items()))
        was = ", ".join(
            f"{o.name} {o.replicas}/{o.partition}" for o in sorted(plan.observations, key=lambda o: o.name)
        )
        moves = f"{moves} (was {was})"
        if step is not None:
            # Two steps with the same moves (a new revision's first after a failed one) are two.
            moves = f"{moves} [step {step[1]} to revision {step[0]}]"
        obj = self.caches.groups.get(namespace, name)
        if obj is not None:
            # One series: a write retried from the same state repeats its event word for word.
            self.events.emit_soon(
                obj, "Normal", "RolloutStep", f"{plan.decision.reason}: {moves}", series="RolloutStep"
            )

    async def _record_revision(self, obj: dict[str, Any], revision: str) -> str | None:
        """Keep the spec of a new update revision as a ControllerRevision (for `pdorch rollback`).

        The API's refusal, or None once recorded; the caller retries on later passes."""
        md = obj["metadata"]
        try:
            items, _ = await self.api.list(
                CONTROLLER_REVISION, md["namespace"], selector_string({LABEL_GROUP: md["name"]})
            )
            existing = history.owned_records(items, md.get("uid"))
            ours = {c["metadata"]["name"] for c in existing}
            for c in history.owned_records(items):
                if c["metadata"]["name"] not in ours:
                    # An earlier group of this name's record, which would take this one's name.
                    await self.api.delete(
                        CONTROLLER_REVISION,
                        c["metadata"]["name"],
                        md["namespace"],
                        uid=c["metadata"].get("uid"),
                    )
            stale = history.stale_record(existing, revision)
            if stale is not None:
                # Back to an older revision: record it again as the newest (same name, so the old
                # record goes first; the retry path re-creates it should the create fail).
                await self.api.delete(CONTROLLER_REVISION, stale["metadata"]["name"], md["namespace"])
                existing.remove(stale)
            if not any(history.revision_of_object(c) == revision for c in existing):
                record = history.revision_object(obj, revision, history.next_number(existing))
                try:
                    await self.api.create(record)
                except ApiError as e:
                    if e.code != 409:
                        raise
                    # Named after the revision, so it is this record, written since the list
                    # was served (a list from the apiserver's cache may lag a create).
                existing.append(record)
            for old in history.to_prune(existing, keep=revision):
                await self.api.delete(CONTROLLER_REVISION, old, md["namespace"])
        except ApiError as e:
            # Rollouts do not depend on the history (only `pdorch rollback` does): go on, retry later.
            log.warning("could not record revision %s of %s/%s: %s", revision, md["namespace"], md["name"], e)
            return f"{e.code}: {e.message}"
        return None

    def _revision(self, key: str, sg: ServingGroup) -> str:
        """The update revision; reused from the render cache when the group did not change."""
        cached = self._renders.get(key)
        version = self._models.get(key)
        if cached is not None and version is not None and cached.key[:2] == version[0]:
            return cached.revision
        return compute_revision(sg.spec)

    def _rollout_status(
        self,
        sg: ServingGroup,
        key: str,
        obj: dict[str, Any],
        generation: int,
        prev: dict[str, Any],
        status: dict[str, Any],
        plan: rlive.RolloutPlan,
    ) -> float | None:
        """Add RolloutStalled and the planner's reason to `status`; the requeue delay while rolling."""
        conds = status["conditions"]
        prev_conds = prev.get("conditions") or []
        if not plan.active or plan.decision is None:
            # A finished rollout must not leave its last deviation or stall on the dashboards.
            ns = sg.metadata.namespace or ""
            ROLLOUT_STALLED.labels(ns, sg.name).set(0)
            COHORT_DEVIATION.labels(ns, sg.name).set(0)
            conds.append(
                st.condition(
                    st.ROLLOUT_STALLED, False, "NoRollout", "no rollout in progress", generation, prev_conds
                )
            )
            return None
        decision = plan.decision
        for c in conds:
            if c["type"] == st.PROGRESSING and c["status"] == "True":
                c["message"] = f"{c['message']}; planner: {decision.kind}: {decision.reason}"[:1000]
        # A stall is no progress (`st.progress_mark`) for longer than progressDeadlineSeconds, or a
        # plan the planner says cannot finish.
        step = st.rollout_position(
            plan.actions if decision.kind == "step" else None,
            {o.name: (o.replicas, o.partition) for o in plan.observations},
        )
        ready = (
            sum(o.new_ready for o in plan.observations),
            sum(o.old_ready + o.new_ready for o in plan.observations),
        )
        now = time.monotonic()
        seen = self._progress.get(key)
        if seen is None and (resumed := st.resumed_progress(prev, status, dt.datetime.now(dt.UTC))):
            seen = (step, ready, now - resumed[1], resumed[0])
        else:
            seen = st.progress_mark(seen, step, ready, now, st.now_rfc3339)
        self._progress[key] = seen
        status["lastProgressTime"] = seen[3]
        deadline = sg.spec.rollout_strategy.progress_deadline_seconds if sg.spec.rollout_strategy else 600
        stalled = st.stalled_condition(
            decision.kind, decision.reason, now - seen[2], deadline, seen[3], generation, prev_conds
        )
        ROLLOUT_STALLED.labels(sg.metadata.namespace or "", sg.name).set(
            1 if stalled["status"] == "True" else 0
        )
        conds.append(stalled)
        # Pod events drive the next step; this requeue also checks the deadline without any event.
        return 5.0 if decision.kind in ("wait", "step") else float(min(deadline, 30))

    # ------------------------------------------------------------------ pieces
    def _scaled(
        self,
        key: str,
        role: Role,
        srs: dict[str, Any] | None,
        lws: dict[str, Any] | None,
        last_desired: int | None,
    ) -> tuple[int | None, int | None]:
        """An autoscaled role's LWS replicas (`scaled_replicas`; None: roles[].replicas applies) and
        the size it is held at above a lowered maxReplicas (`held_for_drain`), or None.

        The hold waits for pdorch's scaler to drain the groups above the bound; without a scaler,
        or with its metrics unreadable, nothing drains, so after MAX_DRAIN_HOLD_S the bound applies
        as it does for External roles."""
        held = held_for_drain(role, srs, lws, last_desired)
        since = self._drain_hold_since.setdefault(key, {})
        if held is None:
            since.pop(role.name, None)
        elif time.monotonic() - since.setdefault(role.name, time.monotonic()) >= MAX_DRAIN_HOLD_S:
            held = None  # ran out
        if not since:
            del self._drain_hold_since[key]
        if held is not None:
            return held, held
        return scaled_replicas(role, srs, lws, last_desired, hold_for_drain=False), None

    def _overrides(self, sg: ServingGroup, namespace: str, name: str) -> dict[str, RoleOverride]:
        """Replicas of External/Builtin roles come from their ServingRoleScaler (HPA, KEDA, ours),
        within the role's minReplicas/maxReplicas (a `kubectl scale` beyond them does not pass).
        A role whose scaler is missing while its LWS runs keeps the LWS's size, less a rollout's
        surge (`scaled_replicas`)."""
        out: dict[str, RoleOverride] = {}
        last_desired = status_desired(sg)
        # A role no longer autoscaled, or removed, is held no longer (its time would requeue the
        # group every second once it ran out).
        if since := self._drain_hold_since.get(f"{namespace}/{name}"):
            for gone in since.keys() - {r.name for r in sg.spec.roles if needs_scaler(r)}:
                del since[gone]
        for role in sg.spec.roles:
            if not needs_scaler(role):
                continue
            srs = self.caches.children[SERVING_ROLE_SCALER].get(namespace, scaler_name(name, role.name))
            lws = self.caches.children[LWS].get(namespace, lws_name(name, role.name))
            replicas, _ = self._scaled(f"{namespace}/{name}", role, srs, lws, last_desired.get(role.name))
            if replicas is not None:
                # A scaler created now starts there too (not at roles[].replicas).
                out[role.name] = RoleOverride(
                    replicas=replicas, scaler_replicas=replicas if srs is None else None
                )
        return out

    def forget(self, res: Resource, namespace: str, name: str) -> None:
        """A child was deleted: the next pass must not trust our record of having written it."""
        self._applied.pop((res.plural, namespace, name), None)

    async def _ours_unlabelled(self, intent: dict[str, Any]) -> bool:
        """Whether the object of `intent`'s name that the watch does not show is this group's own
        (its controller owner uid is the group's), with its managed-by label removed by hand: the
        watch selects by that label, so to it the object was deleted."""
        md = intent["metadata"]
        found, _ = await self.api.list(
            resource_of(intent), md.get("namespace"), field_selector=f"metadata.name={md['name']}"
        )
        owner = next((r.get("uid") for r in md.get("ownerReferences") or [] if r.get("controller")), None)
        return owner is not None and any(
            r.get("controller") and r.get("uid") == owner
            for c in found
            for r in (c.get("metadata") or {}).get("ownerReferences") or []
        )

    async def _dry_run(
        self, key: str, items: list[tuple[dict[str, Any], dict[str, Any] | None, bool]]
    ) -> str | None:
        """Server-side dry runs, concurrently (a create for objects never seen, so a name taken by
        an object pdorch does not manage is found); the first refusal's message, or None."""

        async def dry(o: dict[str, Any], live: dict[str, Any] | None, unseen: bool) -> None:
            if unseen:
                await self.api.create(o, dry_run=True)
            else:
                await self._write(o, live, dry_run=True)

        async def one(o: dict[str, Any], live: dict[str, Any] | None, unseen: bool) -> str | None:
            try:
                if o["kind"] != LWS.kind:
                    await dry(o, live, unseen)
                    return None
                # The templates' check goes alongside the LWS's own dry run, not after it: on the
                # creation path of a new group the two round trips were in series.
                lws_result, refused = await asyncio.gather(
                    dry(o, live, unseen), self._templates_refused(key, o), return_exceptions=True
                )
                if isinstance(lws_result, BaseException):
                    raise lws_result  # the LWS's own refusal reads first
                if isinstance(refused, BaseException):
                    raise refused
                return refused
            except ApiError as e:
                if e.code == 409 and unseen and e.reason == "AlreadyExists":
                    if await self._ours_unlabelled(o):
                        return None  # the apply takes it back, labels included
                    return _name_clash(o, "exists and is not managed by this ServingGroup")
                if o["kind"] not in USER_CONTENT_KINDS:
                    return None  # only probed for its name: the real write reports the rest (quota...)
                if e.code == 404:
                    return None  # depends on an object the dry run did not create; the real apply decides
                if _is_refusal(e):
                    return f"{o['kind']} {o['metadata']['name']} was refused by the API server: {e.message}"
                raise
            return None

        for message in await asyncio.gather(*(one(o, live, unseen) for o, live, unseen in items)):
            if message is not None:
                return message
        return None

    async def _templates_refused(self, key: str, lws: dict[str, Any]) -> str | None:
        """Why the pod validation of the StatefulSets LWS would create refuses this LWS's templates,
        or None. LWS's admission checks a template's shape only, so a volumeMount naming no volume
        (say) surfaced as a StatefulSet refusal after the rollout had begun, and only in LWS's
        events. A dry-run PodTemplate per template gets the same validation before anything moves.
        Templates once accepted are not checked again (a rollout step rewrites only partitions)."""
        md, lwt = lws["metadata"], lws["spec"]["leaderWorkerTemplate"]
        templates = {f: lwt[f] for f in ("leaderTemplate", "workerTemplate") if lwt.get(f) is not None}
        claims = [
            n for c in lwt.get("volumeClaimTemplates") or [] if (n := (c.get("metadata") or {}).get("name"))
        ]
        passed = self._templates_passed.setdefault(key, {})
        h = intent_hash({"templates": templates, "claims": claims})
        if passed.get(md["name"]) == h:
            return None

        async def probe(f: str, template: dict[str, Any]) -> str | None:
            try:
                await self.api.create(
                    {
                        "apiVersion": "v1",
                        "kind": POD_TEMPLATE.kind,
                        "metadata": {"generateName": f"{md['name']}-", "namespace": md["namespace"]},
                        "template": _with_claim_volumes(template, claims),
                    },
                    dry_run=True,
                )
            except ApiError as e:
                if e.code == 422:  # field validation; quota or RBAC refusals say nothing about the spec
                    detail = e.message.partition(" is invalid: ")[2] or e.message
                    role = (md.get("labels") or {}).get(LABEL_ROLE, md["name"])
                    return f"roles[{role}].{f} is refused by the API server: {detail.replace('template.spec.', 'spec.')}"
                raise
            return None

        # Every probe's answer is read: field validation runs before quota admission, so one
        # template can be refused (422) while the other's probe is forbidden (403).
        found = await asyncio.gather(*(probe(f, t) for f, t in templates.items()), return_exceptions=True)
        refusal = next((r for r in found if isinstance(r, str)), None)
        if refusal is not None:
            return refusal
        for r in found:
            if isinstance(r, BaseException) and not isinstance(r, ApiError):
                raise r
        errors = [r for r in found if isinstance(r, ApiError)]
        if errors:
            log.warning(
                "%s: cannot check the templates of %s (%s); relying on LWS", key, md["name"], errors[0]
            )
            if all(e.code == 403 for e in errors) and len(errors) == len(found):
                # RBAC without podtemplates, or a namespace being deleted: asking again on every
                # write of this LWS would cost two requests each and say nothing new. A template
                # change asks again.
                passed[md["name"]] = h
            return None
        passed[md["name"]] = h
        return None

    async def _write(
        self, intent: dict[str, Any], live: dict[str, Any] | None, dry_run: bool
    ) -> tuple[dict[str, Any], bool]:
        """Write `intent`: the object as written, and whether this write created it (an object the
        watch does not show may exist: one whose managed-by label was removed is taken back)."""
        if intent["kind"] == SERVING_ROLE_SCALER.kind and live is None:
            # Created with a plain POST so `spec.replicas` is not owned by our apply: HPA/KEDA own it.
            try:
                return await self.api.create(intent, dry_run=dry_run), True
            except ApiError as e:
                if e.code != 409:
                    raise
            # It exists, unseen by the watch (its managed-by label removed by hand): taking it back
            # must not take its replicas from whoever scales it.
            intent = _without_scaler_replicas(intent, {})
        return await self.api.apply_created(intent, dry_run=dry_run)

    async def _prune(self, owner: dict[str, Any], desired: list[dict[str, Any]]) -> list[str]:
        md = owner["metadata"]
        want = {(d["kind"], d["metadata"]["name"]) for d in desired}
        pruned = []
        for res, inf in self.caches.children.items():
            for child in inf.list(md["namespace"], {LABEL_GROUP: md["name"]}):
                refs = child["metadata"].get("ownerReferences") or []
                if not any(r.get("uid") == md.get("uid") and r.get("controller") for r in refs):
                    continue  # not ours (same label by accident): never delete it
                if (res.kind, child["metadata"]["name"]) in want:
                    continue
                if await self.api.delete(
                    res, child["metadata"]["name"], md["namespace"], uid=child["metadata"].get("uid")
                ):
                    pruned.append(f"{res.kind}/{child['metadata']['name']}")
        return pruned

    async def _sync_scaler_status(
        self,
        sg: ServingGroup,
        namespace: str,
        name: str,
        scaled: dict[str, RoleOverride],
        rolling: set[str],
        stuck: str | None = None,
    ) -> None:
        """ServingRoleScaler status: replicas, the pod selector HPA needs (a string), the generation
        whose replicas the LWS got, and ScalingLimited. `scaled` is what this pass read from the
        scalers; `rolling` the roles whose LWS a rollout sized instead; `stuck` why that rollout
        takes no step (paused, blocked, or stalled while it waits)."""
        last_desired = status_desired(sg)
        for role in sg.spec.roles:
            srs = self.caches.children[SERVING_ROLE_SCALER].get(namespace, scaler_name(name, role.name))
            if srs is None or not needs_scaler(role):
                continue
            assert role.scaling is not None  # needs_scaler
            lws = self.caches.children[LWS].get(namespace, lws_name(name, role.name))
            applied = scaled[role.name].replicas if role.name in scaled else None
            # Read again, not carried from `scaled`: the cache may hold a newer scaler by now.
            replicas, held = self._scaled(f"{namespace}/{name}", role, srs, lws, last_desired.get(role.name))
            if replicas != applied:
                continue  # the cache holds a newer scaler than this pass read: the next pass acts on it
            want = st.scaler_status(
                (role.scaling.min_replicas, role.scaling.max_replicas),
                srs,
                int(((lws or {}).get("status") or {}).get("replicas") or 0),
                selector_string(leader_selector(name, role.name)),
                applied=role.name not in rolling,
                held_for_drain=held,
                hold_limit_s=MAX_DRAIN_HOLD_S,
                held_by_rollout=stuck if role.name in rolling else None,
            )
            have = srs.get("status") or {}
            if not _status_differs(have, want):
                continue
            await self.api.apply(
                {
                    "apiVersion": srs["apiVersion"],
                    "kind": srs["kind"],
                    "metadata": {"name": srs["metadata"]["name"], "namespace": namespace},
                    # Only the fields the controller owns: re-applying the scaler's lastScale* from
                    # this cache would co-own them and could force an older reason over a newer one.
                    "status": want,
                },
                subresource="status",
            )
            was = st.find_condition(have.get("conditions") or [], st.SCALING_LIMITED) or {}
            now = want["conditions"][0]
            if now["status"] == "True" and (
                was.get("status") != "True" or was.get("reason") != now["reason"]
            ):
                self.events.emit_soon(srs, "Warning", now["reason"], now["message"], action="Scale")

    async def _apply_failed(
        self, obj: dict[str, Any], generation: int, prev: dict[str, Any], message: str
    ) -> None:
        """Say in status why the group does not converge (the error is retried with backoff)."""
        conds = [c for c in (prev.get("conditions") or []) if c.get("type") != st.PROGRESSING]
        conds.append(
            st.condition(
                st.PROGRESSING,
                False,
                st.APPLY_FAILED,
                message[:1000],
                generation,
                prev.get("conditions") or [],
            )
        )
        summary = {**(prev.get("summary") or {}), "rollout": st.rollout_state(conds)}
        new = {**prev, "summary": summary, "conditions": conds}
        try:
            if await self._write_status(obj, prev, new):
                self.events.emit_soon(obj, "Warning", st.APPLY_FAILED, message[:1000])
        except ApiError:
            log.debug("could not record ApplyFailed on %s", obj["metadata"]["name"])

    async def _invalid(
        self,
        obj: dict[str, Any],
        generation: int,
        prev: dict[str, Any],
        message: str,
        desired: dict[str, int] | None = None,
    ) -> float | None:
        """Report an invalid spec, with what the existing LWS (still serving) look like meanwhile.

        `desired` per role when the spec parsed (else the last accepted desired counts are kept).
        Returns when to look again: while pods find no node or a role lacks ready groups (pod
        events do not reconcile), as for a valid spec."""
        if len(message) > MAX_INVALID_MESSAGE:
            # The CRD caps a condition message; past it the status write, and so the report, fails.
            message = message[: MAX_INVALID_MESSAGE - 1] + "…"
        observed = self._observe_children(obj, prev, desired)
        _record_ratio(obj, observed)  # a decode outage under an invalid spec still shows
        new = st.compute_status(generation, observed, "", prev, invalid=message)
        # Groups the existing LWS cannot create, or pods they run that find no node: an invalid
        # spec does not resolve either (dropped, the conditions read as resolved).
        md = obj["metadata"]
        # The status carries no RolloutStalled while invalid (nothing is rolled out): nor does the
        # gauge, which kept its last value.
        ROLLOUT_STALLED.labels(md["namespace"], md["name"]).set(0)
        again = await self._add_pod_trouble(
            new, f"{md['namespace']}/{md['name']}", observed, generation, prev
        )
        before = st.find_condition(prev.get("conditions") or [], st.INVALID) or {}
        if await self._write_status(obj, prev, new) and (
            before.get("status") != "True" or before.get("message") != message
        ):
            # One Warning per new refusal (the Invalid transition itself is not repeated as an
            # event); readiness changes while invalid rewrite status but are not new refusals.
            self.events.emit_soon(obj, "Warning", "InvalidSpec", message, series=st.INVALID)
        RECONCILES.labels("invalid").inc()
        return FAILURE_CHECK_S if again else None

    def _observe_children(
        self, obj: dict[str, Any], prev: dict[str, Any], desired: dict[str, int] | None
    ) -> list[st.RoleObservation]:
        """The group's LWS as they are, for status while nothing is applied (an invalid spec)."""
        md = obj["metadata"]
        prev_roles = [r for r in prev.get("roles") or [] if isinstance(r, dict)]
        prev_desired = {r.get("name"): r.get("desiredReplicas") for r in prev_roles}
        order = [r.get("name") for r in prev_roles]
        out = []
        for lws in self.caches.children[LWS].list(md["namespace"], {LABEL_GROUP: md["name"]}):
            refs = lws["metadata"].get("ownerReferences") or []
            if not any(r.get("uid") == md.get("uid") and r.get("controller") for r in refs):
                continue
            labels = lws["metadata"].get("labels") or {}
            role, rtype = labels.get(LABEL_ROLE), labels.get(LABEL_ROLE_TYPE)
            if not role or not rtype:
                continue
            want = (desired or {}).get(role, prev_desired.get(role))
            if want is None:
                want = int((lws.get("spec") or {}).get("replicas") or 0)
            out.append(st.observe_role(role, rtype, int(want), lws))
        rank = {n: i for i, n in enumerate([*(desired or {}), *order])}
        return sorted(out, key=lambda r: (rank.get(r.name, len(rank)), r.name))

    async def _write_status(self, obj: dict[str, Any], prev: dict[str, Any], new: dict[str, Any]) -> bool:
        if _same_status(prev, new):
            return False
        md = obj["metadata"]
        await self.api.apply(
            {
                "apiVersion": SERVING_GROUP.api_version,
                "kind": SERVING_GROUP.kind,
                "metadata": {"name": md["name"], "namespace": md["namespace"]},
                "status": new,
            },
            subresource="status",
        )
        for etype, reason, note, series in st.transition_events(prev, new):
            # A repeat is the same flip (its message's counts may differ when re-read from a stale
            # cache).
            self.events.emit_soon(obj, etype, reason, note, series=series, same_as=note.partition(": ")[0])
        return True


def foreign_owner(live: dict[str, Any], uid: str) -> tuple[str, str] | None:
    """(kind, name) of the controller that owns `live` when it is not the group `uid`, else None."""
    for ref in (live.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return None if ref.get("uid") == uid else (str(ref.get("kind")), str(ref.get("name")))
    return None


def _lacking(r: st.RoleObservation) -> bool:
    """Whether a role has fewer ready groups than it asks for, a rollout's surge groups included
    (surge groups that cannot be created, or whose workers cannot, leave the ready count at the
    desired one). Counted by readiness, not creation: LWS counts a group once its leader exists."""
    return r.ready < r.desired + r.surge


def _name_clash(intent: dict[str, Any], what: str) -> str:
    return (
        f"{intent['kind']} {intent['metadata']['name']} {what}: objects are named <group>-<role> (the "
        "proxy's Service <group>, and LWS names a headless Service after each LeaderWorkerSet), so "
        "another group or object already uses this name; rename this group or the role"
    )


def _with_claim_volumes(template: dict[str, Any], claims: list[str]) -> dict[str, Any]:
    """`template` with a placeholder volume per claim template: the StatefulSet gives its pods a
    volume per claim, so a volumeMount naming a claim template is valid there, and must be in a
    bare pod template's validation."""
    if not claims:
        return template
    spec = template.get("spec") or {}
    # The StatefulSet replaces a template volume of a claim's name with the claim, as here.
    kept = [v for v in spec.get("volumes") or [] if not (isinstance(v, dict) and v.get("name") in claims)]
    return {**template, "spec": {**spec, "volumes": [*kept, *({"name": c, "emptyDir": {}} for c in claims)]}}


def _is_refusal(e: ApiError) -> bool:
    """Whether an API error means "this object is wrong" (fix the spec), not "try again later"."""
    if 400 <= e.code < 500 and e.code not in (404, 408, 409, 429):
        return True
    # Server-side apply reports schema type mismatches as a 500 before any admission runs; the
    # error is deterministic, so retrying would loop forever.
    return e.code == 500 and "failed to create typed patch object" in e.message


def _same_status(prev: dict[str, Any], new: dict[str, Any]) -> bool:
    # Only pdorch writes this status, so the live copy holds exactly what we last wrote.
    return prev == new


def _status_differs(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether a status apply of `want` would change `have` (conditions compared per type, so
    conditions other writers own do not count)."""
    for key, value in want.items():
        if key != "conditions":
            if have.get(key) != value:
                return True
        elif any(st.find_condition(have.get("conditions") or [], c["type"]) != c for c in value):
            return True
    return False


def _without_scaler_replicas(intent: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    if intent["kind"] != SERVING_ROLE_SCALER.kind or live is None:
        return intent
    spec = {k: v for k, v in (intent.get("spec") or {}).items() if k != "replicas"}
    return {**intent, "spec": spec}


def declared_ratio(spec: Any) -> tuple[int, int] | None:
    """`spec.ratio` as (prefill, decode) from a spec's raw JSON, when it is two positive integers
    (also read from a spec the models refused, so the gauge keeps moving while it is Invalid)."""
    ratio = spec.get("ratio") if isinstance(spec, dict) else None
    if not isinstance(ratio, dict):
        return None
    p, d = ratio.get("prefill"), ratio.get("decode")
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (p, d))
    return (p, d) if ok else None


def ratio_deviation(declared: tuple[int, int] | None, roles: list[st.RoleObservation]) -> float:
    """|log(ready P:D / declared P:D)| (the desired counts' ratio when none is declared); 1.0 when
    a side has no ready group (no P:D pair can form, as the rollout cohort gauge counts a one-sided
    cohort), 0 when there is no ratio to compare with."""
    p = sum(r.ready for r in roles if r.type == "prefill")
    d = sum(r.ready for r in roles if r.type == "decode")
    wp = sum(r.desired for r in roles if r.type == "prefill")
    wd = sum(r.desired for r in roles if r.type == "decode")
    if declared is not None:
        wp, wd = declared
    if not (wp and wd):
        return 0.0
    if not (p and d):
        return 1.0
    return abs(math.log((p / d) / (wp / wd)))


def _record_ratio(obj: dict[str, Any], roles: list[st.RoleObservation]) -> None:
    md = obj["metadata"]
    deviation = ratio_deviation(declared_ratio(obj.get("spec")), roles)
    RATIO_DEVIATION.labels(md.get("namespace", "default"), md["name"]).set(deviation)


def forget_group_metrics(namespace: str, name: str) -> None:
    """Drop every per-group series of a deleted group (a gauge would keep its last value forever)."""
    for metric in (RATIO_DEVIATION, ROLLOUT_STEPS, COHORT_DEVIATION, ROLLOUT_STALLED, PODS_UNSCHEDULABLE):
        try:
            metric.remove(namespace, name)
        except KeyError:
            pass  # never recorded for this group


def _desired(sg: ServingGroup, scaled: dict[str, RoleOverride]) -> dict[str, int]:
    """Per role, the groups the operator asked for: the spec, or the ServingRoleScaler's count
    (`_overrides` only holds roles whose scaler set replicas)."""
    return {
        r.name: int((scaled[r.name].replicas if r.name in scaled else r.replicas) or 0) for r in sg.spec.roles
    }


def _validation_message(e: ValidationError) -> str:
    return "; ".join(format_validation_error(e)[:5])
