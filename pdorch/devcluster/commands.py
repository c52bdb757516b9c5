"""`pdorch dev-cluster up | down | status | env | build`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pdorch.cli_args import checked, non_negative_int, positive_int
from pdorch.devcluster import binaries
from pdorch.devcluster.cluster import (
    DEFAULT_GPUS_PER_NODE,
    DEFAULT_NODES,
    DevCluster,
    cluster_names,
    default_state_dir,
    format_status,
    state_root,
    validate_name,
)
from pdorch.devcluster.process import StartupError

# argparse type of every flag naming a dev cluster (also `pdorch demo --cluster-name`).
NAME_ARG = checked(validate_name)


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cluster(args: argparse.Namespace) -> DevCluster:
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(args.name)
    return DevCluster(state_dir, progress=_progress)


def cluster_flags(args: argparse.Namespace) -> str:
    """The `--name X` / `--state-dir D` flags that select this cluster, for hints to re-run."""
    if args.state_dir:
        return f" --state-dir {shlex.quote(args.state_dir)}"
    return "" if args.name == "default" else f" --name {args.name}"


def no_cluster_message(args: argparse.Namespace, state_dir: Path) -> str:
    """Why `down` refuses: nothing pdorch created is at `state_dir` (lists the existing names)."""
    if args.state_dir:
        root = state_root()
        named = cluster_names(root)
        known = (
            f"dev clusters under {root}: {', '.join(named)} (pick one with --name)"
            if named
            else f"no dev clusters under {root}"
        )
        return f"error: no dev cluster state at {state_dir}; nothing removed; {known}"
    others = cluster_names(state_dir.parent)
    known = f"; existing dev clusters: {', '.join(others)}" if others else "; there are no dev clusters"
    return f"error: no dev cluster named {args.name!r} (no dev cluster state at {state_dir}){known}"


def not_up_hint(status: dict[str, Any], flags: str) -> str:
    """What `status` suggests for a cluster that is not up: `up` starts a missing one, but wipes
    one with recorded components (a stopped or unhealthy one, a cut-short start) and starts afresh."""
    if not status["components"]:
        return f"start it with `pdorch dev-cluster{flags} up`"
    return (
        f"`pdorch dev-cluster{flags} up` removes this partly stopped cluster and starts a fresh one "
        f"(its objects are lost); `pdorch dev-cluster{flags} down` only removes it"
    )


def _up(args: argparse.Namespace) -> int:
    try:
        st = _cluster(args).up(nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        print(
            "the state directory and logs are kept; run "
            f"`pdorch dev-cluster{cluster_flags(args)} down` to clean up",
            file=sys.stderr,
        )
        return 1
    print(f"export KUBECONFIG={st.kubeconfig}")
    return 0


def _down(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    # Only a directory pdorch created is removed: a mistyped --name/--state-dir must not delete data.
    if not cluster.exists():
        print(no_cluster_message(args, cluster.state_dir), file=sys.stderr)
        return 1
    if cluster.held() and not args.force:
        # The demo would lose its apiserver mid-run and report every request after it as failed.
        print(
            "error: a `pdorch demo` is running on this dev cluster; stop the demo (Ctrl-C: it "
            "cleans up after itself), or run "
            f"`pdorch dev-cluster{cluster_flags(args)} down --force`",
            file=sys.stderr,
        )
        return 1
    stopped = cluster.down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _cluster(args).status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    if not status["up"] and not args.json:
        print(not_up_hint(status, cluster_flags(args)), file=sys.stderr)
    return 0 if status["up"] else 1


def _env(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    st = cluster.state()
    if st is None or not cluster.is_up():
        print(
            f"error: the dev cluster is not up; run `pdorch dev-cluster{cluster_flags(args)} up`",
            file=sys.stderr,
        )
        return 1
    print(f"export KUBECONFIG={st.kubeconfig}")
    print(f"export PDORCH_KUBE_BIN={st.bin_dir}")
    print(f"export PATH={st.bin_dir}:$PATH")
    return 0


def _build(args: argparse.Namespace) -> int:
    b = binaries.ensure()
    print(b.dir)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `dev-cluster` and its actions."""
    p = sub.add_parser(
        "dev-cluster",
        help="local real control plane (etcd, apiserver, KCM, scheduler, kwok, LWS) on loopback",
        description="Run a real Kubernetes control plane with kwok nodes and the LWS controller on 127.0.0.1.",
    )
    p.add_argument(
        "--name",
        type=NAME_ARG,
        default="default",
        help="cluster name: lowercase letters, digits, '-' (state under ~/.cache/pdorch/devcluster/NAME)",
    )
    p.add_argument("--state-dir", help="explicit state directory (overrides --name)")
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = acts.add_parser("up", help="start every component and wait until all are healthy")
    up.add_argument(
        "--nodes", type=positive_int, default=DEFAULT_NODES, help="kwok nodes (default %(default)s)"
    )
    up.add_argument(
        "--gpus-per-node",
        type=non_negative_int,
        default=DEFAULT_GPUS_PER_NODE,
        help="nvidia.com/gpu per node (default %(default)s)",
    )
    up.set_defaults(func=_up)
    down = acts.add_parser("down", help="stop the processes this cluster started and remove its state")
    down.add_argument("--force", action="store_true", help="also while a `pdorch demo` runs on it")
    down.set_defaults(func=_down)
    st = acts.add_parser("status", help="show each component's process and health")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)
    acts.add_parser("env", help="print shell exports (KUBECONFIG, PATH with kubectl)").set_defaults(func=_env)
    acts.add_parser("build", help="build (or locate) the pinned control-plane binaries").set_defaults(
        func=_build
    )
