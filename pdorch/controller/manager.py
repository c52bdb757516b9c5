"""Wires the controller together and runs it.

Informers start before leadership (a warm standby has full caches); workers and every write start
only once this replica holds the Lease. SIGTERM: stop the queue, let in-flight reconciles finish
(bounded), stop watches, release the Lease, close the client. Losing the Lease drops the queue,
cancels in-flight reconciles and exits non-zero, so a stale leader never keeps writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from pdorch.cli_errors import CliError
from pdorch.controller.events import EventRecorder
from pdorch.controller.informer import Informer, key_of
from pdorch.controller.kubeapi import POD, SERVING_GROUP, KubeApi, NotLeader, Resource
from pdorch.controller.leader import LOST_LEASE_EXIT, LeaseElector, default_identity
from pdorch.controller.reconciler import CHILD_KINDS, Caches, Reconciler
from pdorch.controller.workqueue import ShutDown, WorkQueue
from pdorch.ops_endpoint import serve_ops_endpoint
from pdorch.roles.labels import LABEL_GROUP, LABEL_MANAGED_BY, MANAGED_BY
from pdorch.roles.render import RenderOptions

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 5.0  # how long shutdown waits for cancelled watches and workers to unwind
CACHE_SYNC_S = 120.0  # how long a starting controller waits for its first lists
QUEUE_DEPTH = Gauge("workqueue_depth", "Keys waiting in the work queue.", ["name"])
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


@dataclass
class ControllerConfig:
    kubeconfig: str | None = None
    namespace: str | None = None  # None watches every namespace
    workers: int = 16  # reconciles are I/O-bound (API round trips), not CPU-bound
    leader_elect: bool = True
    lease_namespace: str = "pdorch-system"
    lease_name: str = "pdorch-controller"
    identity: str = ""
    health_addr: str = "127.0.0.1:8081"
    proxy_image: str = RenderOptions().proxy_image
    shutdown_grace: float = 20.0
    resync_seconds: float = 600.0


class Controller:
    """One controller replica."""

    def __init__(self, cfg: ControllerConfig, api: KubeApi | None = None) -> None:
        self.cfg = cfg
        self.identity = cfg.identity or default_identity()
        self.api = api or KubeApi.from_config(cfg.kubeconfig)
        ns = cfg.namespace
        self.groups = Informer(self.api, SERVING_GROUP, ns)
        self.children = {
            res: Informer(self.api, res, ns, MANAGED_SELECTOR, index_label=LABEL_GROUP) for res in CHILD_KINDS
        }
        self.pods = Informer(self.api, POD, ns, LABEL_GROUP, index_label=LABEL_GROUP)
        self.queue: WorkQueue[str] = WorkQueue(on_depth=lambda n: QUEUE_DEPTH.labels("servinggroup").set(n))
        # The Lease has a client of its own: its renewals must not queue behind a burst of
        # reconcile requests in the shared connection pool (KubeApi.POOL_LIMITS) past the deadline.
        self._lease_api = (api or KubeApi.from_config(cfg.kubeconfig)) if cfg.leader_elect else None
        self.elector = (
            LeaseElector(self._lease_api, cfg.lease_namespace, cfg.lease_name, self.identity)
            if self._lease_api is not None
            else None
        )
        if self.elector is not None:
            self.api.write_guard = self.elector.guard_writes
        self.reconciler = Reconciler(
            api=self.api,
            caches=Caches(self.groups, self.children, self.pods),
            events=EventRecorder(self.api, self.identity),
            options=RenderOptions(proxy_image=cfg.proxy_image),
        )
        self._stopping = asyncio.Event()
        self._ready = False
        self.groups.add_handler(lambda _t, obj: self.queue.add(key_of(obj)))
        for res, inf in self.children.items():
            inf.add_handler(self._forget_deleted(res))
        # Pod events trigger reconciles only for groups in a rollout (the planner waits on per-group
        # readiness by revision); otherwise status comes from the LWS objects, whose own status
        # changes already enqueue, and 4+ events per pod would flood the queue at scale.
        for inf in self.children.values():
            inf.add_handler(self._enqueue_owner)
        self.pods.add_handler(self._enqueue_rolling_owner)

    def _forget_deleted(self, res: Resource) -> Callable[[str, dict[str, Any]], None]:
        def handler(etype: str, obj: dict[str, Any]) -> None:
            if etype == "DELETED":
                md = obj["metadata"]
                self.reconciler.forget(res, md.get("namespace", ""), md["name"])

        return handler

    def _enqueue_owner(self, _etype: str, obj: dict[str, Any]) -> None:
        md = obj["metadata"]
        group = (md.get("labels") or {}).get(LABEL_GROUP)
        if not group:
            # Its group label removed by hand: its controller owner names the group that puts it back.
            group = next(
                (
                    r.get("name")
                    for r in md.get("ownerReferences") or []
                    if r.get("controller") and r.get("kind") == SERVING_GROUP.kind
                ),
                None,
            )
        if group:
            self.queue.add(f"{md.get('namespace', '')}/{group}")

    def _enqueue_rolling_owner(self, _etype: str, obj: dict[str, Any]) -> None:
        md = obj["metadata"]
        group = (md.get("labels") or {}).get(LABEL_GROUP)
        key = f"{md.get('namespace', '')}/{group}"
        if group and key in self.reconciler.rolling:
            self.queue.add(key)

    # ------------------------------------------------------------------ health and metrics
    async def _serve_health(self) -> web.AppRunner:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def readyz(_: web.Request) -> web.Response:
            ok = self._ready and not self._stopping.is_set()
            return web.Response(text="ok" if ok else "not ready", status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return await serve_ops_endpoint(app, self.cfg.health_addr, "--health-addr", "/healthz")

    # ------------------------------------------------------------------ workers
    async def _worker(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                after = await self.reconciler.reconcile(key)
                self.queue.forget(key)
                if after:
                    self.queue.add_after(key, after)
            except asyncio.CancelledError:
                raise
            except NotLeader as e:
                # Retried like any failure: a replica frozen past its renew deadline may renew
                # again and stay leader, and a key dropped here would wait for the next resync. If
                # the Lease is lost, the queue shuts down without draining and drops it.
                log.warning("reconcile %s stopped (retrying with backoff): %s", key, e)
                self.queue.add_rate_limited(key)
            except Exception as e:
                log.warning("reconcile %s failed (retrying with backoff): %r", key, e)
                self.queue.add_rate_limited(key)
            finally:
                self.queue.done(key)

    async def _resync(self) -> None:
        # Level-triggered safety net; costs no writes when nothing changed.
        while True:
            await asyncio.sleep(self.cfg.resync_seconds)
            for k in list(self.groups.store):
                self.queue.add(k)

    # ------------------------------------------------------------------ lifecycle
    async def _wait_synced(self) -> None:
        """Wait until every informer listed its objects, or until stopped (SIGTERM stays prompt)."""
        informers = [self.groups, *self.children.values(), self.pods]
        synced = asyncio.ensure_future(asyncio.gather(*(inf.synced.wait() for inf in informers)))
        stop_wait = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({synced, stop_wait}, timeout=CACHE_SYNC_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            synced.cancel()
            await asyncio.gather(stop_wait, synced, return_exceptions=True)  # retrieve the cancels
        if self._stopping.is_set():
            return
        missing = [inf.res.plural for inf in informers if not inf.synced.is_set()]
        if missing:
            raise CliError(
                f"could not list {', '.join(missing)} within {CACHE_SYNC_S:.0f}s",
                "check that the apiserver answers, that the pdorch CRDs and LeaderWorkerSet are "
                "installed, and that this ServiceAccount may list and watch them (see the warnings above)",
            )
        self._ready = True
        log.info("caches synced (%d ServingGroups)", len(self.groups.store))

    def stop(self) -> None:
        """Ask the controller to shut down gracefully."""
        self._stopping.set()

    async def run(self) -> int:
        """Run until stopped (0) or until leadership is lost (1)."""
        try:
            runner = await self._serve_health()
        except BaseException:
            await self._close_apis()
            raise
        informer_tasks = [
            asyncio.create_task(inf.run(), name=f"informer-{inf.res.plural}")
            for inf in [self.groups, *self.children.values(), self.pods]
        ]
        tasks: list[asyncio.Task[Any]] = []
        elector_task: asyncio.Task[None] | None = None
        code = 0
        try:
            await self._wait_synced()
            if self._stopping.is_set():
                pass  # SIGTERM before the caches synced: nothing to drain or release
            elif self.elector is not None:
                elector_task = asyncio.create_task(self.elector.run(), name="leader-election")
                stop_wait = asyncio.create_task(self._stopping.wait())
                lead_wait = asyncio.create_task(self.elector.is_leader.wait())
                await asyncio.wait({stop_wait, lead_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                lead_wait.cancel()
            if not self._stopping.is_set():
                for k in list(self.groups.store):
                    self.queue.add(k)
                tasks = [
                    asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self.cfg.workers)
                ]
                tasks.append(asyncio.create_task(self._resync(), name="resync"))
                waits = {asyncio.create_task(self._stopping.wait())}
                if self.elector is not None:
                    waits.add(asyncio.create_task(self.elector.lost.wait()))
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if self.elector is not None and self.elector.lost.is_set():
                    code = LOST_LEASE_EXIT
        finally:
            self._ready = False
            # A graceful stop finishes what is queued and in flight (bounded by the grace period).
            # After losing the Lease another replica may already lead: drop the queue and cancel
            # in-flight reconciles at once, so this replica sends no write it no longer owns.
            lost = code == LOST_LEASE_EXIT
            self.queue.shutdown(drain=not lost)
            workers = [t for t in tasks if t.get_name().startswith("worker-")]
            if workers:
                _, pending = await asyncio.wait(workers, timeout=0 if lost else self.cfg.shutdown_grace)
                for t in pending:
                    t.cancel()
            for t in [*tasks, *informer_tasks]:
                t.cancel()
            if elector_task is not None:
                elector_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await elector_task
            if tasks or informer_tasks:
                # Bounded: a watch stream whose connection went bad (e.g. while the process was
                # frozen) can take long to close, and shutdown must not wait on it.
                await asyncio.wait([*tasks, *informer_tasks], timeout=CANCEL_WAIT_S)
            if not lost:  # a fenced replica could not send them anyway
                await self.reconciler.events.flush()
            if self.elector is not None and code == 0:
                await self.elector.release()
            await runner.cleanup()
            await self._close_apis()
        return code

    async def _close_apis(self) -> None:
        await self.api.close()
        if self._lease_api is not None and self._lease_api is not self.api:
            await self._lease_api.close()


async def run_controller(cfg: ControllerConfig) -> int:
    """Run with SIGTERM/SIGINT wired to a graceful stop."""
    ctl = Controller(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctl.stop)
    log.info(
        "pdorch controller %s starting (namespace=%s, pid %d)",
        ctl.identity,
        cfg.namespace or "*",
        os.getpid(),
    )
    return await ctl.run()
