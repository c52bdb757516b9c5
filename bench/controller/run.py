"""bench/controller: N ServingGroups (pdorch) vs N DisaggregatedSets (LWS's own controller), 3 roles each.

Each system runs on a fresh dev cluster (same binaries, same nodes), so neither inherits the
other's objects. Per system it records, from a watch on LeaderWorkerSets in the bench namespace:
- apply -> all 3 role LWS created, per group (p50/p99),
- time until every group's 3 LWS report all replicas ready (convergence),
and from /proc: CPU seconds and RSS of the controller doing the work (pdorch's controller process;
for DisaggregatedSet, the lws-manager that hosts its controller), plus API requests per reconcile
from pdorch's own metrics.

    python bench/controller/run.py --groups 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightkube import Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace

from pdorch.devcluster.cluster import DevCluster, default_state_dir, install_pdorch_crds
from pdorch.devcluster.controller_process import ControllerProc

REPO = Path(__file__).resolve().parents[2]
LWS = create_namespaced_resource("leaderworkerset.x-k8s.io", "v1", "LeaderWorkerSet", "leaderworkersets")
SG = create_namespaced_resource("pdorch.io", "v1alpha1", "ServingGroup", "servinggroups")
DS = create_namespaced_resource("disaggregatedset.x-k8s.io", "v1", "DisaggregatedSet", "disaggregatedsets")
ROLES = ("proxy", "prefill", "decode")
CLK = os.sysconf("SC_CLK_TCK")


def _container(role: str) -> dict[str, Any]:
    return {"name": "engine", "image": f"bench/{role}:v1", "ports": [{"containerPort": 8000}]}


def servinggroup(name: str) -> dict[str, Any]:
    roles = []
    for r in ROLES:
        role: dict[str, Any] = {"name": r, "type": r, "replicas": 1, "size": 1}
        role["workerTemplate"] = {"spec": {"containers": [_container(r)]}}
        roles.append(role)
    return {
        "apiVersion": "pdorch.io/v1alpha1",
        "kind": "ServingGroup",
        "metadata": {"name": name},
        "spec": {"engine": {"name": "vllm"}, "roles": roles},
    }


def disaggregatedset(name: str) -> dict[str, Any]:
    roles = [
        {
            "name": r,
            "spec": {
                "replicas": 1,
                "leaderWorkerTemplate": {
                    "size": 1,
                    "workerTemplate": {"spec": {"containers": [_container(r)]}},
                },
            },
        }
        for r in ROLES
    ]
    return {
        "apiVersion": "disaggregatedset.x-k8s.io/v1",
        "kind": "DisaggregatedSet",
        "metadata": {"name": name},
        "spec": {"roles": roles},
    }


@dataclass
class ProcUsage:
    cpu_seconds: float
    rss_mib: float
    peak_rss_mib: float


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def proc_rss(pid: int) -> tuple[float, float]:
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


@dataclass
class Tracker:
    """Watches LWS in one namespace; records per group when its 3 LWS exist and when all are ready."""

    group_label: str
    created: dict[str, float] = field(default_factory=dict)
    ready: dict[str, float] = field(default_factory=dict)
    _lws: dict[str, dict[str, bool]] = field(default_factory=dict)

    def run(self, kube: Client, namespace: str, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for _etype, obj in kube.watch(LWS, namespace=namespace, server_timeout=30):
                    now = time.monotonic()
                    g = (obj.metadata.labels or {}).get(self.group_label)
                    if g is None:
                        continue
                    st = obj.status or {}
                    want = (obj.spec or {}).get("replicas", 1)
                    roles = self._lws.setdefault(g, {})
                    roles[obj.metadata.name] = (
                        st.get("readyReplicas", 0) >= want and st.get("replicas", 0) == want
                    )
                    if len(roles) >= 3 and g not in self.created:
                        self.created[g] = now
                    if len(roles) >= 3 and all(roles.values()) and g not in self.ready:
                        self.ready[g] = now
                    if stop.is_set():
                        return
            except Exception:
                time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_system(
    system: str, cluster: DevCluster, groups: int, timeout: float, make: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    cluster.down()
    st = cluster.up(nodes=8)
    kube = st.client()
    ns = "bench"
    kube.create(Namespace(metadata=ObjectMeta(name=ns)))
    ctl: ControllerProc | None = None
    if system == "pdorch":
        install_pdorch_crds(kube, "bench")
        ctl = ControllerProc(st.kubeconfig, "bench", f"bench-{uuid.uuid4().hex[:6]}")
        ctl.wait_ready()
    lws_pid = st.process("lws-manager").pid  # type: ignore[union-attr]
    worker_pid = ctl.proc.pid if ctl else lws_pid
    tracker = Tracker("pdorch.io/group" if system == "pdorch" else "disaggregatedset.x-k8s.io/name")
    stop = threading.Event()
    watcher = threading.Thread(target=tracker.run, args=(kube, ns, stop), daemon=True)
    watcher.start()
    time.sleep(1.0)  # the watch is established before the first create

    cpu0, lws_cpu0 = proc_cpu(worker_pid), proc_cpu(lws_pid)
    t0 = time.monotonic()
    applied: dict[str, float] = {}
    res = SG if system == "pdorch" else DS
    for i in range(groups):
        name = f"g{i:04d}"
        kube.create(res.from_dict(make(name)), namespace=ns)
        applied[name] = time.monotonic()
    apply_seconds = time.monotonic() - t0
    deadline = time.monotonic() + timeout
    while len(tracker.ready) < groups and time.monotonic() < deadline:
        time.sleep(0.5)
    converged = time.monotonic() - t0 if len(tracker.ready) == groups else None
    available_seconds = None
    if ctl is not None:
        while time.monotonic() < deadline:
            sgs = list(kube.list(SG, namespace=ns))
            ok = sum(
                any(
                    c["type"] == "Available" and c["status"] == "True"
                    for c in (s.status or {}).get("conditions", [])
                )
                for s in sgs
            )
            if ok == groups:
                available_seconds = time.monotonic() - t0
                break
            time.sleep(1.0)
    time.sleep(3.0)  # trailing status writes
    stop.set()
    rss, peak = proc_rss(worker_pid)
    lws_rss, lws_peak = proc_rss(lws_pid)
    latencies = [tracker.created[g] - applied[g] for g in applied if g in tracker.created]
    out: dict[str, Any] = {
        "system": system,
        "groups": groups,
        "lws_created_groups": len(latencies),
        "ready_groups": len(tracker.ready),
        "apply_all_seconds": round(apply_seconds, 2),
        "apply_to_lws_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "apply_to_lws_p99_ms": round(1000 * pct(latencies, 0.99), 1) if latencies else None,
        "all_lws_ready_seconds": round(converged, 1) if converged else None,
        "controller": asdict(ProcUsage(round(proc_cpu(worker_pid) - cpu0, 2), round(rss, 1), round(peak, 1))),
        "lws_manager": asdict(
            ProcUsage(round(proc_cpu(lws_pid) - lws_cpu0, 2), round(lws_rss, 1), round(lws_peak, 1))
        ),
        "latencies_ms": [round(1000 * x, 2) for x in latencies],
    }
    if ctl is not None:
        text = ctl.metrics_text()
        reconciles = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("pdorch_reconcile_total{")
        )
        requests = ctl.requests(
            ("get", "list", "watch", "create", "apply", "update", "patch", "delete"), exclude=("leases",)
        )
        writes = ctl.requests(exclude=("leases",))
        out["status_available_seconds"] = round(available_seconds, 1) if available_seconds else None
        out["reconciles"] = int(reconciles)
        out["api_requests"] = int(requests)
        out["api_requests_per_reconcile"] = round(requests / reconciles, 2) if reconciles else None
        out["api_writes_per_group"] = round(writes / groups, 2)
        ctl.stop()
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        lat = sorted(r["latencies_ms"])
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=r["system"])
    ax.set_xscale("log")
    ax.set_xlabel("apply -> all 3 role LWS created (ms, log)")
    ax.set_ylabel("fraction of groups")
    ax.set_title(f"{results[0]['groups']} groups x 3 roles, same dev cluster")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| system | apply->LWS p50 | p99 | all LWS ready | controller CPU s | controller RSS MiB | API req/reconcile |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["controller"]
        rows.append(
            f"| {r['system']} | {r['apply_to_lws_p50_ms']} ms | {r['apply_to_lws_p99_ms']} ms | "
            f"{r['all_lws_ready_seconds']} s | {c['cpu_seconds']} | {c['rss_mib']} (peak {c['peak_rss_mib']}) | "
            f"{r.get('api_requests_per_reconcile', '-')} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = DevCluster(default_state_dir("bench"), progress=lambda m: print(f"[bench] {m}", flush=True))
    results = []
    try:
        for system, make in (("pdorch", servinggroup), ("lws-disaggregatedset", disaggregatedset)):
            print(f"[bench] === {system}: {args.groups} groups ===", flush=True)
            r = run_system(system, cluster, args.groups, args.timeout, make)
            print(json.dumps({k: v for k, v in r.items() if k != "latencies_ms"}, indent=2), flush=True)
            results.append(r)
    finally:
        cluster.down()
    (out / "controller.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "controller.png")
    md = table(results)
    (out / "controller.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
