"""`pdorch proxy`: run the OpenAI-compatible xPyD proxy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from pydantic import ValidationError

from pdorch.api.errors import format_validation_error
from pdorch.cli_args import (
    namespace_name,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
    positive_port,
)
from pdorch.lifecycle import EVENT_LOOPS, freeze_startup_heap, loop_factory, run_until_signalled
from pdorch.proxy.config import ProxyConfig, build_config
from pdorch.proxy.discovery import KubeDiscovery, StaticDiscovery, static_endpoints
from pdorch.proxy.policies import POLICIES
from pdorch.proxy.server import Discovery, ProxyServer, shutdown_plan

log = logging.getLogger(__name__)


# Prometheus scrapes the proxy here; the client port serves the API only.
DEFAULT_METRICS_PORT = 9090


def add_parser(subparsers: Any) -> None:
    """Register the `proxy` subcommand."""
    p = subparsers.add_parser(
        "proxy",
        help="run the OpenAI-compatible prefill/decode (xPyD) proxy",
        description="Route OpenAI completion/chat requests over prefill and decode engines of the same "
        "revision, speaking vLLM's NixlConnector or SGLang's bootstrap protocol. Endpoints come from a "
        "watch on a ServingGroup's pods (--group/--namespace) or from static --prefill/--decode URLs. "
        "Unset options fall back to PDORCH_ROUTER_CONFIG (the ServingGroup's spec.router as JSON).",
    )
    p.add_argument("--host", default=None, help="listen address (default 0.0.0.0)")
    p.add_argument(
        "--port", type=port_number, default=None, help="listen port (default 8000; 0 = any free port)"
    )
    p.add_argument("--engine", choices=["vllm", "sglang"], required=True)
    p.add_argument("--group", help="ServingGroup whose pods to discover")
    p.add_argument("--namespace", type=namespace_name, help="namespace of the ServingGroup")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG or in-cluster)")
    p.add_argument(
        "--prefill",
        action="append",
        default=None,
        metavar="URL",
        help="static prefill URL (repeatable); SGLang: URL#bootstrapPort",
    )
    p.add_argument(
        "--decode", action="append", default=None, metavar="URL", help="static decode URL (repeatable)"
    )
    p.add_argument(
        "--bootstrap-port", type=positive_port, default=None, help="SGLang bootstrap port of static prefills"
    )
    p.add_argument("--policy", choices=POLICIES, default=None)
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env PDORCH_API_KEY)"
    )
    p.add_argument(
        "--max-inflight", type=positive_int, default=None, help="concurrent requests upstream (default 256)"
    )
    p.add_argument(
        "--max-queue", type=non_negative_int, default=None, help="requests waiting beyond that (default 1024)"
    )
    p.add_argument(
        "--max-body-bytes", type=positive_int, default=None, help="request body limit (default 16 MiB)"
    )
    p.add_argument(
        "--min-prompt-tokens",
        type=non_negative_int,
        default=None,
        help="decode-only below this (0 = always P/D)",
    )
    p.add_argument(
        "--prefill-queue-tokens",
        type=positive_int,
        default=None,
        help="queue prompts in the proxy: estimated prompt tokens in flight per prefill engine (default: off)",
    )
    p.add_argument(
        "--prefill-queue-ttft",
        type=positive_float,
        default=None,
        help="seconds: queued prompts that can still meet this TTFT go first, shortest first (default 2)",
    )
    p.add_argument(
        "--prefill-queue-max-wait",
        type=positive_float,
        default=None,
        help="seconds: a queued prompt that waited this long goes first, whatever its length (default 30)",
    )
    p.add_argument(
        "--retries",
        type=non_negative_int,
        default=None,
        help="retries with a fresh pair before the first byte (default 2, at most 10)",
    )
    p.add_argument("--connect-timeout", type=positive_float, default=None, help="seconds (default 5)")
    p.add_argument(
        "--first-byte-timeout",
        type=positive_float,
        default=None,
        help="seconds until an engine starts answering: the prefill leg, a stream's first bytes, and "
        "a decode's progress counters standing still while a non-streamed answer waits on it (default 300)",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_float,
        default=None,
        help="seconds for a whole request, and for a non-streamed answer's decode leg (default 1800)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=positive_float,
        default=None,
        help="seconds an engine may stay silent once its answer is being relayed (default 60)",
    )
    p.add_argument(
        "--upstream-idle-timeout",
        type=positive_float,
        default=None,
        help="seconds an engine may stay silent mid-response before the leg fails (default none)",
    )
    p.add_argument(
        "--client-idle-timeout",
        type=positive_float,
        default=None,
        help="close client connections without a complete request head after this (default 75)",
    )
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=None,
        help="seconds to receive a request body (default 30)",
    )
    p.add_argument(
        "--metrics-port",
        type=port_number,
        default=DEFAULT_METRICS_PORT,
        help="serve /metrics on this separate port, never on the client port "
        "(default %(default)s; 0 = any free port)",
    )
    p.add_argument(
        "--metrics-on-client-port",
        action="store_true",
        help="serve /metrics on --port next to the API instead (anyone who can connect can read it, even without the API key)",
    )
    p.add_argument(
        "--health-interval",
        type=positive_float,
        default=None,
        help="endpoint health-check period (default 5)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=non_negative_float,
        default=None,
        help="seconds from SIGTERM to exit: in-flight requests finish within it, streams still open "
        "then end with an SSE error event (default 30)",
    )
    p.add_argument(
        "--shutdown-drain-delay",
        type=non_negative_float,
        default=None,
        help="seconds after SIGTERM (within the grace) during which the listener stays open, /health "
        "answers 503 draining and new requests get 503, before connections are refused (default 5)",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="event loop implementation (default uvloop: less CPU per request, see docs/benchmarks.md)",
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> ProxyConfig:
    """ProxyConfig from parsed flags and the environment."""
    flags: dict[str, Any] = {
        "engine": args.engine,
        "host": args.host,
        "port": args.port,
        "group": args.group,
        "namespace": args.namespace,
        "kubeconfig": args.kubeconfig,
        "prefill": tuple(args.prefill) if args.prefill else None,
        "decode": tuple(args.decode) if args.decode else None,
        "bootstrap_port": args.bootstrap_port,
        "policy": args.policy,
        "api_key": args.api_key,
        "max_inflight": args.max_inflight,
        "max_queue": args.max_queue,
        "max_body_bytes": args.max_body_bytes,
        "min_prompt_tokens": args.min_prompt_tokens,
        "prefill_queue_tokens": args.prefill_queue_tokens,
        "prefill_queue_ttft_s": args.prefill_queue_ttft,
        "prefill_queue_max_wait_s": args.prefill_queue_max_wait,
        "max_retries": args.retries,
        "connect_timeout_s": args.connect_timeout,
        "first_byte_timeout_s": args.first_byte_timeout,
        "request_timeout_s": args.request_timeout,
        "stream_idle_timeout_s": args.stream_idle_timeout,
        "upstream_idle_timeout_s": args.upstream_idle_timeout,
        "client_idle_timeout_s": args.client_idle_timeout,
        "body_timeout_s": args.body_timeout,
        "metrics_port": None if args.metrics_on_client_port else args.metrics_port,
        "health_interval_s": args.health_interval,
        "shutdown_grace_s": args.shutdown_grace,
        "shutdown_drain_delay_s": args.shutdown_drain_delay,
    }
    return build_config(flags, dict(os.environ if env is None else env))


def discovery_for(config: ProxyConfig) -> Discovery:
    """Static or Kubernetes discovery, as configured."""
    if config.static:
        return StaticDiscovery(static_endpoints(config.prefill, config.decode, config.bootstrap_port))
    assert config.group is not None and config.namespace is not None
    return KubeDiscovery(config.namespace, config.group, config.kubeconfig)


async def serve(config: ProxyConfig, stop: asyncio.Event) -> None:
    """Run a proxy until ``stop`` is set, then drain."""
    server = ProxyServer(config, discovery_for(config))
    try:
        await server.start()
    except BaseException:
        await server.stop()  # e.g. the port is taken: close what start() opened before it failed
        raise
    freeze_startup_heap()
    try:
        await stop.wait()
        log.info(
            "pdorch proxy: draining (up to %gs; refusing connections after %gs)",
            config.shutdown_grace_s,
            shutdown_plan(config.shutdown_grace_s, config.shutdown_drain_delay_s)[0],
        )
    finally:
        await server.stop(drain_delay_s=config.shutdown_drain_delay_s if stop.is_set() else 0.0)


# Config fields whose flag is not the field's name with dashes (and without the "_s" of seconds).
_FLAGS = {"max_retries": "--retries", "static": "--prefill/--decode"}


def _flag_of(field: str) -> str:
    """The command-line flag of a ProxyConfig field, for error messages (it also reads
    PDORCH_ROUTER_CONFIG, whose keys map onto the same fields)."""
    name = field.split(".")[0]
    return _FLAGS.get(name) or "--" + name.removesuffix("_s").replace("_", "-")


def run(args: argparse.Namespace) -> int:
    """Entry point of `pdorch proxy`; returns the exit code."""
    try:
        config = config_from_args(args)
        if config.static:
            static_endpoints(config.prefill, config.decode, config.bootstrap_port)  # validate URLs early
    except ValidationError as exc:
        source = " (or PDORCH_ROUTER_CONFIG)" if os.environ.get("PDORCH_ROUTER_CONFIG") else ""
        for line in format_validation_error(exc):
            field, sep, msg = line.partition(": ")
            if not sep or field == "<object>":  # a rule over several fields: its message names them
                log.error("pdorch proxy: %s", msg if sep else line)
            else:
                log.error("pdorch proxy: %s%s: %s", _flag_of(field), source, msg)
        return 2
    except ValueError as exc:
        log.error("pdorch proxy: %s", exc)
        return 2

    try:
        run_until_signalled(lambda stop: serve(config, stop), loop_factory(args.event_loop))
    except Exception as exc:  # e.g. port in use, no usable kubeconfig: one clear line, exit 1
        log.error("pdorch proxy: %s", exc)
        return 1
    return 0
