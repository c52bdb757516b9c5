"""`pdorch sim`: run simulated vLLM / SGLang engines."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdorch.cli_args import non_negative_float, non_negative_int, port_number, positive_float
from pdorch.lifecycle import EVENT_LOOPS, loop_factory, run_until_signalled
from pdorch.sim.config import DEFAULT_MODEL, SimConfig
from pdorch.sim.engine import Role
from pdorch.sim.faults import Faults, validate_faults
from pdorch.sim.latency import DEFAULT_PRESET, PRESETS, load_coefficients
from pdorch.sim.server import SimServer, serve_forever

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    """Register the `sim` subcommand."""
    p = subparsers.add_parser(
        "sim",
        help="run simulated vLLM/SGLang engines (analytical latency model)",
        description="Serve OpenAI-compatible simulated engines that speak vLLM's NixlConnector or SGLang's "
        "bootstrap P/D protocol, with real metric names. One process serves every local IP it "
        "receives traffic on (one engine per IP and port).",
    )
    p.add_argument("--protocol", choices=["vllm", "sglang"], default="vllm")
    p.add_argument(
        "--role", choices=[r.value for r in Role], default=Role.BOTH.value, help="default role of the engines"
    )
    p.add_argument("--role-map", type=Path, help='JSON file {"ip" or "ip:port": "prefill|decode|both"}')
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument(
        "--port", type=port_number, action="append", help="listening port (repeatable; default 8000)"
    )
    p.add_argument(
        "--bootstrap-port",
        type=port_number,
        default=8998,
        help="SGLang prefill bootstrap server port (0 = any free port)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--coefficients",
        default=DEFAULT_PRESET,
        help=f"preset ({', '.join(sorted(PRESETS))}) or JSON file of overrides",
    )
    p.add_argument(
        "--time-scale",
        type=positive_float,
        default=1.0,
        help="multiply modelled durations (0.01 = 100x faster than real time)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, stop accepting and let in-flight requests finish for up to this long, as "
        "vLLM's --shutdown-timeout does (default 0: abort them at once, vLLM's default)",
    )
    p.add_argument("--kv-lease-seconds", type=positive_float, default=30.0)
    p.add_argument("--kv-load-failure-policy", choices=["fail", "recompute"], default="fail")
    p.add_argument(
        "--bootstrap-timeout", type=positive_float, default=300.0, help="SGLang prefill wait for decode (s)"
    )
    p.add_argument(
        "--waiting-timeout", type=positive_float, default=300.0, help="SGLang decode wait for KV (s)"
    )
    f = p.add_argument_group("injected faults (testing what sits in front of the engines)")
    f.add_argument(
        "--fault-status", type=int, default=None, help="answer generation requests with this status"
    )
    f.add_argument("--fault-hang", action="store_true", help="accept generation requests, never answer")
    f.add_argument(
        "--fault-stall-after",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="stream N tokens, then go silent",
    )
    f.add_argument(
        "--fault-roles", default="", help="comma-separated roles the faults apply to (default: all)"
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="event loop implementation (default uvloop: less CPU per request)",
    )
    p.set_defaults(func=run)


def _load_roles(path: Path | None) -> dict[str, Role]:
    if path is None:
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of endpoint -> role")
    return {str(k): Role(str(v)) for k, v in data.items()}


def build_server(args: argparse.Namespace) -> SimServer:
    """Build a `SimServer` from parsed arguments."""
    injected = Faults(
        roles=frozenset(r.strip() for r in args.fault_roles.split(",") if r.strip()),
        status=args.fault_status,
        hang=args.fault_hang,
        stall_after_tokens=args.fault_stall_after,
    )
    validate_faults(injected)
    config = replace(
        SimConfig(),
        protocol=args.protocol,
        model=args.model,
        coefficients=load_coefficients(args.coefficients),
        time_scale=args.time_scale,
        kv_lease_s=args.kv_lease_seconds,
        kv_load_failure_policy=args.kv_load_failure_policy,
        bootstrap_timeout_s=args.bootstrap_timeout,
        waiting_timeout_s=args.waiting_timeout,
        faults=injected,
    )
    return SimServer(
        config,
        host=args.host,
        ports=args.port or [8000],
        role=Role(args.role),
        roles=_load_roles(args.role_map),
        bootstrap_port=args.bootstrap_port,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def run(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code."""
    try:
        server = build_server(args)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2

    try:
        run_until_signalled(lambda stop: serve_forever(server, stop), loop_factory(args.event_loop))
    except OSError as exc:  # e.g. port already in use
        log.error("pdorch sim: %s", exc)
        return 1
    return 0
