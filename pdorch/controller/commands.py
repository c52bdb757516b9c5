"""`pdorch controller`: run the ServingGroup controller."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from pdorch.cli_args import add_lease_arguments, host_port, namespace_name, positive_int
from pdorch.controller.manager import LOST_LEASE_EXIT, ControllerConfig, run_controller


def _run(args: argparse.Namespace) -> int:
    cfg = ControllerConfig(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        workers=args.workers,
        leader_elect=args.leader_elect,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        identity=args.identity or os.environ.get("POD_NAME", ""),
        health_addr=args.health_addr,
        proxy_image=args.proxy_image,
    )
    code = asyncio.run(run_controller(cfg))
    if code == LOST_LEASE_EXIT:
        # Exit now rather than let interpreter teardown wait on anything left running: another
        # replica leads, and the Deployment restarts this one as a standby (like client-go's exit).
        logging.shutdown()
        os._exit(code)
    return code


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `controller`."""
    d = ControllerConfig()
    p = sub.add_parser(
        "controller",
        help="run the ServingGroup controller (level-triggered, leader-elected)",
        description="Reconcile ServingGroups into one LeaderWorkerSet per role, the proxy's Service and "
        "RBAC, ServingRoleScalers and revision history; roll out new revisions step by step keeping "
        "the P:D ratio. Only the Lease holder writes.",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, then in-cluster)")
    p.add_argument("--namespace", type=namespace_name, help="watch only this namespace (default: all)")
    p.add_argument(
        "--workers", type=positive_int, default=d.workers, help="concurrent reconciles (default %(default)s)"
    )
    p.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold a Lease before writing",
    )
    add_lease_arguments(p, d.lease_namespace, d.lease_name)
    p.add_argument(
        "--health-addr",
        default=d.health_addr,
        type=host_port,
        help="/metrics, /healthz, /readyz (default %(default)s)",
    )
    p.add_argument("--proxy-image", default=d.proxy_image, help="image of the built-in proxy role")
    p.set_defaults(func=_run)
