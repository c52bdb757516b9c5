"""`pdorch demo`."""

from __future__ import annotations

import argparse
import asyncio

from pdorch.cli_args import non_negative_float, positive_float, positive_int
from pdorch.demo.run import demo
from pdorch.devcluster.commands import NAME_ARG


def _seconds_or_never(value: str) -> float:
    """argparse type of --rollout-after: seconds >= 0, or -1 for no rollout (nan and inf refused)."""
    try:
        if float(value) == -1:
            return -1.0
    except ValueError:
        pass
    try:
        return non_negative_float(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected seconds >= 0, or -1 for no rollout, got {value!r}"
        ) from None


def _run(args: argparse.Namespace) -> int:
    try:
        rollout_after = None if args.rollout_after < 0 else args.rollout_after
        return asyncio.run(demo(args.users, args.duration, args.cluster_name, rollout_after))
    except KeyboardInterrupt:
        # asyncio.run cancelled the demo; its finally-block already cleaned up.
        return 130


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `demo`."""
    p = sub.add_parser(
        "demo",
        help="P/D serving end to end on the local dev cluster, with a live view (Ctrl-C cleans up)",
        description="Start the dev cluster, run the controller, apply examples/sim-pd, serve it with "
        "simulated engines and the proxy, send traffic and show a live view.",
    )
    p.add_argument(
        "--users", type=positive_int, default=6, help="concurrent simulated users (default %(default)s)"
    )
    p.add_argument(
        "--duration",
        type=positive_float,
        default=None,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    p.add_argument(
        "--cluster-name", type=NAME_ARG, default="demo", help="dev cluster name (default %(default)s)"
    )
    p.add_argument(
        "--rollout-after",
        type=_seconds_or_never,
        default=30.0,
        help="seconds of traffic before the engine image changes and a rollout runs (-1: never; default %(default)s)",
    )
    p.set_defaults(func=_run)
