"""Run `pdorch controller` as a real subprocess against a dev cluster, and read its metrics (tests, benchmarks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from pdorch.devcluster.cluster import is_cluster_dir
from pdorch.devcluster.process import dies_with_parent, free_port
from pdorch.devcluster.waiting import ProcessExited, wait_for

WRITE_VERBS = ("create", "apply", "update", "patch", "delete")
_SAMPLE = re.compile(r"^pdorch_kube_requests_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


def controller_log_dir(kubeconfig: str, log_dir: Path | None = None) -> tuple[Path, bool]:
    """Where a controller subprocess logs, and whether that is the temp dir (then its log is
    removed after a clean exit). A dev cluster's kubeconfig puts it in the cluster's logs/, which
    `dev-cluster down` removes, so runs do not pile up logs in /tmp."""
    if log_dir is not None:
        return log_dir, False
    state_dir = Path(kubeconfig).resolve().parent
    if is_cluster_dir(state_dir):
        return state_dir / "logs", False
    return Path(tempfile.gettempdir()), True


class ControllerProc:
    """One controller replica in its own process."""

    def __init__(
        self,
        kubeconfig: str,
        identity: str,
        lease_name: str,
        lease_namespace: str = "pdorch-system",
        log_dir: Path | None = None,
    ) -> None:
        self.identity = identity
        self.port = free_port()
        log_dir, self._log_is_temporary = controller_log_dir(kubeconfig, log_dir)
        self.log = log_dir / f"pdorch-controller-{identity}-{os.getpid()}.log"
        argv = [
            sys.executable, "-m", "pdorch.cli", "controller",
            "--kubeconfig", kubeconfig,
            "--identity", identity,
            "--lease-name", lease_name,
            "--lease-namespace", lease_namespace,
            "--health-addr", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        self._argv = argv
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._logf, stderr=subprocess.STDOUT, preexec_fn=dies_with_parent()
        )

    def kill(self) -> None:
        """SIGKILL (no cleanup, the Lease stays held) and reap the process."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        """Start the same replica again (same identity, so it re-acquires its own Lease at once)."""
        if self.proc.poll() is None:
            raise RuntimeError(f"controller {self.identity} is still running")
        if self._logf.closed:  # after stop(): the restarted process appends to the same log
            self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self._argv, stdout=self._logf, stderr=subprocess.STDOUT, preexec_fn=dies_with_parent()
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def is_ready(self) -> bool:
        """Whether /readyz answers 200 now; AssertionError (with its log) if the process exited."""
        if self.proc.poll() is not None:
            raise ProcessExited(f"controller {self.identity} exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx2.get(self.url("/readyz"), timeout=2, trust_env=False).status_code == 200
        except httpx2.TransportError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(self.is_ready, timeout, f"controller {self.identity} ready")

    def metrics_text(self) -> str:
        return httpx2.get(self.url("/metrics"), timeout=5, trust_env=False).text

    def sample_sum(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
        return sum(
            s.value
            for family in text_string_to_metric_families(self.metrics_text())
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def requests(self, verbs: tuple[str, ...] = WRITE_VERBS, exclude: tuple[str, ...] = ()) -> float:
        """Sum of pdorch_kube_requests_total over `verbs`, all codes, resources not in `exclude`."""
        total = 0.0
        verb_re = re.compile('verb="(' + "|".join(verbs) + ')"')
        for line in self.metrics_text().splitlines():
            m = _SAMPLE.match(line)
            res = re.search('resource="([^"]*)"', m["labels"]) if m else None
            if res and res[1] in exclude:
                continue
            if m and verb_re.search(m["labels"]):
                total += float(m["value"])
        return total

    def is_leader(self) -> bool:
        for line in self.metrics_text().splitlines():
            if line.startswith("leader_election_master_status{"):
                return line.rstrip().endswith(" 1.0")
        return False

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        self.send(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._logf.close()
        if self._log_is_temporary and self.proc.returncode == 0:
            self.log.unlink(missing_ok=True)  # a clean run's log in /tmp is of no use to anyone
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
