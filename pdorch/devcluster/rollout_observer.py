"""Watch a P/D rollout from the outside: ready pods per revision, planned cohorts, capacity.

Used by the rollout e2e tests and bench/rollout, for pdorch ServingGroups and LWS
DisaggregatedSets alike, so both are judged by the same rules:

* a pod's *revision* is its first container's image (the only thing the rollouts change), its role
  comes from pdorch's or DisaggregatedSet's role label, and only leaders (worker-index 0) count;
* *ready* cohorts: per revision, the Ready, non-terminating prefill and decode leaders;
* *planned* cohorts: what the orchestrator has asked for, read from its LeaderWorkerSets (pdorch:
  old = below the partition, new = the rest; DisaggregatedSet: replicas of each revision's LWS);
* *revision-blind cross pairing*: the chance that a router which ignores revisions pairs a ready
  prefill with a ready decode of another revision, averaged over the samples.

Two objects are never written in the same instant and pods of two LWS never become ready in the
same instant, so cohorts can be off ratio for a moment in any system; the summary therefore gives
the longest off-ratio window besides the maxima.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lightkube import Client
from lightkube.resources.core_v1 import Pod

from pdorch.devcluster.cluster import LeaderWorkerSet
from pdorch.roles.labels import LABEL_ROLE_TYPE, LWS_WORKER_INDEX
from pdorch.roles.pods import is_ready, is_terminating
from pdorch.rollout.live import cohort_deviation, lws_replicas_partition

DS_ROLE = "disaggregatedset.x-k8s.io/role"
DS_REVISION = "disaggregatedset.x-k8s.io/revision"


def pod_role(pod: dict[str, Any]) -> str | None:
    """prefill/decode for a leader pod of either orchestrator, else None."""
    labels = pod["metadata"].get("labels") or {}
    if labels.get(LWS_WORKER_INDEX, "0") != "0":
        return None
    role = labels.get(LABEL_ROLE_TYPE) or labels.get(DS_ROLE)
    return role if role in ("prefill", "decode") else None


def pod_revision(pod: dict[str, Any]) -> str:
    """The first container's image."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    return str(containers[0].get("image", ""))


def ready_cohorts(pods: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per revision: (ready prefill leaders, ready decode leaders)."""
    per: dict[str, Counter[str]] = {}
    for pod in pods:
        role = pod_role(pod)
        if role and is_ready(pod) and not is_terminating(pod):
            per.setdefault(pod_revision(pod), Counter())[role] += 1
    return {r: (c["prefill"], c["decode"]) for r, c in per.items()}


def planned_cohorts(lws: list[dict[str, Any]]) -> tuple[tuple[int, int], ...]:
    """Cohorts the orchestrator asked for, from its LWS objects (see the module doc)."""
    by_ds_rev: dict[str, list[int]] = {}
    old, new = [0, 0], [0, 0]
    for o in lws:
        labels = o["metadata"].get("labels") or {}
        role = labels.get(LABEL_ROLE_TYPE) or labels.get(DS_ROLE)
        if role not in ("prefill", "decode"):
            continue
        i = 0 if role == "prefill" else 1
        replicas, partition = lws_replicas_partition(o)
        if DS_REVISION in labels:
            by_ds_rev.setdefault(labels[DS_REVISION], [0, 0])[i] += replicas
        else:
            old[i] += partition
            new[i] += replicas - partition
    if by_ds_rev:
        return tuple(sorted((p, d) for p, d in by_ds_rev.values()))
    return (old[0], old[1]), (new[0], new[1])


@dataclass
class Sample:
    t: float
    ready: dict[str, tuple[int, int]]
    planned: tuple[tuple[int, int], ...]
    groups: tuple[int, int]  # (prefill, decode) groups asked for in total


@dataclass
class RolloutObserver:
    """Samples one namespace every `interval` seconds while `run` is active."""

    kube: Client
    namespace: str
    ratio: tuple[int, int]
    desired: tuple[int, int]
    interval: float = 0.2
    samples: list[Sample] = field(default_factory=list)

    def _dev(self, p: int, d: int) -> float:
        return cohort_deviation(p, d, *self.ratio)

    def sample(self) -> Sample:
        """Take one sample (blocking API calls)."""
        t = time.monotonic()
        pods = [p.to_dict() for p in self.kube.list(Pod, namespace=self.namespace)]
        lws = [o.to_dict() for o in self.kube.list(LeaderWorkerSet, namespace=self.namespace)]
        planned = planned_cohorts(lws)
        groups = (sum(c[0] for c in planned), sum(c[1] for c in planned))
        s = Sample(t, ready_cohorts(pods), planned, groups)
        self.samples.append(s)
        return s

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until `stop` is set."""
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(self.interval)

    def _windows(self, off: list[bool]) -> list[float]:
        out, start = [], None
        for s, bad in zip(self.samples, off, strict=True):
            if bad and start is None:
                start = s.t
            elif not bad and start is not None:
                out.append(s.t - start)
                start = None
        if start is not None:
            out.append(self.samples[-1].t - start)
        return out

    def summary(self) -> dict[str, Any]:
        """Maxima, minima, off-ratio windows, steps and revision-blind cross pairing."""
        ready_dev = [max((self._dev(p, d) for p, d in s.ready.values()), default=0.0) for s in self.samples]
        planned_dev = [max((self._dev(p, d) for p, d in s.planned), default=0.0) for s in self.samples]
        ready_p = [sum(p for p, _ in s.ready.values()) for s in self.samples]
        ready_d = [sum(d for _, d in s.ready.values()) for s in self.samples]
        cross = []
        for s, tp, td in zip(self.samples, ready_p, ready_d, strict=True):
            if tp and td:
                cross.append(1.0 - sum((p / tp) * (d / td) for p, d in s.ready.values()))
        steps = sum(1 for a, b in zip(self.samples, self.samples[1:], strict=False) if a.planned != b.planned)
        dp, dd = self.desired
        return {
            "samples": len(self.samples),
            "steps": steps,
            "max_ready_ratio_deviation": round(max(ready_dev, default=0.0), 3),
            "longest_off_ratio_ready_window_s": round(
                max(self._windows([x > 0 for x in ready_dev]), default=0.0), 2
            ),
            "max_planned_ratio_deviation": round(max(planned_dev, default=0.0), 3),
            "longest_off_ratio_planned_window_s": round(
                max(self._windows([x > 0 for x in planned_dev]), default=0.0), 2
            ),
            "min_ready_prefill": min(ready_p, default=0),
            "min_ready_decode": min(ready_d, default=0),
            "min_ready_capacity": round(
                min((min(p / dp, d / dd) for p, d in zip(ready_p, ready_d, strict=True)), default=0.0), 3
            ),
            "max_prefill_groups": max((s.groups[0] for s in self.samples), default=0),
            "max_decode_groups": max((s.groups[1] for s in self.samples), default=0),
            "revision_blind_cross_pair_fraction_mean": round(sum(cross) / len(cross), 4) if cross else 0.0,
            "revision_blind_cross_pair_fraction_max": round(max(cross, default=0.0), 4),
        }
