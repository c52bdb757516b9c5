"""`pdorch demo`: P/D serving end to end on the local dev cluster, with a live view.

Steps (each shown as it happens): start the dev cluster, install the CRDs, run the controller,
apply examples/sim-pd, put simulated engines behind the prefill/decode pods' IPs and the proxy
behind the proxy pod's IP, send trace-shaped traffic through the proxy, and show per-role
replicas, requests/s, TTFT/TPOT percentiles and the controller's decisions. Ctrl-C (or
--duration) stops the traffic and tears down everything the demo started; a dev cluster that was
already running is reused and left running (only the demo's namespace or ServingGroup is removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Namespace as LkNamespace

from pdorch.cli_errors import CliError, expected_parts
from pdorch.controller.kubeapi import EVENT, SERVING_GROUP, SERVING_ROLE_SCALER, KubeApi
from pdorch.controller.kubeapi import ApiError as KubeApiError
from pdorch.demo.traffic import Stats, run_users
from pdorch.demo.view import render_view
from pdorch.devcluster.binaries import repo_root
from pdorch.devcluster.cluster import ClusterState, DevCluster, default_state_dir, install_pdorch_crds
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.pod_backends import PodBackends
from pdorch.devcluster.process import StartupError
from pdorch.devcluster.waiting import wait_for_async
from pdorch.sim.config import SimConfig

SG = create_namespaced_resource("pdorch.io", "v1alpha1", "ServingGroup", "servinggroups")
NAMESPACE = "demo"
GROUP = "sim-pd"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _apply_example(st: ClusterState, image: str | None = None) -> None:
    """Apply examples/sim-pd; with `image`, the same group with a new engine image (a rollout)."""
    doc = yaml.safe_load((repo_root() / "examples" / "sim-pd" / "servinggroup.yaml").read_text())
    doc["metadata"]["namespace"] = NAMESPACE
    for role in doc["spec"]["roles"]:
        if role["type"] == "decode":
            # Decode replicas come from ServingRoleScaler/sim-pd-decode (what an HPA or KEDA drives).
            role["scaling"] = {"mode": "External", "minReplicas": 1, "maxReplicas": 3}
    if image is not None:
        for role in doc["spec"]["roles"]:
            if role["type"] in ("prefill", "decode"):
                role["workerTemplate"]["spec"]["containers"][0]["image"] = image
    st.client().apply(from_dict(doc), field_manager="pdorch-demo", force=True)


def _available(st: ClusterState) -> bool:
    obj = st.client().get(SG, GROUP, namespace=NAMESPACE)
    if obj.metadata is not None and obj.metadata.deletionTimestamp:
        return False  # a previous demo's group on its way out
    return any(
        c["type"] == "Available" and c["status"] == "True" for c in (obj.status or {}).get("conditions", [])
    )


async def _events(api: KubeApi) -> list[str]:
    items, _ = await api.list(EVENT, NAMESPACE)
    items.sort(key=lambda e: e.get("eventTime") or e["metadata"].get("creationTimestamp") or "")
    return [
        f"{(e.get('eventTime') or '')[11:19]} {e.get('type', '')[:1]} {e.get('reason', '')}: {e.get('note', '')}"[
            :110
        ]
        for e in items
        if e.get("reportingController") == "pdorch.io/controller"
    ]


async def running_cluster(cluster: DevCluster) -> ClusterState | None:
    """The dev cluster's state if it already runs (the demo then reuses it and leaves it up), else None."""
    if not cluster.exists():
        return None
    if not await asyncio.to_thread(cluster.is_up):
        # Starting over would delete its state and logs: leave that choice to the user.
        name = cluster.state_dir.name
        raise CliError(
            f"a dev cluster named {name!r} exists at {cluster.state_dir} but is not up",
            f"`pdorch dev-cluster --name {name} up` removes it and starts a fresh one (its objects "
            f"are lost), `pdorch dev-cluster --name {name} down` only removes it; or pass another "
            "--cluster-name",
        )
    st = cluster.state()
    if st is not None:
        say(
            f"reusing the running dev cluster at {st.dir}: it stays up afterwards, "
            "and only what the demo creates is removed"
        )
    return st


def _namespace_exists(st: ClusterState, name: str) -> bool | None:
    """True if the namespace exists, False if not, None while it is being deleted (a previous
    demo's, on a reused cluster: applying into it fails, and its old group still looks Available)."""
    try:
        ns = st.client().get(LkNamespace, name)
    except ApiError as e:
        if e.status.code == 404:
            return False
        raise
    return None if ns.metadata is not None and ns.metadata.deletionTimestamp else True


def _delete_demo_objects(st: ClusterState, delete_namespace: bool) -> None:
    """Remove what the demo applied to a cluster it did not start (the controller is stopped by then;
    the cluster's garbage collector removes the group's children through their owner references)."""
    client = st.client()
    try:
        if delete_namespace:
            client.delete(LkNamespace, NAMESPACE)
        else:
            client.delete(SG, GROUP, namespace=NAMESPACE)
    except ApiError as e:
        if e.status.code != 404:
            raise


async def release_cluster(
    cluster: DevCluster,
    st: ClusterState | None,
    started: bool,
    delete_objects: Callable[[ClusterState], None],
) -> None:
    """Stop the dev cluster if the demo started it (or tried to); on a reused one, which stays
    running, only `delete_objects` removes what the demo created there."""
    if started:
        await asyncio.to_thread(cluster.down)
    elif st is not None:
        await asyncio.to_thread(delete_objects, st)
        say(f"left the dev cluster at {st.dir} running (the demo did not start it)")


async def demo(
    users: int, duration: float | None, cluster_name: str, rollout_after: float | None = 30.0
) -> int:
    """Run the demo; returns the exit code.

    After `rollout_after` seconds of traffic the engine image changes, so the view shows a
    ratio-preserving rollout (steps in the events, revisions in the status) under live traffic;
    30 s later the decode role is scaled to 2 through its ServingRoleScaler's /scale, as an HPA would.
    """
    # Pods turn Ready 1-2 s after they start, like an engine behind a readiness probe: kwok has no
    # probes, and a pod Ready before its simulated engine listens would get traffic too early.
    cluster = DevCluster(default_state_dir(cluster_name), progress=say, pod_ready_ms=(1000, 2000))
    with cluster.held_by_one(lambda: _refuse_second_demo(cluster_name)):
        return await _demo(cluster, users, duration, cluster_name, rollout_after)


def _refuse_second_demo(cluster_name: str) -> None:
    # Two demos on one cluster collide: the second's engines cannot bind the pods' addresses, and
    # the first takes the cluster down under the second when it stops.
    raise CliError(
        f"another `pdorch demo` is running on the dev cluster {cluster_name!r}",
        "stop it first (Ctrl-C in its terminal), or run this one on its own cluster with "
        "--cluster-name <another name>",
    )


async def _demo(
    cluster: DevCluster, users: int, duration: float | None, cluster_name: str, rollout_after: float | None
) -> int:
    ctl: ControllerProc | None = None
    backends: PodBackends | None = None
    api: KubeApi | None = None
    stop = asyncio.Event()
    traffic: asyncio.Task[None] | None = None
    st: ClusterState | None = None
    started = False  # only a cluster the demo started itself is taken down at the end
    namespace_created = False
    stats = Stats()
    failed: BaseException | None = None
    kept: Path | None = None  # where a failed demo's cluster logs were copied
    logs = contextlib.ExitStack()
    # SIGTERM and SIGHUP (a closed terminal, `kill`) stop the demo as Ctrl-C does: through the
    # cleanup below. Without this they killed the CLI alone and left the cluster, controller and
    # proxy running, which the next demo then silently reused.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        main.cancel()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    if duration is not None and rollout_after is not None and rollout_after >= duration:
        say(
            f"no rollout in this run: --rollout-after {rollout_after:g} is not before --duration {duration:g}"
        )
        rollout_after = None
    try:
        st = await running_cluster(cluster)
        if st is None:
            started = True
            st = await asyncio.to_thread(cluster.up)
        namespace_created = True  # a cluster the demo started has no demo namespace yet
        if not started:
            exists = await asyncio.to_thread(_namespace_exists, st, NAMESPACE)
            if exists is None:
                say(f"waiting for the previous demo's namespace {NAMESPACE} to be deleted")
                await wait_for_async(
                    lambda: asyncio.to_thread(lambda: _namespace_exists(st, NAMESPACE) is False),
                    120,
                    f"namespace {NAMESPACE} to be deleted",
                    0.5,
                )
                exists = False
            namespace_created = not exists
        say("installing the pdorch CRDs")
        await asyncio.to_thread(install_pdorch_crds, st.client(), "pdorch-demo", (NAMESPACE, "pdorch-system"))
        say("starting the pdorch controller")
        ctl = ControllerProc(st.kubeconfig, "demo", f"demo-{uuid.uuid4().hex[:6]}")
        # Polled from the loop, each check in a thread: a Ctrl-C stops the wait at once (a wait in
        # one thread held the exit for its whole timeout).
        await wait_for_async(
            lambda: asyncio.to_thread(ctl.is_ready), 60, "the pdorch controller to become ready", 0.5
        )
        say(f"applying examples/sim-pd/servinggroup.yaml in namespace {NAMESPACE}")
        await asyncio.to_thread(_apply_example, st)
        await wait_for_async(
            lambda: asyncio.to_thread(_available, st), 120, "ServingGroup sim-pd Available", 0.5
        )
        say("ServingGroup Available; starting simulated engines on the pods' IPs and the proxy pod")
        backends = PodBackends(
            st.kubeconfig,
            NAMESPACE,
            GROUP,
            protocol="vllm",
            sim_config=SimConfig(protocol="vllm"),
            log_dir=Path(st.dir) / "logs",
            # /metrics on the proxy's own port: a local Prometheus often holds 9090 on 0.0.0.0.
            proxy_args=["--metrics-on-client-port"],
        )
        engine_log = Path(st.dir) / "logs" / "demo-engines.log"
        say(f"the engines' and pod backends' log lines go to {engine_log}")
        logs.enter_context(_info_logs_to(engine_log))
        await backends.start()
        url = await backends.proxy_url()
        say(
            f"sending traffic through the proxy pod at {url} ({users} users, Azure 2023 conversation lengths)"
        )
        traffic = asyncio.create_task(run_users(url, users, stats, stop))
        api = KubeApi.from_config(st.kubeconfig, field_manager="pdorch-demo")
        t0 = time.monotonic()
        tty = sys.stdout.isatty()
        last_plain = 0.0
        rolled = scaled = rollout_after is None
        while duration is None or time.monotonic() - t0 < duration:
            await asyncio.sleep(1.0)
            if not rolled and time.monotonic() - t0 >= (rollout_after or 0.0):
                rolled = True
                say("changing the engine image to pdorch/sim:v2: watch the rollout steps below")
                await asyncio.to_thread(_apply_example, st, "pdorch/sim:v2")
            if not scaled and time.monotonic() - t0 >= (rollout_after or 0.0) + 30:
                scaled = True
                say("scaling decode to 2 through ServingRoleScaler/sim-pd-decode (like `kubectl scale`)")
                await api.patch(
                    SERVING_ROLE_SCALER,
                    f"{GROUP}-decode",
                    NAMESPACE,
                    {"spec": {"replicas": 2}},
                    subresource="scale",
                )
            if traffic.done():
                traffic.result()  # surface a crash of the traffic generator
            group: dict[str, Any] | None = await api.get(SERVING_GROUP, GROUP, NAMESPACE)
            now = time.monotonic()
            screen = render_view(
                group,
                stats.snapshot(now),
                {"ok": stats.total_ok, "failed": stats.total_failed, "errors": stats.errors},
                await _events(api),
                now - t0,
            )
            if tty:
                print("\x1b[2J\x1b[H" + screen, flush=True)
            elif now - last_plain >= 5:
                print(screen + "\n", flush=True)
                last_plain = now
        return 0 if stats.total_ok > 0 else 1
    except asyncio.CancelledError:
        if received:
            return 128 + received[0]  # after the cleanup below, as a shell reports the signal
        raise
    except (AssertionError, StartupError, ApiError, KubeApiError) as e:
        # A wait of the dev-cluster helpers timed out, a process died, the cluster did not start,
        # or the API refused: one line (the logs are copied out below).
        failed = e
        raise CliError(_first_line(e), "the logs are kept: see the path above") from None
    except Exception as e:
        failed = e
        raise
    finally:
        # A second Ctrl-C or SIGTERM during the cleanup would cut it short and leak the cluster.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, _still_cleaning, cluster_name)
        previous_sigint = signal.signal(signal.SIGINT, lambda *_: _still_cleaning(cluster_name))
        # A demo refused before it had a cluster (one that exists but is not up) started nothing.
        anything = started or st is not None
        if anything:
            say(f"stopping: traffic, engines, proxy, controller{', dev cluster' if started else ''}")
        stop.set()
        if traffic is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(traffic, timeout=30)
        # Each step on its own: one that fails must not skip the others, nor the cluster's removal.
        if backends is not None:
            await _step("stopping the engines and the proxy", backends.stop())
        if api is not None:
            await _step("closing the API client", api.close())
        if ctl is not None:
            await _step("stopping the controller", asyncio.to_thread(ctl.stop))
        logs.close()
        try:
            if failed is not None and (started or st is not None):
                say(f"failed: {_first_line(failed)}")
                # A cluster the demo started is removed below; its logs are copied out first.
                kept = _keep_logs(cluster.state_dir if started or st is None else Path(st.dir))
                if kept is not None:
                    say(f"the logs of the cluster, controller and proxy are kept in {kept}")
        except OSError as e:
            say(f"could not copy the logs out ({e}); removing the cluster anyway")
        try:
            await release_cluster(cluster, st, started, lambda s: _delete_demo_objects(s, namespace_created))
        finally:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            signal.signal(signal.SIGINT, previous_sigint)
        if traffic is not None:
            say(
                f"summary: {stats.total_ok} requests ok, {stats.total_failed} failed"
                + (
                    f" ({', '.join(f'{k}: {v}' for k, v in sorted(stats.errors.items()))})"
                    if stats.errors
                    else ""
                )
                + (
                    f"; TTFT p50 {stats.lifetime_ttft_ms(0.5):.0f} ms, p99 {stats.lifetime_ttft_ms(0.99):.0f} ms"
                    if stats.total_ok
                    else ""
                )
            )
        if anything:
            say("cleaned up")
        if started and failed is not None and not isinstance(failed, CliError):
            parts = expected_parts(failed)
            if parts is not None:
                # Its hint (`pdorch dev-cluster status`) is about the cluster just removed above.
                logs_hint = f"its logs are in {kept}" if kept is not None else "its logs could not be kept"
                raise CliError(parts[0], f"the demo removed the cluster it started; {logs_hint}") from failed


@contextlib.contextmanager
def _info_logs_to(path: Path) -> Iterator[None]:
    """Send this process's INFO log lines (the in-process engines', the pod backends') to `path`,
    leaving warnings and errors on the terminal: the view redraws the screen every second and
    interleaved log lines are lost in it or break it up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    raised = [(h, h.level) for h in root.handlers]
    for h, _ in raised:
        h.setLevel(max(h.level, logging.WARNING))
    root.addHandler(to_file)
    try:
        yield
    finally:
        root.removeHandler(to_file)
        to_file.close()
        for h, level in raised:
            h.setLevel(level)


async def _step(what: str, work: Awaitable[object]) -> None:
    """One cleanup step; a failure is said and the cleanup goes on."""
    try:
        await work
    except Exception as e:
        say(f"{what} failed ({_first_line(e)}); going on with the cleanup")


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _still_cleaning(cluster_name: str) -> None:
    say(
        "still cleaning up; please wait (if it is cut short, "
        f"`pdorch dev-cluster --name {cluster_name} down` stops what is left)"
    )


def _keep_logs(state_dir: Path) -> Path | None:
    """Copy the cluster's logs out of its state directory, which the cleanup removes."""
    logs = state_dir / "logs"
    if not logs.is_dir():
        return None
    dest = state_dir.parent / f"{state_dir.name}-logs-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.copytree(logs, dest, dirs_exist_ok=True)
    return dest
