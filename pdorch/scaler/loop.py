"""The built-in autoscaler process: scrape, decide, write `/scale` (the I/O edge of pdorch.scaler).

Every `interval_s`, for each ServingGroup role with `scaling.mode: Builtin`:
1. list the role's leader pods and scrape the ready ones (`sources`);
2. turn two consecutive scrapes into a `RoleLoad` and run the SLO policy (`policy`) for the load it
   forecasts over the next pod start-up window (`forecast`, from the role's recent history), then
   the role's stabilization windows, cooldown and bounds (`damping`) and the group's ratio band
   (`ratio`);
3. scale up at once through `ServingRoleScaler/<group>-<role>/scale`; scale down by draining first:
   the leader pods of the groups LWS will remove (highest group indices) get the
   `pdorch.io/draining` annotation, the proxy stops routing to them, and `/scale` is lowered once
   their engines report nothing running or waiting (or after `drain_timeout_s`);
4. record why in `status.lastScaleReason`/`lastScaleTime`, a Kubernetes Event and Prometheus metrics.

A size the scaler did not write (`kubectl scale`, an HPA on the same object: `ownership`) is the
role's new baseline: a drain under way is cancelled and the cooldown and scale-down window start
from it; another writer that keeps replacing the scaler's sizes is a Warning `ConflictingScaler`.
While no leader's load can be read the role is held, its load gauges are removed and its
ServingRoleScaler says `ScalingActive=False` (reason `MetricsUnavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from pydantic import ValidationError

from pdorch.api.scaler import KIND as SCALER_KIND
from pdorch.api.servinggroup import API_VERSION, Role, RoleType, Scaling, ScalingMode, ServingGroup
from pdorch.cli_errors import CliError
from pdorch.controller.events import SCALER_REPORTING_CONTROLLER, EventRecorder
from pdorch.controller.kubeapi import POD, SERVING_GROUP, SERVING_ROLE_SCALER, ApiError, KubeApi, NotLeader
from pdorch.controller.leader import LOST_LEASE_EXIT, LeaseElector, default_identity
from pdorch.controller.status import SCALING_ACTIVE, condition, find_condition, now_rfc3339
from pdorch.ops_endpoint import serve_ops_endpoint
from pdorch.proxy.discovery import endpoints_from_pods
from pdorch.proxy.endpoints import Endpoint
from pdorch.roles.labels import (
    ANNOTATION_DRAINING,
    LABEL_GROUP,
    LABEL_ROLE,
    LWS_GROUP_INDEX,
    LWS_WORKER_INDEX,
    leader_selector,
    selector_string,
)
from pdorch.roles.naming import scaler_name
from pdorch.roles.pods import is_terminating, started_since
from pdorch.scaler.damping import DampingConfig, DampingState, damp, rebaseline
from pdorch.scaler.observe import RoleLoad, Scraped, missed_target, pair_with_previous, role_load
from pdorch.scaler.ownership import (
    SizeOwnership,
    foreign_note,
    intend_size,
    replicas_manager,
    see_size,
    wrote_size,
)
from pdorch.scaler.policy import (
    Recommendation,
    RoleMemory,
    SloPolicyConfig,
    behind_prefill_queue,
    recommend_decode,
    recommend_prefill,
)
from pdorch.scaler.ratio import RatioBand, within_band
from pdorch.scaler.scrape import EngineSample
from pdorch.scaler.sources import DirectScrape, MetricsSource
from pdorch.sim.latency import DEFAULT_PRESET, Coefficients, load_coefficients

log = logging.getLogger(__name__)

# How long a stopping scaler may spend giving drained pods back to the proxy.
SHUTDOWN_UNDRAIN_S = 5.0
# How long the proxy may take to see a drain mark (its pod watch): a victim scraped earlier than
# that after the mark may have been sent requests since.
DRAIN_NOTICE_S = 2.0

DESIRED = Gauge(
    "pdorch_scaler_desired_replicas",
    "Replicas the scaler wants for the role now (written, drained towards, or held), set every decision.",
    ["namespace", "group", "role"],
)
# The two below are removed while no leader's load can be read: an old value is not the current one.
RECOMMENDED = Gauge(
    "pdorch_scaler_recommended_replicas", "Raw policy recommendation.", ["namespace", "group", "role"]
)
LOAD_RATE = Gauge(
    "pdorch_scaler_request_rate", "Observed request rate (req/s).", ["namespace", "group", "role"]
)
SCALE_EVENTS = Counter(
    "pdorch_scaler_scale_events_total", "Scale actions written.", ["namespace", "group", "role", "direction"]
)
SLO_MISSES = Counter(
    "pdorch_scaler_slo_misses_total",
    "Intervals whose mean TTFT (prefill) or inter-token latency (decode) was above the role's target.",
    ["namespace", "group", "role"],
)
SCRAPE_ERRORS = Counter(
    "pdorch_scaler_scrape_failures_total",
    "Ready leader pods whose metrics could not be read.",
    ["namespace", "group", "role"],
)

DRAIN_TIMEOUTS = Counter(
    "pdorch_scaler_drain_timeouts_total",
    "Scale-downs written when the drain timed out with victims still busy or unreadable.",
    ["namespace", "group", "role"],
)


_ROLE_SERIES: tuple[Gauge | Counter, ...] = (
    DESIRED,
    RECOMMENDED,
    LOAD_RATE,
    SLO_MISSES,
    SCRAPE_ERRORS,
    DRAIN_TIMEOUTS,
)


def _remove(metric: Gauge | Counter, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def _drop_series(ns: str, group: str, role: str) -> None:
    """Remove a forgotten role's series, so deleted groups leave no stale values or cardinality."""
    for metric in _ROLE_SERIES:
        _remove(metric, ns, group, role)
    for direction in ("up", "down"):
        _remove(SCALE_EVENTS, ns, group, role, direction)


def _drop_load_series(ns: str, group: str, role: str) -> None:
    """Remove the role's load and recommendation while they cannot be read: Prometheus then marks
    them stale (a gap in graphs, no sample for an alert's comparison) instead of reading an old
    value as the current one. NaN would be a sample: it turns sums over roles into NaN and makes
    every comparison false, which silences alerts without saying why."""
    for metric in (LOAD_RATE, RECOMMENDED):
        _remove(metric, ns, group, role)


@dataclass(frozen=True)
class ScalerConfig:
    """Settings of `pdorch scaler`."""

    kubeconfig: str | None = None
    namespace: str | None = None
    interval_s: float = 15.0
    coefficients: str = DEFAULT_PRESET
    drain_timeout_s: float = 300.0
    metrics_addr: str = "127.0.0.1:8090"
    prometheus_url: str | None = None
    # With prometheus_url: a CA bundle for its TLS, and a bearer token file (reread per query).
    prometheus_ca_file: str | None = None
    prometheus_token_file: str | None = None
    # Seconds from a scale-up to a serving pod (image pull, weights, engine start): the forecast
    # sizes each role for the load of the next start-up + one interval.
    pod_startup_s: float = 60.0
    # Several replicas may run (a standby takes over within a lease duration); one decides at a time.
    leader_elect: bool = False
    lease_namespace: str = "pdorch-system"
    lease_name: str = "pdorch-scaler"
    identity: str = ""


@dataclass
class RoleState:
    """Memory of one role between ticks."""

    prev: dict[str, EngineSample] = field(default_factory=dict)  # by endpoint URL
    before: dict[str, EngineSample] = field(default_factory=dict)  # the sample before `prev`'s
    prev_at: float | None = None
    prev_wall: float | None = None  # the same instant in Unix time, to compare with pods' Ready times
    # Endpoint URL -> when its metrics were last read (forgotten after an hour).
    read_at: dict[str, float] = field(default_factory=dict)
    damping: DampingState = field(default_factory=DampingState)
    memory: RoleMemory = field(default_factory=RoleMemory)
    draining_to: int | None = None
    drain_started: float = 0.0
    drain_started_wall: float = 0.0  # the same instant in Unix time, to compare with scrape times
    drain_idle: bool = False  # the victims were idle at the last drain check
    drain_idle_at: dict[str, float] = field(default_factory=dict)  # their samples' scrape times then
    drain_reason: str = ""
    # Ticks in a row without a decision: the first only takes a baseline (a new leader keeps the
    # drain marks an earlier one left, to carry on from them); past it, marks are cleared.
    undecided: int = 0
    # The cooldown as it was before this tick's decision: a scale-up whose write is refused did
    # not change anything, so its cooldown must not hold the next one back.
    cooldown_before: tuple[float | None, int] = (None, 0)
    # Who set the size: this scaler's writes against `kubectl scale`, an HPA...
    ownership: SizeOwnership = field(default_factory=SizeOwnership)

    def read(
        self,
        keys: Sequence[str],
        samples: Sequence[EngineSample | None],
        fresh: Collection[str],
        now: float,
        wall: float,
    ) -> tuple[Scraped, float | None]:
        """Pair this tick's samples with the role's earlier ones and remember them for the next
        tick; returns the pairs and when the previous tick read (None on the first)."""
        seen = pair_with_previous(self.prev, keys, samples, self.read_at, fresh, self.before, wall)
        last = self.prev_at
        self.prev, self.before, self.prev_at, self.prev_wall = seen.baselines, seen.before, now, wall
        self.read_at = {u: t for u, t in self.read_at.items() if now - t < 3600} | dict.fromkeys(
            seen.by_key, now
        )
        return seen, last


@dataclass(frozen=True)
class RoleDecision:
    """What one tick decided for one role (also returned for tests and logs)."""

    namespace: str
    group: str
    role: str
    current: int
    recommended: int
    target: int
    reason: str


def damping_config(role: Role) -> DampingConfig:
    """The role's `scaling` fields as a `DampingConfig`."""
    assert role.scaling is not None
    return damping_from_scaling(role.scaling)


def damping_from_scaling(s: Scaling) -> DampingConfig:
    """`scaling` fields as a `DampingConfig` (unset bounds: 1..1000; an unset minimum never
    exceeds the maximum)."""
    hi = s.max_replicas if s.max_replicas is not None else 1000
    return DampingConfig(
        min_replicas=s.min_replicas if s.min_replicas is not None else min(1, hi),
        max_replicas=hi,
        scale_up_stabilization_s=s.scale_up_stabilization_seconds,
        scale_down_stabilization_s=s.scale_down_stabilization_seconds,
        cooldown_s=s.cooldown_seconds,
        scale_down_after_miss_s=s.scale_down_after_miss_seconds,
    )


def group_policy(sg: ServingGroup, base: SloPolicyConfig) -> SloPolicyConfig:
    """The policy for a group's Builtin roles: the queued profile when its proxy holds prompts
    (``router.prefillQueue``: a burst's short prompts are protected, so prefill may run hotter)."""
    router = sg.spec.router
    return behind_prefill_queue(base) if router is not None and router.prefill_queue is not None else base


def recommend(
    role: Role,
    load: RoleLoad,
    c: Coefficients,
    cfg: SloPolicyConfig,
    memory: RoleMemory | None = None,
    now_s: float = 0.0,
) -> Recommendation:
    """The SLO policy for a Builtin prefill or decode role (`memory`: the role's history, kept by the caller)."""
    targets = role.scaling.targets if role.scaling else None
    mem = memory if memory is not None else RoleMemory()
    if role.type == RoleType.PREFILL:
        if targets is None or targets.ttft_ms is None:
            raise ValueError(f"role {role.name}: Builtin prefill scaling needs scaling.targets.ttftMs")
        return recommend_prefill(mem, now_s, load, c, targets.ttft_ms / 1000, cfg)
    if targets is None or targets.tpot_ms is None:
        raise ValueError(f"role {role.name}: Builtin decode scaling needs scaling.targets.tpotMs")
    return recommend_decode(mem, now_s, load, c, targets.tpot_ms / 1000, cfg)


def endpoints_started_after(pods: list[dict[str, Any]], eps: list[Endpoint], since: float | None) -> set[str]:
    """URLs of the endpoints whose pod's containers started after `since` (Unix s): new engines,
    whose counters started at 0. Any other pod not read before (the scaler restarted, its first
    scrape failed, a drain hid it, its readiness flapped) has lifetime counters, which are not one
    tick's work. The earliest container start decides: a restarted sidecar next to an old engine
    must not pass the engine's lifetime counts off as new."""
    if since is None:
        return set()
    started = {(p.get("metadata") or {}).get("name"): started_since(p) for p in pods}
    # Start times are whole seconds (truncated): one second of slack keeps a pod that started just
    # after the last tick fresh, at the cost of at most a second of one engine's counts.
    return {e.url for e in eps if (t := started.get(e.pod)) is not None and t >= since - 1.0}


def _group_index(pod: dict[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(LWS_GROUP_INDEX, "-1"))
    except ValueError:
        return -1


class BuiltinScaler:
    """One asyncio task that scales every Builtin role it can see."""

    def __init__(
        self,
        api: KubeApi,
        cfg: ScalerConfig,
        source: MetricsSource | None = None,
        policy: SloPolicyConfig | None = None,
        coefficients: Coefficients | None = None,
    ) -> None:
        self.api = api
        self.cfg = cfg
        self.source = source or DirectScrape()
        self.policy = policy or SloPolicyConfig(forecast_lead_s=cfg.pod_startup_s + cfg.interval_s)
        self.coefficients = coefficients or load_coefficients(cfg.coefficients)
        self.events = EventRecorder(
            api, cfg.identity or default_identity(), ttl=0.0, controller=SCALER_REPORTING_CONTROLLER
        )
        self.roles: dict[tuple[str, str, str], RoleState] = {}
        self._raw: dict[tuple[str, str, str], int] = {}
        # When each group last missed an SLO target (monotonic s): for `scaleDownAfterMissSeconds`.
        self._last_miss: dict[tuple[str, str], float] = {}
        # Groups whose non-Builtin roles were checked for drain annotations left by an earlier process.
        self._swept: set[tuple[str, str]] = set()
        # Each group's uid at the last tick: a group deleted and created again between two ticks
        # has the same name and starts afresh all the same.
        self._uids: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ loop
    async def run(self, stop: asyncio.Event) -> None:
        """Tick every interval until `stop` is set."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.tick()
            except httpx2.TransportError as e:
                # Expected while the API server restarts or the network flaps: one line, not a trace.
                log.warning(
                    "scaler tick failed: cannot reach the Kubernetes API server: %s",
                    str(e) or type(e).__name__,
                )
            except Exception:
                log.exception("scaler tick failed")
            try:
                await asyncio.wait_for(
                    stop.wait(), max(self.cfg.interval_s - (time.monotonic() - started), 0.1)
                )
            except TimeoutError:
                pass
        try:
            async with asyncio.timeout(SHUTDOWN_UNDRAIN_S):
                await self.cancel_drains()
        except TimeoutError:
            log.warning("could not clear every drain annotation within %.0fs", SHUTDOWN_UNDRAIN_S)
        except Exception:  # the events and the Lease's release still come
            log.exception("could not clear the drain annotations")
        await self.events.flush()

    async def cancel_drains(self, only: tuple[str, str] | None = None) -> None:
        """Give every pod this process is draining back to the proxy (on shutdown: a drain lives in
        this process's memory, and an uninstalled scaler must not leave pods hidden for good), or
        only those of the group `only` (namespace, name)."""
        for (ns, group, role), st in list(self.roles.items()):
            if st.draining_to is None or only not in (None, (ns, group)):
                continue
            try:
                await self._cancel_drain(ns, group, role, st)
            except NotLeader:
                # The Lease is lost: the new leader reads the marks and owns the drains now.
                log.info("drains left to the replica that leads now")
                return
            except Exception as e:  # an API refusal or an unreachable API: the other roles still go
                log.warning(
                    "%s/%s-%s: could not cancel the drain: %s", ns, group, role, str(e) or type(e).__name__
                )
                continue
            log.info("%s/%s-%s: drain cancelled", ns, group, role)

    async def _cancel_drain(self, ns: str, group: str, role: str, st: RoleState | None) -> int:
        """Clear the drain marks on the role's leaders (whoever set them) and forget this process's
        drain, if any; how many marks were cleared."""
        pods, _ = await self.api.list(POD, ns, selector_string(leader_selector(group, role)))
        cleared = await self._undrain(ns, pods)
        if st is not None:
            st.draining_to = None
        return cleared

    async def tick(self) -> list[RoleDecision]:
        """One pass over every ServingGroup with Builtin roles."""
        groups, _ = await self.api.list(SERVING_GROUP, self.cfg.namespace)
        # Forget roles whose group is gone or was re-created under the same name (it starts afresh:
        # no damping history, forecast memory or drain of its predecessor).
        uids = {
            (o["metadata"].get("namespace", "default"), o["metadata"]["name"]): o["metadata"].get("uid", "")
            for o in groups
        }
        live = {k for k, uid in uids.items() if self._uids.get(k, uid) == uid}
        self._uids = uids
        for key in [k for k in self.roles if k[:2] not in live]:
            self._forget(key)
        self._swept &= live
        self._last_miss = {k: t for k, t in self._last_miss.items() if k in live}
        out: list[RoleDecision] = []
        for obj in groups:
            try:
                sg = ServingGroup.model_validate(obj)
            except ValidationError as e:
                log.warning("skipping invalid ServingGroup %s: %s", obj["metadata"].get("name"), e)
                # Its drains cannot end while it is unreadable: give their pods back to the proxy.
                await self.cancel_drains(
                    only=(obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
                )
                continue
            try:
                out += await self._group(obj, sg)
            except Exception:
                # One group's failure (an API error, a bad value) must not stop the others'.
                log.exception("scaling ServingGroup %s failed this tick", obj["metadata"].get("name"))
        return out

    # ------------------------------------------------------------------ one group
    async def _group(self, obj: dict[str, Any], sg: ServingGroup) -> list[RoleDecision]:
        ns = obj["metadata"].get("namespace", "default")
        name = obj["metadata"]["name"]
        builtin = [r for r in sg.spec.roles if r.scaling_mode == ScalingMode.BUILTIN]
        await self._release_unscaled(
            ns, name, {r.name for r in builtin}, {r.name for r in sg.spec.roles if r not in builtin}
        )
        decisions: dict[str, tuple[Role, dict[str, Any], int, int, str, list[dict[str, Any]]]] = {}
        policy = group_policy(sg, self.policy)
        for role in builtin:
            got = await self._decide(ns, name, role, policy)
            st = self.roles.get((ns, name, role.name))
            if st is not None:
                st.undecided = 0 if got is not None else st.undecided + 1
            if got is not None:
                decisions[role.name] = (role, *got)
            elif st is not None and (st.draining_to is not None or st.undecided > 1):
                # No decision (metrics outage, bad targets): hold means hold, so the pods being
                # drained serve again instead of staying hidden from the proxy while nothing ends it.
                # Also marks another process left (a leader that died mid-drain) once this one's
                # baseline tick has passed: without a decision it would never take them over.
                if await self._cancel_drain(ns, name, role.name, st):
                    log.warning("%s/%s-%s: no decision this tick; drain cancelled", ns, name, role.name)
        # The declared ratio band, when the group has exactly one Builtin prefill and decode role.
        # A role without a decision this tick holds its size: the other is kept in band against
        # it, and raised into the band it is when the other grows past it (raising is safe while
        # its load is unknown); it was sized as if there were no band.
        ratio = sg.spec.ratio
        pre = [r for r in builtin if r.type == RoleType.PREFILL]
        dec = [r for r in builtin if r.type == RoleType.DECODE]
        if ratio is not None and ratio.tolerance is not None and len(pre) == 1 and len(dec) == 1:
            band = RatioBand(ratio.prefill, ratio.decode, ratio.tolerance)
            p, d = decisions.get(pre[0].name), decisions.get(dec[0].name)
            if p is not None and d is None:
                d = await self._held(ns, name, dec[0])
            elif d is not None and p is None:
                p = await self._held(ns, name, pre[0])
            if p is not None and d is not None:
                np_, nd, note = within_band(
                    band, p[3], d[3], damping_config(pre[0]).max_replicas, damping_config(dec[0]).max_replicas
                )
                for x, n in ((p, np_), (d, nd)):
                    if note and n != x[3]:
                        decisions[x[0].name] = (*x[:3], n, f"{x[4]}; {note}", x[5])
        out = []
        for role, srs, current, target, reason, pods in decisions.values():
            DESIRED.labels(ns, name, role.name).set(target)
            await self._act(ns, name, role, srs, current, target, reason, pods)
            out.append(
                RoleDecision(
                    ns,
                    name,
                    role.name,
                    current,
                    self._raw.get((ns, name, role.name), current),
                    target,
                    reason,
                )
            )
        return out

    async def _held(
        self, ns: str, group: str, role: Role
    ) -> tuple[Role, dict[str, Any], int, int, str, list[dict[str, Any]]] | None:
        """A role without a decision this tick as one that holds its size (its ServingRoleScaler's
        replicas); None without a scaler."""
        srs = await self.api.get(SERVING_ROLE_SCALER, scaler_name(group, role.name), ns)
        if srs is None:
            return None
        size = _scaler_size(srs, role)
        return role, srs, size, size, f"held at {size}: no decision this tick", []

    async def _decide(
        self, ns: str, group: str, role: Role, policy: SloPolicyConfig
    ) -> tuple[dict[str, Any], int, int, str, list[dict[str, Any]]] | None:
        key = (ns, group, role.name)
        st = self.roles.setdefault(key, RoleState())
        srs = await self.api.get(SERVING_ROLE_SCALER, scaler_name(group, role.name), ns)
        if srs is None:
            return None  # the controller has not created it yet
        current = _scaler_size(srs, role)
        await self._foreign_size(ns, group, role.name, st, srs, current)
        # Taken before any path of this tick's decision, so a refused write restores this tick's.
        st.cooldown_before = (st.damping.last_change_s, st.damping.last_direction)
        pods, _ = await self.api.list(POD, ns, selector_string(leader_selector(group, role.name)))
        eps = list(endpoints_from_pods(pods).endpoints)
        samples = await self.source.samples(ns, eps)
        now, wall = time.monotonic(), time.time()  # after the scrape: the window ends at the samples
        fresh = endpoints_started_after(pods, eps, st.prev_wall)
        seen, last = st.read([e.url for e in eps], samples, fresh, now, wall)
        if seen.unread:
            SCRAPE_ERRORS.labels(ns, group, role.name).inc(seen.unread)
        if last is None:
            return None  # rates need two scrapes
        if not seen.cur and current > 0:
            # Nothing readable (metrics outage, or no leader ready yet) is not "no load".
            why = f"no metrics from {len(eps)} ready leaders of {current} replicas{seen.unread_why()}"
            log.warning("%s/%s-%s: %s; holding", ns, group, role.name, why)
            # The last load and recommendation are not today's: their series go.
            _drop_load_series(ns, group, role.name)
            DESIRED.labels(ns, group, role.name).set(current)  # held (a drain under way is cancelled)
            await self._scaling_active(
                ns,
                srs,
                False,
                "MetricsUnavailable",
                f"{why}: the role is held at its size until the load can be read again (the ratio band "
                "may still raise it)",
            )
            return None
        load = role_load(seen.prev, seen.cur, max(now - last, 1e-3))
        LOAD_RATE.labels(ns, group, role.name).set(load.request_rate)
        await self._scaling_active(
            ns, srs, True, "ValidMetricFound", "the scaler reads the load of the role's leaders"
        )
        targets = role.scaling.targets if role.scaling else None
        # A tick with no newer sample from any engine (Prometheus has not scraped since) reads the
        # same intervals again: a miss in them was counted already.
        if (
            targets is not None
            and seen.repeated < len(seen.cur)
            and missed_target(
                load,
                targets.ttft_ms / 1000 if targets.ttft_ms and role.type == RoleType.PREFILL else None,
                targets.tpot_ms / 1000 if targets.tpot_ms and role.type == RoleType.DECODE else None,
            )
        ):
            self._last_miss[(ns, group)] = now
            SLO_MISSES.labels(ns, group, role.name).inc()
        try:
            rec = recommend(role, load, self.coefficients, policy, st.memory, now)
        except ValueError as e:
            log.warning("%s/%s: %s", ns, group, e)
            return None
        ceiling = role.scaling.max_replicas if role.scaling is not None else None
        hold = held_size(current, st.draining_to, rec.replicas, seen.unread, seen.blind, ceiling)
        if hold is not None:
            why = (
                f"{seen.unread} of {len(eps)} leaders unreadable{seen.unread_why()}"
                if seen.unread
                else (f"{seen.blind} of {len(eps)} leaders without a previous reading")
            )
            # A hold for this tick, not a recommendation: kept out of the damping windows, where it
            # would block scale-down for a whole window after one unreadable tick.
            RECOMMENDED.labels(ns, group, role.name).set(hold)
            self._raw[key] = hold
            return srs, current, hold, f"held at {hold}: {why} ({rec.reason})", pods
        RECOMMENDED.labels(ns, group, role.name).set(rec.replicas)
        self._raw[key] = rec.replicas
        base = st.draining_to if st.draining_to is not None else current
        d = damp(
            st.damping,
            damping_config(role),
            now,
            base,
            rec.replicas,
            self._last_miss.get((ns, group)),
        )
        reason = rec.reason + (f" (held: {d.held})" if d.held else "")
        return srs, current, d.replicas, reason, pods

    # ------------------------------------------------------------------ actuation
    async def _act(
        self,
        ns: str,
        group: str,
        role: Role,
        srs: dict[str, Any],
        current: int,
        target: int,
        reason: str,
        pods: list[dict[str, Any]],
    ) -> None:
        st = self.roles[(ns, group, role.name)]
        if target >= current:
            # Cancel a drain; with none in progress, clear what an earlier scaler process left on
            # pods that stay (a restart mid-drain forgets its drain, not the annotations).
            await self._undrain(
                ns, pods if st.draining_to is not None else [p for p in pods if _group_index(p) < current]
            )
            st.draining_to = None
            if target > current and not await self._write(ns, group, role, srs, current, target, reason):
                st.damping.last_change_s, st.damping.last_direction = st.cooldown_before
            return
        # Groups above the desired size that this scaler did not mark are a rollout's surge: LWS
        # will not remove the groups at or above `target` then (the planner decides which go), so
        # draining them would hide groups the rollout keeps. Scale-down waits for the rollout.
        surge = surge_groups(pods, current)
        if surge:
            if st.draining_to is not None:
                await self._undrain(ns, pods)
                st.draining_to = None
            log.info(
                "%s/%s-%s: scale-down %d -> %d waits for the rollout (%d surge group(s))",
                ns,
                group,
                role.name,
                current,
                target,
                len(surge),
            )
            return
        if st.draining_to != target:
            # Start (or retarget) a drain: annotate the leaders of the groups LWS will remove.
            await self._undrain(ns, [p for p in pods if _group_index(p) < target])
            # The drain is this process's before any mark is set: a mark write that fails halfway
            # leaves marks that the next tick (unmarked victims) or a shutdown (cancel_drains) owns.
            st.draining_to, st.drain_started, st.drain_reason = target, time.monotonic(), reason
            st.drain_idle = False
            st.drain_started_wall = time.time()
            await self._mark(ns, [p for p in pods if _group_index(p) >= target])
            log.info(
                "%s/%s-%s: draining groups >= %d before scaling %d -> %d",
                ns,
                group,
                role.name,
                target,
                current,
                target,
            )
            return
        victims = [p for p in pods if _group_index(p) >= target]
        unmarked = [p for p in victims if not _marked(p)]
        if unmarked:
            # Recreated since the drain began (a pod's annotation is not in the LWS template): the
            # proxy may have sent it requests meanwhile. Mark it again and read it afresh; the drain
            # timeout still runs from the first mark (a group recreated over and over, crash
            # looping, would otherwise keep the role from ever scaling down).
            await self._mark(ns, unmarked)
            st.drain_started_wall, st.drain_idle = time.time(), False
            return
        eps = [e for e in endpoints_from_pods(_undrained(victims)).endpoints]
        got = await self.source.samples(ns, eps)
        # A victim whose metrics cannot be read counts as busy: "unknown" is not "drained". So does
        # one that runs but is not Ready (a failed probe under load may still hold requests), and
        # one whose sample was scraped before the proxy could see the mark (Prometheus scrapes on
        # its own schedule: an older "idle" says nothing about what the proxy sent since).
        scraped = {e.pod for e in eps}
        unready = sum(1 for p in victims if p["metadata"].get("name") not in scraped and may_hold_work(p))
        seen_after = st.drain_started_wall + DRAIN_NOTICE_S
        undated_unknown = getattr(self.source, "dates_samples", False)
        busy = unready + sum(
            1.0
            if s is None
            or (s.at is None and undated_unknown)  # a Prometheus sample of unknown age
            or (s.at is not None and s.at < seen_after)
            else s.running + s.waiting + s.held
            for s in got
        )
        timed_out = time.monotonic() - st.drain_started >= self.cfg.drain_timeout_s
        if busy > 0 and not timed_out:
            st.drain_idle = False
            return
        dated = {e.pod: s.at for e, s in zip(eps, got, strict=True) if s is not None and s.at is not None}
        if not busy and not st.drain_idle and not timed_out:
            # Idle at one check is not drained yet: a vLLM prefill keeps a finished request's KV
            # until its decode has pulled it, which no gauge shows. Still idle at the next: written.
            st.drain_idle, st.drain_idle_at = True, dated
            return
        if (
            not busy
            and not timed_out
            and any(at <= st.drain_idle_at.get(pod, -1.0) for pod, at in dated.items())
        ):
            # The same scrape as at the first check (Prometheus scrapes on its own schedule): that
            # is one look, not two. Wait for a newer one.
            return
        if busy:
            note = (
                f"{st.drain_reason}; drain timed out after {self.cfg.drain_timeout_s:.0f}s with "
                f"{busy:.0f} requests still on the victims (or victims unreadable)"
            )
        elif not victims:
            # Removed before they were seen idle (the role's maxReplicas lowered, say, which the
            # controller applies at once): whatever they held was not drained.
            note = f"{st.drain_reason}; the groups above {target} were already gone, not drained"
        else:
            note = f"{st.drain_reason}; drained"
        if not await self._write(ns, group, role, srs, current, target, note, drain_timed_out=busy > 0):
            return  # someone else changed the size: the next tick decides from theirs
        st.draining_to = None
        # The cooldown runs from the change itself, not from the decision that started the drain.
        st.damping.last_change_s = time.monotonic()

    async def _release_unscaled(self, ns: str, group: str, builtin: set[str], others: set[str]) -> None:
        """Clear drain annotations on leader pods of roles this scaler does not scale.

        The proxy never routes to a draining pod, so an annotation left on a role that stopped
        being Builtin mid-drain (or by an earlier scaler process) would hide that pod for good.
        Checked once per group per process, and again whenever a role leaves Builtin; then the
        ScalingActive condition this scaler applied to the scaler of a role of `others` (no longer
        Builtin) is withdrawn too.
        """
        left = [k for k in self.roles if k[:2] == (ns, group) and k[2] not in builtin]
        for key in left:
            self._forget(key)
        if (ns, group) in self._swept and not left:
            return
        self._swept.add((ns, group))
        pods, _ = await self.api.list(POD, ns, selector_string({LABEL_GROUP: group, LWS_WORKER_INDEX: "0"}))
        await self._undrain(
            ns, [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_ROLE) not in builtin]
        )
        # ScalingActive says what this scaler does with a Builtin role: on another role's scaler
        # (now External) it would tell of a scaler that no longer acts.
        for role in others:
            srs = await self.api.get(SERVING_ROLE_SCALER, scaler_name(group, role), ns)
            conds = ((srs or {}).get("status") or {}).get("conditions") or []
            if srs is not None and find_condition(conds, SCALING_ACTIVE) is not None:
                srs["status"]["conditions"] = [c for c in conds if c.get("type") != SCALING_ACTIVE]
                await self._apply_status(ns, srs, {})

    def _forget(self, key: tuple[str, str, str]) -> None:
        self.roles.pop(key, None)
        self._raw.pop(key, None)
        _drop_series(*key)

    async def _mark(self, ns: str, pods: list[dict[str, Any]]) -> None:
        """Annotate `pods` as draining (the proxy stops sending them new requests)."""
        for p in pods:
            if not _marked(p):
                await self._annotate(ns, p, "true")

    async def _undrain(self, ns: str, pods: list[dict[str, Any]]) -> int:
        """Clear the drain mark on those of `pods` that carry one; how many did."""
        marked = [p for p in pods if _marked(p)]
        for p in marked:
            await self._annotate(ns, p, None)
        return len(marked)

    async def _annotate(self, ns: str, pod: dict[str, Any], value: str | None) -> None:
        """Set or clear the drain mark; a pod gone since the list needs neither."""
        try:
            await self.api.patch(
                POD, pod["metadata"]["name"], ns, {"metadata": {"annotations": {ANNOTATION_DRAINING: value}}}
            )
        except ApiError as e:
            if e.code != 404:
                raise

    async def _foreign_size(
        self, ns: str, group: str, role: str, st: RoleState, srs: dict[str, Any], current: int
    ) -> None:
        """Take a size this scaler did not write as the role's new baseline: cancel a drain decided
        on the old size, restart the damping from the new one, say so in status (and, when another
        writer keeps replacing this scaler's sizes, in a Warning event)."""
        md = srs.get("metadata") or {}
        seen = see_size(st.ownership, md.get("uid"), _generation(srs), current, time.monotonic())
        if not seen.foreign:
            return
        if st.draining_to is not None:
            await self._cancel_drain(ns, group, role, st)
        rebaseline(st.damping, time.monotonic(), current)
        who = replicas_manager(srs, self.api.field_manager)
        note = foreign_note(seen, current, who)[:1024]
        await self._apply_status(ns, srs, {"lastScaleTime": now_rfc3339(), "lastScaleReason": note})
        if seen.conflicting:
            log.warning("%s/%s: %s", ns, md.get("name"), note)
        else:
            log.info("%s/%s: %s", ns, md.get("name"), note)
        if seen.warn:
            self.events.emit_soon(srs, "Warning", "ConflictingScaler", note, action="Scale")

    async def _scaling_active(
        self, ns: str, srs: dict[str, Any], active: bool, reason: str, message: str
    ) -> None:
        """Set the ScalingActive condition (written only when it changes)."""
        have = (srs.get("status") or {}).get("conditions") or []
        was = find_condition(have, SCALING_ACTIVE)
        status = "True" if active else "False"
        if was is not None and (was.get("status"), was.get("reason"), was.get("message")) == (
            status,
            reason,
            message,
        ):
            return
        cond = condition(SCALING_ACTIVE, active, reason, message, _generation(srs) or 0, have)
        await self._apply_status(ns, srs, {"conditions": [cond]})
        if not active and (was is None or was.get("status") != "False"):
            self.events.emit_soon(srs, "Warning", reason, message, action="Scale")

    async def _apply_status(self, ns: str, srs: dict[str, Any], changes: dict[str, Any]) -> None:
        """Server-side apply the scaler's own status fields (lastScaleTime, lastScaleReason and the
        ScalingActive condition) with `changes`, and keep `srs` in step for the rest of the tick.

        Every apply carries all of them: an apply that left one out would remove it. Conditions
        are a list-map keyed by type, so the controller's ScalingLimited is not this apply's."""
        if not isinstance(srs.get("status"), dict):
            srs["status"] = {}
        have = srs["status"]
        mine: dict[str, Any] = {k: have[k] for k in ("lastScaleTime", "lastScaleReason") if have.get(k)}
        active = find_condition(have.get("conditions") or [], SCALING_ACTIVE)
        if active is not None:
            mine["conditions"] = [active]
        mine.update(changes)
        got = await self.api.apply(
            {
                "apiVersion": API_VERSION,
                "kind": SCALER_KIND,
                "metadata": {"name": srs["metadata"]["name"], "namespace": ns},
                "status": mine,
            },
            subresource="status",
        )
        # The tick's /scale write is conditional on the resourceVersion it read: this status write
        # moved it, and only it did while the spec's generation is the one decided on.
        after = (got or {}).get("metadata") or {}
        if after.get("resourceVersion") and after.get("generation") == _generation(srs):
            srs["metadata"]["resourceVersion"] = after["resourceVersion"]
        for k, v in mine.items():
            if k != "conditions":
                have[k] = v
        others = [c for c in have.get("conditions") or [] if c.get("type") != SCALING_ACTIVE]
        have["conditions"] = others + list(mine.get("conditions") or [])

    async def _write(
        self,
        ns: str,
        group: str,
        role: Role,
        srs: dict[str, Any],
        current: int,
        target: int,
        reason: str,
        drain_timed_out: bool = False,
    ) -> bool:
        """Write `target` to the scaler's /scale and say why in its status; False if the object
        changed since this tick read it (nothing written). A scale-down whose drain timed out is
        a Warning: the requests still on the removed groups are cut."""
        name = scaler_name(group, role.name)
        # The resourceVersion read this tick makes the write conditional: a `kubectl scale` (or
        # another writer) since then wins, instead of being overwritten by a decision made on
        # the size it replaced.
        version = (srs.get("metadata") or {}).get("resourceVersion")
        owned = self.roles.setdefault((ns, group, role.name), RoleState()).ownership
        # Known before the write: a write the server applied but whose answer was lost is still ours.
        intend_size(owned, _generation(srs), target)
        body: dict[str, Any] = {"spec": {"replicas": target}}
        if version:
            body["metadata"] = {"resourceVersion": version}
        for _ in range(3):
            try:
                await self.api.patch(SERVING_ROLE_SCALER, name, ns, body, subresource="scale")
                break
            except ApiError as e:
                if e.code != 409:
                    raise
            fresh = await self.api.get(SERVING_ROLE_SCALER, name, ns)
            if fresh is None or _generation(fresh) != _generation(srs):
                log.info("%s/%s: size changed since this tick read it; not writing %d", ns, name, target)
                return False
            # Same generation: only status or metadata moved (the controller writes observedGeneration
            # and conditions after every scale), so the size decided on still stands.
            body["metadata"] = {"resourceVersion": fresh["metadata"]["resourceVersion"]}
        else:
            log.info("%s/%s: kept changing under this tick; not writing %d", ns, name, target)
            return False
        wrote_size(owned, _generation(srs), target)
        note = f"{current} -> {target}: {reason}"[:1024]
        await self._apply_status(ns, srs, {"lastScaleTime": now_rfc3339(), "lastScaleReason": note})
        direction = "up" if target > current else "down"
        SCALE_EVENTS.labels(ns, group, role.name, direction).inc()
        if drain_timed_out:
            DRAIN_TIMEOUTS.labels(ns, group, role.name).inc()
            self.events.emit_soon(srs, "Warning", "DrainTimedOut", note, action="Scale")
        else:
            self.events.emit_soon(
                srs, "Normal", "ScaledUp" if direction == "up" else "ScaledDown", note, action="Scale"
            )
        log.info("%s/%s: %s", ns, name, note)
        return True


def _generation(obj: dict[str, Any]) -> int | None:
    return (obj.get("metadata") or {}).get("generation")


def held_size(
    current: int,
    draining_to: int | None,
    recommended: int,
    unread: int,
    blind: int,
    ceiling: int | None = None,
) -> int | None:
    """The size a role holds this tick because some leaders' load is unknown (None: no hold).

    Only a scale-down is held: the load of leaders unread now, or read without a baseline (unread
    last tick, e.g. after a metrics outage), is unknown, so the rest understates it. A drain under
    way goes on while leaders are only without a baseline (a victim a retarget gave back sat out
    the last tick); an unreadable leader cancels it (holding means holding at the current size).
    Never above `ceiling` (the role's maxReplicas): a lowered bound is the operator's, not the
    load's, and holding above it kept the controller holding the role there for good.
    """
    if not (unread or blind) or recommended >= current:
        return None
    # Never on below this tick's recommendation, which already understates the load.
    if draining_to is not None and not unread and recommended <= draining_to:
        held = draining_to
    else:
        held = current
    return held if ceiling is None else min(held, ceiling)


def surge_groups(pods: list[dict[str, Any]], desired: int) -> list[dict[str, Any]]:
    """Leaders of groups at or above the desired size that no drain marked and that are not being
    deleted: a rollout's surge (a drain's own victims, marked, and the groups of a size already
    lowered, terminating, wait there for their pods to go)."""
    return [
        p
        for p in pods
        if _group_index(p) >= desired and not _marked(p) and not p["metadata"].get("deletionTimestamp")
    ]


def _marked(pod: dict[str, Any]) -> bool:
    return (pod["metadata"].get("annotations") or {}).get(ANNOTATION_DRAINING) == "true"


def may_hold_work(pod: dict[str, Any]) -> bool:
    """A leader that has started and is not terminating: it may be serving requests even when not
    Ready. A pending pod (no IP yet) or one being deleted has none to finish here."""
    status = pod.get("status") or {}
    return bool(status.get("podIP")) and status.get("phase") == "Running" and not is_terminating(pod)


def _undrained(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the pods without the draining annotation (to reuse endpoint discovery on them)."""
    out = []
    for p in pods:
        md = dict(p["metadata"])
        md["annotations"] = {
            k: v for k, v in (md.get("annotations") or {}).items() if k != ANNOTATION_DRAINING
        }
        out.append({**p, "metadata": md})
    return out


async def _serve_metrics(addr: str) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", lambda _r: _ok())
    return await serve_ops_endpoint(app, addr, "--metrics-addr", "/metrics")


async def _ok() -> web.Response:
    return web.Response(text="ok")


async def run_scaler(cfg: ScalerConfig, stop: asyncio.Event | None = None) -> int:
    """Run the built-in scaler until `stop` (or forever)."""
    import signal

    from pdorch.scaler.sources import PrometheusQuery

    try:
        coefficients = load_coefficients(cfg.coefficients)  # once, and before anything starts
    except (ValueError, OSError) as e:
        raise CliError(f"--coefficients: {e}", "pass a preset name or a readable coefficients file") from e
    api = KubeApi.from_config(cfg.kubeconfig, field_manager="pdorch-scaler")
    source: MetricsSource = DirectScrape()
    if cfg.prometheus_url:
        try:
            source = PrometheusQuery(
                cfg.prometheus_url, ca_file=cfg.prometheus_ca_file, token_file=cfg.prometheus_token_file
            )
        except ValueError as e:
            raise CliError(str(e), "pass a readable PEM CA bundle and a file holding one token") from e
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = await _serve_metrics(cfg.metrics_addr)
    try:
        if not cfg.leader_elect:
            await BuiltinScaler(api, cfg, source, coefficients=coefficients).run(stop)
            return 0
        return await _run_elected(api, cfg, source, stop, coefficients)
    finally:
        await runner.cleanup()
        await api.close()


async def _run_elected(
    api: KubeApi, cfg: ScalerConfig, source: MetricsSource, stop: asyncio.Event, coefficients: Coefficients
) -> int:
    """Campaign for the scaler's Lease, decide only while holding it; LOST_LEASE_EXIT if it was lost (the process
    exits and restarts as a standby: its in-memory drains and forecasts are the new leader's now)."""
    identity = cfg.identity or default_identity()
    elector = LeaseElector(api, cfg.lease_namespace, cfg.lease_name, identity)
    # A replica that stopped renewing must not write /scale or drain marks the new leader owns.
    api.write_guard = elector.guard_writes
    elector_task = asyncio.create_task(elector.run(), name="scaler-leader-election")
    try:
        waits = {asyncio.create_task(stop.wait()), asyncio.create_task(elector.is_leader.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if stop.is_set():
            return 0
        log.info("scaler %s leads: deciding", identity)
        decide_until = asyncio.Event()
        relay = [
            asyncio.create_task(_set_when(stop, decide_until)),
            asyncio.create_task(_set_when(elector.lost, decide_until)),
        ]
        try:
            await BuiltinScaler(api, cfg, source, coefficients=coefficients).run(decide_until)
        finally:
            for t in relay:
                t.cancel()
        if elector.lost.is_set():
            return LOST_LEASE_EXIT
        # Stop renewing first: a renewal racing the release could make it fail (409).
        elector_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await elector_task
        await elector.release()
        return 0
    finally:
        elector_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await elector_task


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def _scaler_size(srs: dict[str, Any], role: Role) -> int:
    """The size a role's ServingRoleScaler asks for (the role's replicas until one is set)."""
    return int((srs.get("spec") or {}).get("replicas", role.replicas))
