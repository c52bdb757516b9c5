"""argparse value types of the `pdorch` command line: a bad value is a usage error naming it."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from pdorch.api.base import DNS1123_LABEL


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(value, 1, "a positive integer")


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded_int(value, 0, "an integer >= 0")


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0."""
    return _bounded_float(value, 0.0, "a number > 0", strict=True)


def non_negative_float(value: str) -> float:
    """argparse type: a finite number >= 0 (nan and inf refused: a nan timeout never ends)."""
    return _bounded_float(value, 0.0, "a number >= 0", strict=False)


def port_number(value: str) -> int:
    """argparse type: a TCP port to listen on, 0-65535 (0 = any free port)."""
    return _port(value, 0)


def positive_port(value: str) -> int:
    """argparse type: a TCP port to connect to, 1-65535."""
    return _port(value, 1)


def _port(value: str, minimum: int) -> int:
    expected = f"a port in {minimum}-65535"
    n = _bounded_int(value, minimum, expected)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {n}")
    return n


def namespace_name(value: str) -> str:
    """argparse type: a Kubernetes namespace name (a DNS-1123 label: lowercase, digits, '-')."""
    if len(value) > 63 or not re.fullmatch(DNS1123_LABEL, value):
        raise argparse.ArgumentTypeError(
            f"expected a namespace name (at most 63 lowercase letters, digits and '-', starting and "
            f"ending with a letter or digit), got {value!r}"
        )
    return value


def _bounded_float(value: str, minimum: float, expected: str, *, strict: bool) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return x


def _bounded_int(value: str, minimum: int, expected: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {n}")
    return n


def split_host_port(value: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" ("[::1]:8080" for IPv6); ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if "[" in host or "]" in host or (":" in host and not bracketed) or not host:
        raise ValueError(f"expected HOST:PORT (an IPv6 address in brackets: [::1]:8080), got {value!r}")
    try:
        n = int(port)
    except ValueError:
        raise ValueError(f"expected HOST:PORT with a numeric port, got {value!r}") from None
    if not 0 <= n <= 65535:
        raise ValueError(f"expected a port in 0-65535, got {n} in {value!r}")
    return host, n


def _host_port(value: str) -> str:
    split_host_port(value)
    return value


def checked(validate: Callable[[str], str]) -> Callable[[str], str]:
    """argparse type from a validator that raises ValueError: its message becomes the usage error."""

    def parse(value: str) -> str:
        try:
            return validate(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = validate.__name__  # argparse names the type in some messages
    return parse


# argparse type: "HOST:PORT" ("[::1]:8080" for IPv6), checked by `split_host_port`.
host_port = checked(_host_port)


def add_lease_arguments(p: argparse.ArgumentParser, namespace: str, name: str) -> None:
    """--lease-namespace, --lease-name and --identity of a leader-elected component."""
    p.add_argument(
        "--lease-namespace", default=namespace, help="namespace of the Lease (default %(default)s)"
    )
    p.add_argument(
        "--lease-name", default=name, help="name of the Lease; its Role must name it (default %(default)s)"
    )
    p.add_argument("--identity", help="leader-election identity (default: POD_NAME or hostname + random)")
