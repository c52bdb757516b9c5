"""The local dev cluster: real etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
and the LWS manager, all on loopback, state kept in one directory.

`up` starts each component in dependency order and returns once every one is healthy; a component
that fails raises StartupError naming it, with the tail of its log. `down` stops exactly the PIDs it
recorded and removes the state directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import yaml
from lightkube import Client, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Namespace as LkNamespace
from lightkube.resources.core_v1 import Node

from pdorch.cli_errors import CliError
from pdorch.devcluster import binaries, manifests, pki
from pdorch.devcluster.process import Managed, StartupError, exited, free_port, start, stop, tail, wait_until

log = logging.getLogger(__name__)

FIELD_MANAGER = "pdorch-devcluster"
DEFAULT_NODES = 8
DEFAULT_GPUS_PER_NODE = 8

LeaderWorkerSet = create_namespaced_resource(
    "leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets"
)


# A name becomes one path component under the state root, and `down` deletes that directory: no
# "", ".", "..", "/" or absolute paths can get through (a DNS-label-like name, as kind/minikube use).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# Written into a state directory at `up` before anything else: `down` only deletes a directory
# holding this file or state.json, never an arbitrary directory a mistyped flag points to.
MARKER = ".pdorch-devcluster"


class NotADevClusterError(CliError, RuntimeError):
    """A state directory that pdorch did not create."""


def validate_name(name: str) -> str:
    """Return `name` if it is a valid dev cluster name, else raise ValueError saying what is valid."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid dev cluster name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return name


@contextlib.contextmanager
def _flocked(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created with its directory); `on_wait` runs once if
    another process holds it. The file stays (removing it would let a third process lock a new
    file while a waiter holds the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _choosing_lock() -> contextlib.AbstractContextManager[None]:
    """An exclusive lock over the dev clusters' state root while a new one picks its pod range."""
    return _flocked(state_root() / ".choosing.lock")


def _lock_file(state_dir: Path, suffix: str) -> Path:
    """A lock file of one dev cluster, beside its state directory (which `down` removes)."""
    state_dir = state_dir.resolve()  # `--state-dir .` has no name of its own
    return (
        state_dir.with_name(f".{state_dir.name}.{suffix}")
        if state_dir.name
        else state_dir / f".devcluster.{suffix}"
    )


def _cluster_lock(
    state_dir: Path, progress: Callable[[str], None]
) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock over one dev cluster while it is brought up or down: a second `up` of the
    same name waits for the first (and then finds it up) instead of taking its half-started state
    for a stale one and stopping it."""
    state_dir = state_dir.resolve()
    # An `up` on a cold cache builds binaries for many minutes: say why nothing happens.
    return _flocked(
        _lock_file(state_dir, "lock"),
        lambda: progress(
            f"another `up` or `down` of the dev cluster at {state_dir} is running; waiting for it"
        ),
    )


def state_root() -> Path:
    """The directory holding every named dev cluster's state (PDORCH_DEVCLUSTER_DIR overrides it)."""
    root = os.environ.get("PDORCH_DEVCLUSTER_DIR")
    return Path(root) if root else binaries.cache_root() / "devcluster"


def default_state_dir(name: str = "default") -> Path:
    """State directory of a named dev cluster (override the root with PDORCH_DEVCLUSTER_DIR).

    Raises ValueError for a name that is not a plain cluster name (see `validate_name`).
    """
    return state_root() / validate_name(name)


def is_cluster_dir(path: Path) -> bool:
    """True if `path` is a dev cluster state directory pdorch created (marker or state.json)."""
    return (path / MARKER).is_file() or (path / "state.json").is_file()


def cluster_names(root: Path | None = None) -> list[str]:
    """Names of the dev clusters with state under `root` (default: `state_root()`), sorted."""
    root = root or state_root()
    try:
        return sorted(d.name for d in root.iterdir() if d.is_dir() and is_cluster_dir(d))
    except OSError:
        return []


@dataclass
class ClusterState:
    """Everything `down`, `status` and `env` need, persisted as state.json."""

    dir: str
    bin_dir: str
    ports: dict[str, int]
    token: str
    nodes: list[str] = field(default_factory=list)
    processes: list[Managed] = field(default_factory=list)
    # How long `up` took; 0 while it runs or when it was cut short (then the cluster is not up).
    up_seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)
    # Chosen at `up` among the ranges other clusters do not hold; "" in state files written before
    # it was recorded (their range then follows from the name, see `pod_cidr`).
    pod_network: str = ""

    @property
    def kubeconfig(self) -> str:
        return str(Path(self.dir) / "kubeconfig")

    @property
    def pod_cidr(self) -> str:
        """This cluster's loopback pod network (kwok assigns pod IPs from it)."""
        return self.pod_network or manifests.legacy_pod_cidr_for(Path(self.dir).name)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca(self) -> str:
        return str(pki.PkiPaths(Path(self.dir) / "pki").ca_crt)

    def save(self) -> None:
        """Write state.json atomically: another `up` choosing its pod range reads it meanwhile, and a
        half-written file would read as no cluster (and its range as free)."""
        path = Path(self.dir, "state.json")
        tmp = path.with_name(f".state.json.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        f = state_dir / "state.json"
        if not f.exists():
            return None
        data = json.loads(f.read_text())
        data["processes"] = [Managed(**p) for p in data.get("processes", [])]
        return cls(**data)

    def process(self, name: str) -> Managed | None:
        return next((p for p in self.processes if p.name == name), None)

    def client(self) -> Client:
        """A lightkube client for the admin user."""
        return Client(config=KubeConfig.from_file(self.kubeconfig), field_manager=FIELD_MANAGER)

    def kubectl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run this cluster's own kubectl (matching version) as admin; the caller checks the result."""
        return subprocess.run(
            [str(Path(self.bin_dir) / "kubectl"), *args],
            env={**os.environ, "KUBECONFIG": self.kubeconfig},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _ssl_ctx(ca: str | None) -> ssl.SSLContext:
    if ca is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # KCM/scheduler serve self-signed certs on loopback
        return ctx
    return ssl.create_default_context(cafile=ca)


def _http_ok(url: str, ca: str | None = None, token: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    verify: ssl.SSLContext | bool = _ssl_ctx(ca) if url.startswith("https") else True
    r = httpx2.get(url, verify=verify, headers=headers, timeout=2.0, trust_env=False)
    return r.status_code == 200


def _tls_listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw:
        ctx = _ssl_ctx(None)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
            return True


class DevCluster:
    """Start, stop and inspect one named local cluster."""

    def __init__(
        self,
        state_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
        pod_ready_ms: tuple[int, int] | None = None,
    ) -> None:
        self.state_dir = state_dir or default_state_dir()
        # (lo, hi): pods turn Ready after a uniform delay in this range (None: at once).
        self.pod_ready_ms = pod_ready_ms
        self.progress = progress or (lambda msg: log.info("%s", msg))

    # ---------------------------------------------------------------- inspection
    def state(self) -> ClusterState | None:
        return ClusterState.load(self.state_dir)

    def status(self) -> dict[str, Any]:
        """Per component: pid, running, and (for servers) whether its health endpoint answers."""
        st = self.state()
        if st is None:
            return {"up": False, "dir": str(self.state_dir), "components": {}}
        comps: dict[str, Any] = {}
        checks = self._health_checks(st)
        for p in st.processes:
            healthy: bool | None = None
            if p.alive() and p.name in checks:
                try:
                    healthy = checks[p.name]()
                except Exception:
                    healthy = False
            comps[p.name] = {"pid": p.pid, "running": p.alive(), "healthy": healthy, "log": p.log}
        # A start still running or cut short has recorded only some components: not up.
        complete = st.up_seconds > 0
        up = (
            complete
            and bool(comps)
            and all(c["running"] and c["healthy"] is not False for c in comps.values())
        )
        return {
            "up": up,
            "complete": complete,
            "dir": st.dir,
            "kubeconfig": st.kubeconfig,
            "pod_cidr": st.pod_cidr,
            "components": comps,
        }

    @staticmethod
    def _health_checks(st: ClusterState) -> dict[str, Callable[[], bool]]:
        return {
            "etcd": lambda: _http_ok(f"http://127.0.0.1:{st.ports['etcd']}/health"),
            "kube-apiserver": lambda: _http_ok(f"{st.server}/readyz", st.ca, st.token),
            "kube-controller-manager": lambda: _http_ok(f"https://127.0.0.1:{st.ports['kcm']}/healthz"),
            "kube-scheduler": lambda: _http_ok(f"https://127.0.0.1:{st.ports['scheduler']}/healthz"),
            "lws-manager": lambda: _http_ok(f"http://127.0.0.1:{st.ports['lws_health']}/readyz"),
        }

    def is_up(self) -> bool:
        return bool(self.status()["up"])

    # ---------------------------------------------------------------- lifecycle
    def up(self, nodes: int = DEFAULT_NODES, gpus_per_node: int = DEFAULT_GPUS_PER_NODE) -> ClusterState:
        """Bring the cluster up (or return the running one). Raises StartupError on failure."""
        with self._writing_state(), _cluster_lock(self.state_dir, self.progress):
            return self._up(nodes, gpus_per_node)

    @contextlib.contextmanager
    def held_by_one(self, on_busy: Callable[[], None]) -> Iterator[None]:
        """An exclusive hold on this cluster for a program that uses it for a while (`pdorch
        demo`); `on_busy` runs, and should raise, when another program holds it."""
        with contextlib.ExitStack() as held:
            with self._writing_state():  # only taking the lock: errors of the holder are its own
                held.enter_context(_flocked(_lock_file(self.state_dir, "session.lock"), on_busy))
            yield

    def held(self) -> bool:
        """True while a program holds this cluster with `held_by_one` (a `pdorch demo` runs on it)."""
        path = _lock_file(self.state_dir, "session.lock")
        if not path.exists():
            return False
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    @contextlib.contextmanager
    def _writing_state(self) -> Iterator[None]:
        """A state root that cannot be written (read-only, full, not ours) is one clear error."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EDQUOT):
                raise
            raise CliError(
                f"cannot write the dev cluster state under {self.state_dir.parent}: {e.strerror}",
                "free some space, or set PDORCH_DEVCLUSTER_DIR to a writable directory",
            ) from e

    def _up(self, nodes: int, gpus_per_node: int) -> ClusterState:
        existing = self.state()
        if existing is not None:
            if self.is_up():
                self.progress(f"dev cluster already up: KUBECONFIG={existing.kubeconfig}")
                return existing
            self.progress(
                "found this dev cluster partly stopped; removing it (its objects are lost) "
                "and starting a fresh one"
            )
            self._down()

        if self.state_dir.exists() and not is_cluster_dir(self.state_dir) and any(self.state_dir.iterdir()):
            # `down` would later delete it: never adopt a directory pdorch did not create.
            raise NotADevClusterError(
                f"{self.state_dir} exists and is not a dev cluster state directory",
                "choose another --name or --state-dir",
            )
        t0 = time.monotonic()
        self.progress("locating control-plane binaries (building them on a cold cache)")
        bins = binaries.ensure()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / MARKER).write_text(
            "pdorch dev cluster state; `pdorch dev-cluster down` removes it\n"
        )
        st: ClusterState | None = None
        try:
            p = pki.PkiPaths(self.state_dir / "pki")
            token = pki.generate(p)
            ports = {
                k: free_port()
                for k in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "lws_webhook", "lws_health")
            }
            # Choosing a pod range and recording it is one step under a lock, so two `up`s started
            # together cannot both pick the same free range.
            with _choosing_lock():
                st = ClusterState(
                    dir=str(self.state_dir),
                    bin_dir=str(bins.dir),
                    ports=ports,
                    token=token,
                    pod_network=manifests.pod_cidr_for(self.state_dir.name, self._other_pod_cidrs()),
                )
                Path(st.kubeconfig).write_text(manifests.kubeconfig(st.server, p.ca_crt, token))
                st.save()
            self._start_all(st, bins, p, nodes, gpus_per_node)
        except KeyboardInterrupt:
            # The user gave up on this start: stop what runs and leave no state behind.
            self._stop_started(st)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            raise
        except BaseException:
            # Leave logs for inspection but stop every process we started.
            self._stop_started(st)
            raise
        st.up_seconds = max(round(time.monotonic() - t0, 2), 0.01)  # > 0 marks the start complete
        st.save()
        self.progress(f"dev cluster up in {st.up_seconds:.1f}s: export KUBECONFIG={st.kubeconfig}")
        return st

    def _start_all(
        self, st: ClusterState, bins: binaries.Binaries, p: pki.PkiPaths, nodes: int, gpus_per_node: int
    ) -> None:
        logs = self.state_dir / "logs"
        self._step(st, "etcd", lambda: self._start_etcd(st, bins, logs))
        self._step(st, "kube-apiserver", lambda: self._start_apiserver(st, bins, p, logs))
        self._step(st, "kube-controller-manager", lambda: self._start_kcm(st, bins, p, logs))
        self._step(st, "kube-scheduler", lambda: self._start_scheduler(st, bins, logs))
        client = st.client()
        self._step(st, "LWS CRDs", lambda: self._install_crds(client, bins.lws_crds))
        self._step(st, "kwok", lambda: self._start_kwok(st, bins, logs))
        self._step(st, f"{nodes} kwok nodes", lambda: self._create_nodes(st, client, nodes, gpus_per_node))
        self._step(st, "lws-manager", lambda: self._start_lws(st, bins, p, logs))
        self._step(st, "LWS webhooks", lambda: self._install_webhooks(st, client, bins, p))

    @staticmethod
    def _stop_started(st: ClusterState | None) -> None:
        if st is None:
            return
        for proc in reversed(st.processes):
            stop(proc)
        st.processes = []
        st.save()

    def _other_pod_cidrs(self) -> list[str]:
        """Pod CIDRs recorded by the other dev clusters next to this one (and under the state root)."""
        cidrs = []
        for root in {state_root(), self.state_dir.parent}:
            for name in cluster_names(root):
                d = root / name
                if d.resolve() == self.state_dir.resolve():
                    continue
                try:
                    other = ClusterState.load(d)
                except (OSError, ValueError, TypeError):
                    continue  # unreadable state: nothing to avoid
                if other is not None:
                    cidrs.append(other.pod_cidr)
        return cidrs

    def exists(self) -> bool:
        """True if the state directory holds a dev cluster pdorch created (running or not)."""
        return is_cluster_dir(self.state_dir)

    def down(self) -> list[str]:
        """Stop every recorded process (reverse start order) and remove the state directory.

        Returns the names of the processes that were running. A missing state directory is a no-op;
        one that pdorch did not create raises NotADevClusterError and is left untouched.
        """
        with _cluster_lock(self.state_dir, self.progress):
            return self._down()

    def _down(self) -> list[str]:
        if not self.state_dir.exists():
            return []
        if not self.exists():
            raise NotADevClusterError(
                f"{self.state_dir} is not a dev cluster state directory (no {MARKER} or state.json)",
                "not removing it; check --name/--state-dir",
            )
        st = self.state()
        stopped: list[str] = []
        if st is not None:
            for proc in reversed(st.processes):
                if stop(proc):
                    stopped.append(proc.name)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return stopped

    def restart(self, name: str, kill: bool = True) -> float:
        """Stop one component (SIGKILL by default, like a crashed node process) and start it again
        with the same command line; returns seconds until its health check answers again."""
        st = self.state()
        if st is None:
            raise RuntimeError(f"dev cluster {self.state_dir} is not up")
        old = st.process(name)
        if old is None or not old.argv:
            raise ValueError(f"no restartable component {name!r}")
        if kill and old.alive():
            os.kill(old.pid, signal.SIGKILL)
        else:
            stop(old)
        # `alive()` turns False as soon as the main thread is a zombie, while other threads may still
        # hold its sockets; wait until the whole process is gone, or the new one cannot bind its port.
        deadline = time.monotonic() + 10
        while not exited(old.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        new = start(name, old.argv, Path(old.log))
        st.processes = [new if p.name == name else p for p in st.processes]
        st.save()
        checks = self._health_checks(st)
        if name in checks:
            wait_until(new, checks[name], 120, f"{name} health after restart")
        return time.monotonic() - t0

    # ---------------------------------------------------------------- steps
    def _step(self, st: ClusterState, what: str, fn: Callable[[], None]) -> None:
        t = time.monotonic()
        self.progress(f"starting {what} ...")
        fn()
        st.step_seconds[what] = round(time.monotonic() - t, 2)
        st.save()
        self.progress(f"  {what} ready ({st.step_seconds[what]:.1f}s)")

    def _launch(self, st: ClusterState, name: str, argv: list[str], logs: Path) -> Managed:
        proc = start(name, argv, logs / f"{name}.log")
        st.processes.append(proc)
        st.save()
        return proc

    def _start_etcd(self, st: ClusterState, bins: binaries.Binaries, logs: Path) -> None:
        c, pe = st.ports["etcd"], st.ports["etcd_peer"]
        proc = self._launch(
            st,
            "etcd",
            [
                bins.path("etcd"),
                "--name=node0",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{c}",
                f"--advertise-client-urls=http://127.0.0.1:{c}",
                f"--listen-peer-urls=http://127.0.0.1:{pe}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{pe}",
                f"--initial-cluster=node0=http://127.0.0.1:{pe}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",
                "--auto-compaction-retention=1",
                "--quota-backend-bytes=4294967296",
            ],
            logs,
        )
        wait_until(proc, lambda: _http_ok(f"http://127.0.0.1:{c}/health"), 60, "/health")

    def _start_apiserver(
        self, st: ClusterState, bins: binaries.Binaries, p: pki.PkiPaths, logs: Path
    ) -> None:
        proc = self._launch(
            st,
            "kube-apiserver",
            [
                bins.path("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{st.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={st.ports['apiserver']}",
                f"--tls-cert-file={p.apiserver_crt}",
                f"--tls-private-key-file={p.apiserver_key}",
                f"--client-ca-file={p.ca_crt}",
                f"--token-auth-file={p.tokens_csv}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                f"--service-cluster-ip-range={manifests.SERVICE_CIDR}",
                # A loopback advertise address is refused by the `kubernetes` Endpoints reconciler.
                "--endpoint-reconciler-type=none",
                # envtest's choice: avoids racing the `default` ServiceAccount on new namespaces.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--feature-gates={manifests.FEATURE_GATES}",
                # ConfigMap watches bypass the watch cache and go to etcd, so a watch from a compacted
                # resourceVersion gets a real 410 Gone (the informer tests need one; pdorch itself
                # watches no ConfigMaps).
                "--watch-cache-sizes=configmaps#0",
            ],
            logs,
        )
        wait_until(proc, lambda: _http_ok(f"{st.server}/readyz", st.ca, st.token), 120, "/readyz")

    def _start_kcm(self, st: ClusterState, bins: binaries.Binaries, p: pki.PkiPaths, logs: Path) -> None:
        kc = st.kubeconfig
        proc = self._launch(
            st,
            "kube-controller-manager",
            [
                bins.path("kube-controller-manager"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={st.ports['kcm']}",
                f"--cert-dir={self.state_dir / 'kcm-certs'}",
                f"--service-account-private-key-file={p.sa_key}",
                f"--root-ca-file={p.ca_crt}",
                "--use-service-account-credentials=false",
                # Endpoints/EndpointSlices refuse loopback pod IPs; those controllers would only fail.
                "--controllers=*,-endpoints-controller,-endpointslice-controller,-endpointslice-mirroring-controller",
                "--node-monitor-grace-period=60s",
                # Defaults (20 QPS) make a few hundred LWS groups crawl; this is a test cluster.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--concurrent-statefulset-syncs=10",
                f"--feature-gates={manifests.FEATURE_GATES}",
            ],
            logs,
        )
        wait_until(proc, lambda: _http_ok(f"https://127.0.0.1:{st.ports['kcm']}/healthz"), 90, "/healthz")

    def _start_scheduler(self, st: ClusterState, bins: binaries.Binaries, logs: Path) -> None:
        kc = st.kubeconfig
        proc = self._launch(
            st,
            "kube-scheduler",
            [
                bins.path("kube-scheduler"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={st.ports['scheduler']}",
                f"--cert-dir={self.state_dir / 'scheduler-certs'}",
            ],
            logs,
        )
        wait_until(
            proc, lambda: _http_ok(f"https://127.0.0.1:{st.ports['scheduler']}/healthz"), 90, "/healthz"
        )

    def _install_crds(self, client: Client, crd_files: list[Path]) -> None:
        names = []
        for f in crd_files:
            for doc in yaml.safe_load_all(f.read_text()):
                if not doc:
                    continue
                # Server-side apply: these CRDs are far larger than client-side apply's annotation limit.
                client.apply(from_dict(doc), force=True)
                names.append(doc["metadata"]["name"])
        wait_for_crds(client, names)

    def _start_kwok(self, st: ClusterState, bins: binaries.Binaries, logs: Path) -> None:
        cfg = self.state_dir / "kwok.yaml"
        pod_cidr = st.pod_cidr
        cfg.write_text(manifests.kwok_config(bins.kwok_stages, pod_cidr, self.pod_ready_ms))
        self._launch(
            st,
            "kwok",
            [
                bins.path("kwok"),
                f"--kubeconfig={st.kubeconfig}",
                f"--config={cfg}",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={pod_cidr}",
                f"--node-ip={manifests.NODE_IP}",
                "--node-lease-duration-seconds=40",
            ],
            logs,
        )
        # kwok has no health port of its own here; the next step judges it by the nodes it makes
        # Ready (and fails fast if the process exits).

    def _create_nodes(self, st: ClusterState, client: Client, count: int, gpus: int) -> None:
        names = [f"kwok-node-{i}" for i in range(count)]
        for n in names:
            try:
                client.create(from_dict(manifests.node(n, gpus)))
            except ApiError as e:
                if e.status.code != 409:
                    raise
        st.nodes = names
        kwok = st.process("kwok")
        assert kwok is not None

        def all_ready() -> bool:
            ready = 0
            for node in client.list(Node, labels={"pdorch.io/devcluster": "true"}):
                conds = {c.type: c.status for c in (node.status.conditions or [])}
                ready += conds.get("Ready") == "True"
            return ready >= count

        wait_until(kwok, all_ready, 60, f"{count} nodes Ready")

    def _start_lws(self, st: ClusterState, bins: binaries.Binaries, p: pki.PkiPaths, logs: Path) -> None:
        cfg = self.state_dir / "lws-config.yaml"
        cfg.write_text(manifests.lws_config(st.ports["lws_webhook"], st.ports["lws_health"], p.webhook_dir))
        proc = self._launch(
            st,
            "lws-manager",
            [
                bins.path("lws-manager"),
                f"--kubeconfig={st.kubeconfig}",
                f"--config={cfg}",
                "--zap-log-level=info",
            ],
            logs,
        )
        wait_until(proc, lambda: _http_ok(f"http://127.0.0.1:{st.ports['lws_health']}/readyz"), 90, "/readyz")
        wait_until(proc, lambda: _tls_listening(st.ports["lws_webhook"]), 30, "webhook TLS listener")

    def _install_webhooks(
        self, st: ClusterState, client: Client, bins: binaries.Binaries, p: pki.PkiPaths
    ) -> None:
        for doc in manifests.lws_webhook_configurations(
            bins.dir / "lws-webhook", st.ports["lws_webhook"], p.ca_crt.read_bytes()
        ):
            client.apply(from_dict(doc), force=True)
        lws = st.process("lws-manager")
        assert lws is not None

        def webhook_answers() -> bool:
            # A server-side dry run goes through both LWS webhooks; success proves the path works.
            probe = LeaderWorkerSet.from_dict(manifests.probe_lws())  # type: ignore[attr-defined]
            client.create(probe, dry_run=True)
            return True

        wait_until(lws, webhook_answers, 60, "LWS webhooks answering a dry-run create")


def wait_for_crds(client: Client, names: list[str], timeout: float = 60) -> None:
    """Wait until every named CRD reports Established."""
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for n in list(pending):
            crd = client.get(CustomResourceDefinition, n)
            conds = {c.type: c.status for c in (crd.status.conditions or [])} if crd.status else {}
            if conds.get("Established") == "True":
                pending.discard(n)
        if pending:
            time.sleep(0.2)
    if pending:
        raise TimeoutError(f"CRDs not Established after {timeout}s: {sorted(pending)}")


def install_pdorch_crds(
    client: Client, field_manager: str, namespaces: tuple[str, ...] = ("pdorch-system",)
) -> list[str]:
    """Server-side apply pdorch's generated CRDs (manifests/crd), wait until Established, and make
    sure `namespaces` exist (the controller's Lease lives in pdorch-system). Returns CRD names."""
    names = []
    for f in sorted((binaries.repo_root() / "manifests" / "crd").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        client.apply(from_dict(doc), field_manager=field_manager, force=True)
        names.append(doc["metadata"]["name"])
    wait_for_crds(client, names)
    for ns in namespaces:
        try:
            client.create(LkNamespace(metadata=ObjectMeta(name=ns)))
        except ApiError as e:
            if e.status.code != 409:  # already there
                raise
    return names


def format_status(status: dict[str, Any]) -> str:
    """Human-readable `dev-cluster status` output."""
    word = "UP" if status["up"] else "DOWN"
    if not status["up"] and status["components"] and not status.get("complete", True):
        word = "INCOMPLETE (its start is still running or was cut short; run `up` again or `down`)"
    lines = [f"dev cluster: {word}  ({status['dir']})"]
    for name, c in status["components"].items():
        health = {True: "healthy", False: "UNHEALTHY", None: "-"}[c["healthy"]]
        state = "running" if c["running"] else "STOPPED"
        lines.append(f"  {name:<24} pid {c['pid']:<8} {state:<8} {health}")
        if not c["running"] or c["healthy"] is False:
            lines.append("    " + tail(c["log"], 5).replace("\n", "\n    "))
    if status.get("pod_cidr"):
        lines.append(f"pod IPs from {status['pod_cidr']}")
    if status.get("kubeconfig"):
        lines.append(f"export KUBECONFIG={status['kubeconfig']}")
    return "\n".join(lines)


__all__ = [
    "ClusterState",
    "DevCluster",
    "NotADevClusterError",
    "StartupError",
    "cluster_names",
    "default_state_dir",
    "format_status",
    "is_cluster_dir",
    "validate_name",
    "wait_for_crds",
]
