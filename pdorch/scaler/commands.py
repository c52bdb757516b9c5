"""`pdorch scaler`: run the built-in SLO autoscaler for ServingGroup roles with scaling.mode Builtin."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from pdorch.cli_args import add_lease_arguments, host_port, namespace_name, non_negative_float, positive_float
from pdorch.cli_errors import CliError
from pdorch.controller.leader import LOST_LEASE_EXIT
from pdorch.scaler.loop import ScalerConfig, run_scaler
from pdorch.sim.latency import PRESETS


def _run(args: argparse.Namespace) -> int:
    cfg = ScalerConfig(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        interval_s=args.interval,
        coefficients=args.coefficients,
        drain_timeout_s=args.drain_timeout,
        metrics_addr=args.metrics_addr,
        prometheus_url=args.prometheus_url,
        prometheus_ca_file=args.prometheus_ca_file,
        prometheus_token_file=args.prometheus_token_file,
        pod_startup_s=args.pod_startup,
        leader_elect=args.leader_elect,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        identity=args.identity or os.environ.get("POD_NAME", ""),
    )
    if (cfg.prometheus_ca_file or cfg.prometheus_token_file) and not cfg.prometheus_url:
        raise CliError(
            "--prometheus-ca-file and --prometheus-token-file need --prometheus-url",
            "pass --prometheus-url URL, or drop them to read the engines' /metrics directly",
        )
    code = asyncio.run(run_scaler(cfg))
    if code == LOST_LEASE_EXIT:
        # As the controller does: another replica decides now; restart as a standby at once.
        logging.shutdown()
        os._exit(code)
    return code


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `scaler`."""
    d = ScalerConfig()
    p = sub.add_parser(
        "scaler",
        help="run the built-in SLO autoscaler (writes ServingRoleScaler /scale for Builtin roles)",
        description="Size every ServingGroup role whose scaling.mode is Builtin from its engines' metrics "
        "(scraped from the leader pods, or read from Prometheus): prefill from arrivals x prompt tokens "
        "against the TTFT target, decode from resident sequences against the TPOT target. Writes "
        "ServingRoleScaler spec.replicas and status (the reason), drains pods before a scale-down.",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, then in-cluster)")
    p.add_argument("--namespace", type=namespace_name, help="only this namespace (default: all)")
    p.add_argument(
        "--interval",
        type=positive_float,
        default=d.interval_s,
        help="seconds between decisions (default %(default)s)",
    )
    p.add_argument(
        "--coefficients",
        default=d.coefficients,
        help=f"engine capacity profile: a preset ({', '.join(sorted(PRESETS))}) or a JSON file (default %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=d.drain_timeout_s,
        help="max seconds to drain before a scale-down (default %(default)s)",
    )
    p.add_argument(
        "--metrics-addr",
        default=d.metrics_addr,
        type=host_port,
        help="/metrics and /healthz (default %(default)s)",
    )
    p.add_argument(
        "--pod-startup",
        type=non_negative_float,
        default=d.pod_startup_s,
        help="seconds from a scale-up to a serving pod; the policy sizes for the load forecast over "
        "this + --interval (default %(default)s)",
    )
    p.add_argument(
        "--prometheus-url", help="read engine metrics from this Prometheus instead of scraping pods"
    )
    p.add_argument(
        "--prometheus-ca-file",
        help="PEM CA bundle that verifies an https --prometheus-url (default: system CAs)",
    )
    p.add_argument(
        "--prometheus-token-file",
        help="send this file's content as a bearer token to --prometheus-url (reread for every query, "
        "so a projected ServiceAccount token may rotate)",
    )
    p.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=d.leader_elect,
        help="hold a Lease before deciding, so several replicas can run with one acting (default off)",
    )
    add_lease_arguments(p, d.lease_namespace, d.lease_name)
    p.set_defaults(func=_run)
