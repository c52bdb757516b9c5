"""The `pdorch` console script: one subcommand per capability.

Each capability package exposes `add_parser(subparsers)` in its `commands` module; the parser it
registers sets `func`, which receives the parsed namespace and returns the process exit code.
Expected failures (see `pdorch.cli_errors.expected_error`) print one `error:` line and exit 1; Ctrl-C
exits 130; a closed stdout pipe (`pdorch ... | head`) exits 141 without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
import traceback

from pdorch.cli_errors import expected_error

# Modules that register subcommands, in the order `pdorch --help` lists them.
COMMAND_MODULES: list[str] = [
    "pdorch.devcluster.commands",
    "pdorch.controller.commands",
    "pdorch.roles.commands",
    "pdorch.api.commands",
    "pdorch.sim.commands",
    "pdorch.demo.commands",
    "pdorch.proxy.commands",
    "pdorch.rollout.commands",
    "pdorch.scaler.commands",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="pdorch",
        description="Prefill/decode disaggregated LLM serving on Kubernetes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pdorch` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request is noise at INFO; keep it for --verbose.
    for noisy in ("httpx2", "httpcore2", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = int(func(args) or 0)
        sys.stdout.flush()  # here, not at exit, so a reader gone away is handled below
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket: not ours to hide
        # The reader of stdout left (`| head`): stop quietly, with the shell's code for SIGPIPE.
        # Output still buffered goes to /dev/null, so the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except Exception as exc:
        message = expected_error(exc)
        if message is None:
            raise  # a bug: keep the traceback
        if args.verbose:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return 1


def _stdout_reader_gone() -> bool:
    """True if stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
