"""Leader election on a coordination.k8s.io/v1 Lease.

Expiry of another holder's lease is judged by when *we* last saw its record change, on our
monotonic clock, never by comparing its renewTime with our wall clock (clock skew). Every write
carries the resourceVersion we read (optimistic lock), so two candidates cannot both win. A
leader that cannot renew within `renew_deadline` steps down; on graceful shutdown it releases the
lease so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import time
import uuid
from typing import Any

from prometheus_client import Gauge

from pdorch.controller.kubeapi import LEASE, ApiError, KubeApi, NotLeader, Resource

log = logging.getLogger(__name__)

LOST_LEASE_EXIT = 1  # exit code of a replica that lost its Lease (it restarts as a standby)
# A release on graceful shutdown is a courtesy (the Lease expires anyway): it must not eat the
# termination grace period when the apiserver does not answer.
RELEASE_TIMEOUT_S = 5.0

IS_LEADER = Gauge("leader_election_master_status", "1 if this replica leads, else 0.", ["name"])


def default_identity() -> str:
    """A candidate's identity when none is given: the host name plus a random suffix (two
    processes on one host must not share one)."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Acquire, hold and release one Lease."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.lease_duration, self.renew_deadline, self.retry_period = (
            lease_duration,
            renew_deadline,
            retry_period,
        )
        self.is_leader = asyncio.Event()
        self.lost = asyncio.Event()
        self._observed_record: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        # Whether the last read of the Lease showed another holder (a leader that sees one was
        # superseded, e.g. its Lease was deleted and a standby created it).
        self._other_holds = False

    def _spec(self, transitions: int, acquire_time: str | None) -> dict[str, Any]:
        now = _now()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "acquireTime": acquire_time or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def _try_acquire_or_renew(self) -> bool:
        lease = await self.api.get(LEASE, self.name, self.namespace)
        self._other_holds = False
        if lease is None:
            try:
                await self.api.create(
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": self._spec(0, None),
                    }
                )
            except ApiError as e:
                if e.code == 409:
                    self._other_holds = True  # another candidate created it first
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        mono = time.monotonic()
        if record != self._observed_record:
            self._observed_record, self._observed_at = record, mono
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        held_by_other = holder not in ("", self.identity)
        if held_by_other and mono - self._observed_at < duration:
            self._other_holds = True
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        acquire = spec.get("acquireTime") if holder == self.identity else None
        if holder != self.identity:
            transitions += 1
        lease["spec"] = self._spec(transitions, acquire)
        try:
            await self.api.replace(lease)  # carries the resourceVersion we read
        except ApiError as e:
            if e.code == 409:
                # Written since we read it: by a candidate that took it over (ours expired for it).
                self._other_holds = True
                return False
            raise
        return True

    async def run(self) -> None:
        """Campaign until leader, then renew; set `lost` and return if leadership is lost."""
        IS_LEADER.labels(self.name).set(0)
        while not self.is_leader.is_set():
            try:
                # A renewal counts from when it was sent: the others' lease clocks start when it
                # committed, which may be long before its answer arrived.
                sent = time.monotonic()
                if await self._try_acquire_or_renew():
                    self._last_renew = sent
                    self.is_leader.set()
                    IS_LEADER.labels(self.name).set(1)
                    log.info("became leader of lease %s/%s as %s", self.namespace, self.name, self.identity)
                    break
            except Exception as e:
                log.warning("leader election: %r", e)
            await asyncio.sleep(self.retry_period)
        while True:
            await asyncio.sleep(self.retry_period)
            sent = time.monotonic()
            try:
                async with asyncio.timeout(self.renew_deadline):  # wait_for may eat a cancel (3.11)
                    ok = await self._try_acquire_or_renew()
            except Exception as e:
                log.warning("lease renew failed: %r", e)
                ok = False
            if ok:
                self._last_renew = sent
            elif self._other_holds or time.monotonic() - self._last_renew > self.renew_deadline:
                # Another holder on the Lease: it leads from now on, whatever our deadline says.
                log.error(
                    "lost leadership of %s/%s%s",
                    self.namespace,
                    self.name,
                    f" to {self._observed_record[0]}" if self._other_holds and self._observed_record else "",
                )
                IS_LEADER.labels(self.name).set(0)
                self.is_leader.clear()
                self.lost.set()
                return

    def holds(self) -> bool:
        """Whether this replica may still write: leader, and renewed within `renew_deadline`.

        Another candidate takes over only after it has seen no renewal for `lease_duration`
        (longer than `renew_deadline`), so a replica that passes this check still owns the Lease,
        even if its event loop was frozen or starved past a renewal and the elector has not noticed.
        """
        return self.is_leader.is_set() and time.monotonic() - self._last_renew <= self.renew_deadline

    def guard_writes(self, res: Resource) -> None:
        """`KubeApi.write_guard`: refuse every write but the Lease's own once `holds()` is false."""
        if res != LEASE and not self.holds():
            age = time.monotonic() - self._last_renew
            raise NotLeader(
                f"not writing {res.plural}: lease {self.namespace}/{self.name} last renewed {age:.1f}s ago "
                f"(deadline {self.renew_deadline:g}s); another replica may lead"
            )

    async def release(self) -> None:
        """Give the lease up (graceful shutdown) so a standby can take over immediately."""
        if not self.is_leader.is_set():
            return
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                lease = await self.api.get(LEASE, self.name, self.namespace)
                if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                    lease["spec"]["holderIdentity"] = ""
                    lease["spec"]["leaseDurationSeconds"] = 1
                    lease["spec"]["renewTime"] = _now()
                    await self.api.replace(lease)
                    log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as e:
            log.warning("could not release lease: %r", e)
        finally:
            self.is_leader.clear()
            IS_LEADER.labels(self.name).set(0)
