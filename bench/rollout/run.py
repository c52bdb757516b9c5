"""bench/rollout: the same image change rolled out by pdorch and by LWS DisaggregatedSet.

One dev cluster (kwok pods turn Ready after a random 2-4 s "model load" delay, the same for both
systems), one namespace per system and run, 8 prefill + 4 decode groups (2:1), budgets of 25% per
role for both (maxSurge 2/1, maxUnavailable 2/1 groups), plus pdorch with maxUnavailable 0. After the group is fully ready, the image of
both roles changes; an observer (pdorch.devcluster.rollout_observer, the same code for both
systems) samples pods and LWS objects every 200 ms until every leader runs the new image and is
ready. Reported per run: time to complete, steps, max ratio deviation among ready pods of one
revision (and the longest off-ratio window), the same for the planned cohorts, minimum ready
capacity, max groups (surge), and how often a revision-blind router would pair a prefill and a
decode of different revisions. pdorch's proxy pairs only within a revision (its cross-revision
pairs are counted from the engines' side in tests/e2e/test_rollout.py: 0).

    python bench/rollout/run.py              # 3 runs per system (about 8 min)
    python bench/rollout/run.py --runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from lightkube import Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Pod

from pdorch.devcluster.cluster import DevCluster, LeaderWorkerSet, default_state_dir, install_pdorch_crds
from pdorch.devcluster.controller_process import ControllerProc
from pdorch.devcluster.rollout_observer import RolloutObserver, pod_revision, pod_role
from pdorch.devcluster.waiting import wait_for
from pdorch.roles.pods import is_ready, is_terminating

REPO = Path(__file__).resolve().parents[2]
SG = create_namespaced_resource("pdorch.io", "v1alpha1", "ServingGroup", "servinggroups")
DS = create_namespaced_resource("disaggregatedset.x-k8s.io", "v1", "DisaggregatedSet", "disaggregatedsets")
P, D = 8, 4
READY_MS = (2000, 4000)
OLD, NEW = "pdorch/sim:v1", "pdorch/sim:v2"
# The same budgets for both systems: 25% of 8 prefill = 2 groups, of 4 decode = 1 group.
BUDGET = {"prefill": 2, "decode": 1}
# pdorch with the shared budgets, pdorch with maxUnavailable 0 (surge only, like what
# DisaggregatedSet chose to do in our runs), and DisaggregatedSet.
SYSTEMS = ("pdorch", "pdorch-surge-only", "lws-disaggregatedset")


def _template(role: str, image: str) -> dict[str, Any]:
    return {
        "spec": {
            "containers": [
                {
                    "name": "engine",
                    "image": image,
                    "command": ["pdorch", "sim", "--role", role],
                    "ports": [{"name": "http", "containerPort": 8000}],
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                }
            ]
        }
    }


def servinggroup(image: str, max_unavailable: int | str = "25%") -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "sim-pd" / "servinggroup.yaml").read_text())
    doc["metadata"]["name"] = "roll"
    doc["spec"]["roles"] = [r for r in doc["spec"]["roles"] if r["type"] != "proxy"]
    doc["spec"].pop("router", None)
    for r in doc["spec"]["roles"]:
        r["replicas"] = P if r["type"] == "prefill" else D
        r["workerTemplate"] = _template(r["type"], image)
    doc["spec"]["rolloutStrategy"] = {"maxSurge": "25%", "maxUnavailable": max_unavailable}
    return doc


def disaggregatedset(image: str) -> dict[str, Any]:
    roles = [
        {
            "name": role,
            "spec": {
                "replicas": n,
                "leaderWorkerTemplate": {"size": 1, "workerTemplate": _template(role, image)},
                "rolloutStrategy": {
                    "type": "RollingUpdate",
                    "rollingUpdateConfiguration": {"maxSurge": BUDGET[role], "maxUnavailable": BUDGET[role]},
                },
            },
        }
        for role, n in (("prefill", P), ("decode", D))
    ]
    return {
        "apiVersion": "disaggregatedset.x-k8s.io/v1",
        "kind": "DisaggregatedSet",
        "metadata": {"name": "roll"},
        "spec": {"roles": roles},
    }


def _leaders(kube: Client, ns: str) -> list[dict[str, Any]]:
    return [p for p in (o.to_dict() for o in kube.list(Pod, namespace=ns)) if pod_role(p)]


def _all_on(kube: Client, ns: str, image: str) -> bool:
    leaders = _leaders(kube, ns)
    live = [p for p in leaders if not is_terminating(p)]
    counts = {r: sum(1 for p in live if pod_role(p) == r) for r in ("prefill", "decode")}
    return (
        len(leaders) == P + D
        and counts == {"prefill": P, "decode": D}
        and all(is_ready(p) and pod_revision(p) == image for p in live)
    )


def _set_image_sg(kube: Client, ns: str) -> None:
    sg = kube.get(SG, "roll", namespace=ns).to_dict()
    for r in sg["spec"]["roles"]:
        r["workerTemplate"]["spec"]["containers"][0]["image"] = NEW
    kube.replace(SG.from_dict(sg), namespace=ns)


def _set_image_ds(kube: Client, ns: str) -> None:
    ds = kube.get(DS, "roll", namespace=ns).to_dict()
    for r in ds["spec"]["roles"]:
        r["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["image"] = NEW
    kube.replace(DS.from_dict(ds), namespace=ns)


async def one_run(kube: Client, system: str, wait_s: float) -> tuple[dict[str, Any], list[tuple[float, ...]]]:
    ns = f"roll-{system[:6]}-{uuid.uuid4().hex[:5]}"
    kube.create(Namespace(metadata=ObjectMeta(name=ns)))
    try:
        if system.startswith("pdorch"):
            mu: int | str = 0 if system == "pdorch-surge-only" else "25%"
            kube.create(SG.from_dict(servinggroup(OLD, mu)), namespace=ns)
        else:
            kube.create(DS.from_dict(disaggregatedset(OLD)), namespace=ns)
        await asyncio.to_thread(
            wait_for, lambda: _all_on(kube, ns, OLD), wait_s, f"{system} ready on {OLD}", 0.2
        )
        await asyncio.sleep(1.0)
        obs, stop = RolloutObserver(kube, ns, (2, 1), (P, D)), asyncio.Event()
        task = asyncio.create_task(obs.run(stop))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await asyncio.to_thread(_set_image_sg if system.startswith("pdorch") else _set_image_ds, kube, ns)
        await asyncio.to_thread(
            wait_for, lambda: _all_on(kube, ns, NEW), wait_s, f"{system} rolled to {NEW}", 0.2
        )
        took = time.monotonic() - t0
        await asyncio.sleep(1.0)
        stop.set()
        await task
        leftover = sorted(o.metadata.name for o in kube.list(LeaderWorkerSet, namespace=ns))
        trace = [
            (
                smp.t - t0,
                sum(p for p, _ in smp.ready.values()),
                sum(d for _, d in smp.ready.values()),
                smp.ready.get(NEW, (0, 0))[0],
                smp.ready.get(NEW, (0, 0))[1],
            )
            for smp in obs.samples
        ]
        return {"system": system, "seconds": round(took, 1), **obs.summary(), "lws_after": leftover}, trace
    finally:
        kube.delete(Namespace, ns)


def table(runs: list[dict[str, Any]]) -> str:
    keys = [
        ("seconds", "time to complete s"),
        ("steps", "steps (planned-cohort changes)"),
        ("max_planned_ratio_deviation", "max planned P:D deviation"),
        ("max_ready_ratio_deviation", "max ready P:D deviation (instant)"),
        ("longest_off_ratio_ready_window_s", "longest off-ratio ready window s"),
        ("min_ready_capacity", "min ready capacity (of desired)"),
        ("max_prefill_groups", "max prefill groups"),
        ("max_decode_groups", "max decode groups"),
        ("revision_blind_cross_pair_fraction_mean", "revision-blind cross pairs, mean"),
        ("revision_blind_cross_pair_fraction_max", "revision-blind cross pairs, max"),
    ]
    systems = list(SYSTEMS)
    out = ["| median of runs | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for k, label in keys:
        cells = []
        for s in systems:
            vals = [r[k] for r in runs if r["system"] == s and r.get(k) is not None]
            cells.append(f"{statistics.median(vals):g}" if vals else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("| cross-revision pairs served (pdorch proxy, e2e) | 0 | 0 | no router |")
    return "\n".join(out)


def plot(traces: dict[str, list[tuple[float, ...]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SYSTEMS), figsize=(15, 4), sharey=True)
    for ax, system in zip(axes, SYSTEMS, strict=True):
        trace = traces.get(system) or []
        ts = [s[0] for s in trace]
        for col, label, style in (
            (1, "ready prefill (any image)", "-"),
            (2, "ready decode (any image)", "-"),
            (3, "ready prefill, new image", "--"),
            (4, "ready decode, new image", "--"),
        ):
            ax.plot(ts, [s[col] for s in trace], label=label, linestyle=style)
        ax.set_title(system)
        ax.set_xlabel("seconds since the image change")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ready leader pods")
    axes[0].legend(fontsize=8)
    fig.suptitle("8P/4D image rollout, same cluster and readiness delays (last run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def main_async(args: argparse.Namespace) -> None:
    cluster = DevCluster(
        default_state_dir("bench-rollout"),
        progress=lambda m: print(f"[bench] {m}", flush=True),
        pod_ready_ms=READY_MS,
    )
    cluster.down()
    st = cluster.up(nodes=8)
    kube = st.client()
    install_pdorch_crds(kube, "bench")
    ctl = ControllerProc(st.kubeconfig, "bench-rollout", f"bench-{uuid.uuid4().hex[:6]}")
    runs: list[dict[str, Any]] = []
    traces: dict[str, Any] = {}
    try:
        ctl.wait_ready()
        for i in range(args.runs):
            for system in SYSTEMS:
                print(f"[bench] run {i + 1}/{args.runs}: {system}", flush=True)
                r, traces[system] = await one_run(kube, system, args.timeout)
                print(json.dumps(r), flush=True)
                runs.append(r)
    finally:
        ctl.stop()
        cluster.down()
    write_results(args, runs, traces)


def write_results(args: argparse.Namespace, runs: list[dict[str, Any]], traces: dict[str, Any]) -> None:
    """JSON, markdown table and plot under --out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "config": {
            "prefill": P,
            "decode": D,
            "ready_delay_ms": READY_MS,
            "budgets": BUDGET,
            "runs": args.runs,
        },
        "runs": runs,
    }
    (out / "rollout.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = table(runs)
    plot(traces, out / "rollout.png")
    (out / "rollout.md").write_text(
        "# bench/rollout\n\n"
        f"8 prefill / 4 decode (2:1), image change, pods Ready {READY_MS[0]}-{READY_MS[1]} ms after start, "
        f"budgets 2/1 groups per role for both systems, {args.runs} run(s) each, medians.\n\n" + md + "\n"
    )
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
