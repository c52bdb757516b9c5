"""Real processes behind a ServingGroup's kwok pods, so traffic to pod IPs gets real answers.

kwok runs no containers: a pod is only an API object with a loopback IP (a 127.X.0.0/16 per cluster, e.g. 127.1.x.y). This module
follows a group's pods and, for every Running pod, serves what its container would have served,
bound to that pod's IP and port:
- prefill/decode leader pods: a simulated engine (`pdorch.sim.SimServer`) of the group's protocol;
- the proxy pod: `pdorch proxy` as a subprocess, discovering the engines through the API like the
  in-cluster proxy does.
A terminating pod's backend keeps serving for the first half of kwok's termination window (the
proxy sees the pod leave in that time, as behind a preStop hook), then its engine gets what SIGTERM
gives a real one. Its listener closes either way: kwok hands the freed IP to the next pod at once,
and an engine still listening there would answer requests meant for the new pod (on a real node the
old container is dead before its IP is released). Then, like vLLM, it aborts its requests in flight,
unless the container's command asks for ``--shutdown-timeout SECONDS``: then they finish on their
open connections for up to that long (at most the grace of the pod or of its deletion), while the
new pod's engine serves the address. A pod deleted with no grace (``kubectl delete --grace-period=0
--force``; without ``--force`` kubectl asks for 1 s) is gone without a termination window: its
engine dies at once, as a crashed one does. A terminating proxy pod's `pdorch proxy` gets SIGTERM
after the same window and the rest of the pod's grace to finish its streams (within its own
``--shutdown-grace``, which the pod's command sets), then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from pdorch.controller.informer import Informer
from pdorch.controller.kubeapi import POD, KubeApi
from pdorch.devcluster.manifests import POD_TERMINATION_MS
from pdorch.devcluster.process import dies_with_parent
from pdorch.devcluster.waiting import wait_for_async
from pdorch.roles.drain_advice import flag_seconds, shutdown_timeout_s
from pdorch.roles.labels import (
    ANNOTATION_BOOTSTRAP_PORT,
    ANNOTATION_PORT,
    LABEL_GROUP,
    LABEL_REVISION,
    LABEL_ROLE_TYPE,
    LWS_WORKER_INDEX,
)
from pdorch.roles.pods import is_terminating, termination_grace_s
from pdorch.sim.config import SimConfig
from pdorch.sim.engine import Role
from pdorch.sim.server import SimServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """What should run for one pod (pure: derived from the pod object)."""

    pod: str
    uid: str
    kind: str  # "prefill" | "decode" | "proxy"
    ip: str
    port: int
    bootstrap_port: int | None = None
    revision: str = ""
    # A proxy pod's `--shutdown-grace` (None: the flag's default); fixed for the pod's life.
    shutdown_grace_s: float | None = field(default=None, compare=False)


def backend_for(pod: dict[str, Any]) -> Backend | None:
    """The backend a pod needs, or None (not running yet, a worker pod, not ours).

    A terminating pod keeps its backend (an engine serves its in-flight requests during the
    termination grace period, as a real one behind a preStop hook does); `PodBackends` only refuses
    to start one for a pod that is already terminating.
    """
    md, status = pod["metadata"], pod.get("status") or {}
    labels, ann = md.get("labels") or {}, md.get("annotations") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return None
    if labels.get(LWS_WORKER_INDEX, "0") != "0":
        return None  # multi-host workers serve no HTTP; the leader does
    kind = labels.get(LABEL_ROLE_TYPE)
    if kind not in ("prefill", "decode", "proxy"):
        return None
    port = int(ann.get(ANNOTATION_PORT) or _container_port(pod) or 8000)
    bp = ann.get(ANNOTATION_BOOTSTRAP_PORT)
    return Backend(
        md["name"],
        md["uid"],
        kind,
        status["podIP"],
        port,
        int(bp) if bp else None,
        labels.get(LABEL_REVISION, ""),
        _proxy_shutdown_grace_s(pod) if kind == "proxy" else None,
    )


def _proxy_shutdown_grace_s(pod: dict[str, Any]) -> float | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        grace = flag_seconds(c, ("--shutdown-grace",))
        if grace is not None:
            return grace
    return None


def grace_after_window_s(pod: dict[str, Any]) -> float:
    """What the kubelet leaves a terminating pod's containers after the window in which they still
    accept: its deletion's grace (``kubectl delete --grace-period``) once it is being deleted, else
    its spec's, less that window."""
    grace = (pod.get("metadata") or {}).get("deletionGracePeriodSeconds")
    if not isinstance(grace, int | float):
        grace = termination_grace_s(pod)
    return max(0.0, float(grace) - TERMINATING_ENGINE_S)


def engine_drain_s(pod: dict[str, Any]) -> float:
    """How long an engine pod's requests in flight may finish after SIGTERM: its container's
    ``--shutdown-timeout`` (vLLM's flag, also `pdorch sim`'s; absent: 0, vLLM's default of
    aborting them), cut to what the pod's grace leaves after the accepting window
    (`grace_after_window_s`: the kubelet kills the container at the end of the grace)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        wanted = shutdown_timeout_s(c)
        if wanted is not None:
            return min(wanted, grace_after_window_s(pod))
    return 0.0


def stop_budget_s(pod: dict[str, Any], kind: str) -> float:
    """What a terminating pod's process gets after its accepting window: an engine its drain
    (`engine_drain_s`); the proxy, which bounds its own shutdown by its ``--shutdown-grace``, the
    rest of the pod's grace before the kubelet's SIGKILL."""
    return grace_after_window_s(pod) if kind == "proxy" else engine_drain_s(pod)


# The kubelet's shortest grace: even a pod deleted with none gets this long after SIGTERM.
MIN_GRACE_S = 2.0


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if the process still runs after ``grace_s`` (at least `MIN_GRACE_S`)
    or when cancelled, as the kubelet ends a container."""
    try:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=max(grace_s, MIN_GRACE_S))
    except (TimeoutError, ProcessLookupError):  # still running; or already gone
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _until_refused(host: str, port: int, exiting: asyncio.Task[None], wait_s: float = 10.0) -> None:
    """Wait until nothing listens on host:port any more (a stopping proxy closes its listener on
    SIGTERM), so that the pod's successor, which kwok may give the same address, can bind it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not exiting.done() and loop.time() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except ConnectionRefusedError:
            return
        except (OSError, TimeoutError):  # no answer either way: look again
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await asyncio.sleep(0.05)


def _container_port(pod: dict[str, Any]) -> int | None:
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("containerPort"):
                return int(p["containerPort"])
    return None


# A terminating pod's engine lives this long; kwok removes the pod (and frees its IP) after
# POD_TERMINATION_MS, so this leaves half the window as margin.
TERMINATING_ENGINE_S = POD_TERMINATION_MS / 2000


@dataclass
class PodBackends:
    """Keeps one backend running per Running pod of `group` in `namespace`."""

    kubeconfig: str
    namespace: str
    group: str
    protocol: str = "vllm"
    sim_config: SimConfig | None = None
    proxy_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    engines: dict[str, SimServer] = field(default_factory=dict)  # pod name -> engine server
    # Every engine backend ever started (pod UID -> backend, server; StatefulSet pods reuse names),
    # kept after the pod is gone so
    # a test can audit what each engine did (e.g. which prefill engines a decode pulled KV from).
    history: dict[str, tuple[Backend, SimServer]] = field(default_factory=dict)
    proxies: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    _running: dict[str, Backend] = field(default_factory=dict)
    _api: KubeApi | None = None
    _informer: Informer | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Per terminating pod: loop time at which its backend is stopped, and its engine's drain
    # (`engine_drain_s`, read while the pod shows its deletion's grace).
    _ends: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Engines of gone pods still finishing their requests in flight (`engine_drain_s`).
    _draining: dict[asyncio.Task[None], SimServer] = field(default_factory=dict)
    # Proxy processes of gone pods between SIGTERM and their exit (or SIGKILL at the grace's end).
    _exiting: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._api = KubeApi.from_config(self.kubeconfig, field_manager="pdorch-pod-backends")
        self._informer = Informer(self._api, POD, self.namespace, f"{LABEL_GROUP}={self.group}")
        self._informer.add_handler(lambda _t, _o: self._wake.set())
        self._tasks = [asyncio.create_task(self._informer.run()), asyncio.create_task(self._loop())]
        await asyncio.wait_for(self._informer.synced.wait(), timeout=30)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for name in list(self._running):
            await self._stop_backend(name)
        for task, server in list(self._draining.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await server.stop(drain_s=0)
        # Proxies stopped just now get their SIGTERM's short wait; those of gone pods are killed.
        for task in list(self._exiting):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), MIN_GRACE_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._api is not None:
            await self._api.close()

    def backend(self, pod: str) -> Backend | None:
        return self._running.get(pod)

    def by_kind(self, kind: str) -> list[Backend]:
        return [b for b in self._running.values() if b.kind == kind]

    async def proxy_url(self, wait_s: float = 60) -> str:
        """The proxy pod's URL, once its backend runs and answers /health with 200 (it has found a
        usable prefill/decode pair, or, with minPromptTokens, a decode for short prompts alone)."""
        proxies = await wait_for_async(lambda: self.by_kind("proxy"), wait_s, "the proxy pod's backend")
        url = f"http://{proxies[0].ip}:{proxies[0].port}"

        async def healthy() -> bool:
            try:
                async with httpx2.AsyncClient(trust_env=False) as c:
                    return (await c.get(f"{url}/health", timeout=2)).status_code == 200
            except httpx2.HTTPError:
                return False

        await wait_for_async(healthy, wait_s, "the proxy pod's /health")
        return url

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
            except Exception:
                log.exception("pod backends: sync failed")

    async def _sync(self) -> None:
        assert self._informer is not None
        pods = {p["metadata"]["name"]: p for p in self._informer.store.values()}
        want = {b.pod: b for p in pods.values() if (b := backend_for(p)) is not None}
        loop = asyncio.get_running_loop()
        for name, b in list(self._running.items()):
            pod = pods.get(name)
            same_pod = pod is not None and pod["metadata"].get("uid") == b.uid
            if same_pod and is_terminating(pod):
                # Its drain as the deletion left it (a second delete may shorten the grace).
                end, drain = self._ends.get(name, (loop.time() + TERMINATING_ENGINE_S, float("inf")))
                if name not in self._ends:
                    loop.call_later(TERMINATING_ENGINE_S, self._wake.set)
                self._ends[name] = (end, min(drain, stop_budget_s(pod, b.kind)))
            # Seen terminating: its window ended, or the pod is gone or replaced first (a slow
            # wake-up); either way its engine drains as after SIGTERM.
            if name in self._ends and (loop.time() >= self._ends[name][0] or not same_pod):
                await self._stop_backend(name, drain_s=self._ends[name][1])
            elif want.get(name) != b:  # gone without a termination window, or another pod now
                await self._stop_backend(name)
        for name, b in want.items():
            if name not in self._running and not is_terminating(pods[name]):
                await self._start_backend(b)

    async def _start_backend(self, b: Backend) -> None:
        if b.kind == "proxy":
            argv = [
                sys.executable, "-m", "pdorch.cli", "proxy",
                "--engine", self.protocol, "--group", self.group, "--namespace", self.namespace,
                "--kubeconfig", self.kubeconfig, "--host", b.ip, "--port", str(b.port),
                # No load balancer here to move traffic during a drain delay, and kwok may hand
                # the pod's IP to its successor: stop listening at once, as before the delay.
                "--shutdown-drain-delay", "0",
                # The pod's own grace flag (the built-in proxy's follows the engines' pods' grace).
                *(["--shutdown-grace", f"{b.shutdown_grace_s:g}"] if b.shutdown_grace_s is not None else []),
                *self.proxy_args,
            ]  # fmt: skip
            out = self._proxy_log(b.pod)
            self.proxies[b.pod] = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, preexec_fn=dies_with_parent()
            )
        else:
            cfg = self.sim_config or SimConfig(protocol=self.protocol)  # type: ignore[arg-type]
            server = SimServer(
                cfg,
                host=b.ip,
                ports=[b.port],
                role=Role.PREFILL if b.kind == "prefill" else Role.DECODE,
                bootstrap_port=(b.bootstrap_port or 8998) if b.kind == "prefill" else None,
                # Each stop says how long it drains (`_stop_backend`, from `engine_drain_s`).
                shutdown_timeout_s=0.0,
            )
            await server.start()
            self.engines[b.pod] = server
            self.history[b.uid] = (b, server)
        self._running[b.pod] = b
        log.info("pod backends: %s %s serving on %s:%d", b.kind, b.pod, b.ip, b.port)

    def _proxy_log(self, pod: str) -> Any:
        """Where a proxy subprocess writes its log (a file in log_dir, or nowhere)."""
        if self.log_dir is None:
            return asyncio.subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"proxy-{pod}.log", "ab")

    async def _stop_backend(self, name: str, *, drain_s: float = 0.0) -> None:
        """Stop a pod's backend: an engine's requests in flight finish in the background for up to
        ``drain_s`` (`engine_drain_s`: what SIGTERM gives it); 0 aborts them, as a killed process.
        A proxy gets SIGTERM and ``drain_s`` (the rest of its pod's grace, `stop_budget_s`) to end
        within its own ``--shutdown-grace``, then SIGKILL; it has stopped listening on return."""
        self._ends.pop(name, None)
        b = self._running.pop(name, None)
        server = self.engines.pop(name, None)
        draining = 0
        if server is not None and drain_s > 0:
            await server.stop_accepting()  # the address is free for the pod's successor now
            draining = server.in_flight
            task = asyncio.create_task(server.stop(drain_s=drain_s))
            self._draining[task] = server
            task.add_done_callback(self._drained)
        elif server is not None:
            await server.stop(drain_s=0)
        proc = self.proxies.pop(name, None)
        if proc is not None and proc.returncode is None:
            # The proxy's streams in flight go on in the background for the rest of the pod's grace
            # (the proxy closes its listener at once, freeing the address for the pod's successor).
            exit_task = asyncio.create_task(_terminate(proc, drain_s))
            self._exiting.add(exit_task)
            exit_task.add_done_callback(self._exiting.discard)
            if b is not None:
                await _until_refused(b.ip, b.port, exit_task)
        if b is not None:
            how = f" ({draining} request(s) in flight may finish for up to {drain_s:g}s)" if draining else ""
            log.info("pod backends: stopped %s %s%s", b.kind, name, how)

    def _drained(self, task: asyncio.Task[None]) -> None:
        self._draining.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("pod backends: a draining engine failed to stop", exc_info=task.exception())
