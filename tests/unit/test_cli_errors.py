"""Expected failures end in one `error:` line and exit 1 (130 on Ctrl-C); bugs keep a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

import httpx2
import pytest
from lightkube.core.exceptions import ConfigError

from pdorch import cli
from pdorch.cli_args import (
    namespace_name,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
    positive_port,
    split_host_port,
)
from pdorch.cli_errors import CliError, expected_error
from pdorch.devcluster import binaries

pytestmark = pytest.mark.unit


def test_positive_int_accepts_one_and_more() -> None:
    assert positive_int("1") == 1 and positive_int("16") == 16
    for bad in ("0", "-1", "x", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(bad)
    assert non_negative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError):
        non_negative_int("-1")
    assert non_negative_float("0") == 0.0 and positive_float("0.5") == 0.5
    for bad in ("nan", "inf", "-inf", "-0.1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a number >= 0"):
            non_negative_float(bad)


def test_ports_and_namespaces_are_checked_values() -> None:
    assert port_number("0") == 0 and port_number("65535") == 65535 and positive_port("1") == 1
    for bad in ("65536", "-1", "x", "80.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="port in 0-65535"):
            port_number(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="port in 1-65535"):
        positive_port("0")
    assert namespace_name("kube-system") == "kube-system" and namespace_name("a" * 63) == "a" * 63
    for bad in ("", "Bad", "a_b", "-a", "a-", "a.b", "a" * 64):
        with pytest.raises(argparse.ArgumentTypeError, match="namespace name"):
            namespace_name(bad)


@pytest.mark.parametrize(
    "argv",
    [
        ["dev-cluster", "up", "--nodes", "-1"],
        ["dev-cluster", "up", "--nodes", "0"],
        ["dev-cluster", "up", "--gpus-per-node", "-1"],
        ["demo", "--users", "0"],
        ["controller", "--workers", "0"],
        # nan passed `interval <= 0` and busy-looped; a nan drain timeout never ended a drain, a
        # negative one scaled down onto busy victims at once (helper-65).
        ["scaler", "--interval", "nan"],
        ["scaler", "--interval", "0"],
        ["scaler", "--interval", "inf"],
        ["scaler", "--drain-timeout", "-5"],
        ["scaler", "--drain-timeout", "nan"],
        ["scaler", "--pod-startup", "nan"],
        ["scaler", "--pod-startup", "-1"],
        # A listen address was split only when the server started: tracebacks (helper-75 B2).
        ["scaler", "--metrics-addr", "garbage"],
        ["scaler", "--metrics-addr", "127.0.0.1:99999"],
        ["scaler", "--metrics-addr", "[::1"],
        ["controller", "--health-addr", "garbage"],
        ["controller", "--health-addr", "::1:8081"],
        # argparse's int took 70000, and the sim then listened on 70000 mod 65536 = 4464.
        ["sim", "--port", "70000"],
        ["sim", "--port", "-1"],
        ["sim", "--bootstrap-port", "65536"],
        ["sim", "--time-scale", "nan"],
        ["sim", "--kv-lease-seconds", "-1"],
        ["sim", "--waiting-timeout", "inf"],
        ["sim", "--fault-stall-after", "-1"],
        ["proxy", "--port", "70000"],
        ["proxy", "--metrics-port", "-1"],
        ["proxy", "--bootstrap-port", "0"],
        ["plan", "-f", "x.yaml", "--delay", "-1"],
        ["demo", "--rollout-after", "nan"],
        ["demo", "--rollout-after", "-2"],
        # A namespace that cannot exist reached the output of render, or an apiserver's 404.
        ["render", "-f", "x.yaml", "-n", "Bad_NS"],
        ["controller", "--namespace", "x-"],
        ["scaler", "--namespace", "a" * 64],
        ["proxy", "--namespace", "UPPER"],
    ],
)
def test_negative_counts_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_messages_say_what_failed_and_what_to_do() -> None:
    assert expected_error(CliError("the build failed", "install Go")) == "the build failed — install Go"
    msg = expected_error(ConfigError("Configuration file /nonexistent not found"))
    assert msg is not None and "/nonexistent" in msg and "--kubeconfig" in msg
    refused = httpx2.ConnectError(
        "[Errno 111] Connection refused", request=httpx2.Request("GET", "https://127.0.0.1:6443/apis")
    )
    msg = expected_error(refused)
    assert msg is not None and "https://127.0.0.1:6443" in msg and "Connection refused" in msg
    assert expected_error(ExceptionGroup("tasks", [refused])) == msg
    # Anything else is a bug: no message, the caller re-raises it.
    assert expected_error(ValueError("x")) is None
    assert expected_error(ExceptionGroup("tasks", [refused, ValueError("x")])) is None


def _main_with(
    func: Callable[[argparse.Namespace], int], argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> int:
    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="pdorch")
        p.add_argument("-v", "--verbose", action="store_true")
        p.set_defaults(func=func)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    return cli.main(argv)


def test_main_prints_one_line_for_an_expected_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(_: argparse.Namespace) -> int:
        raise ConfigError("Configuration file /nonexistent not found")

    assert _main_with(fails, [], monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no usable Kubernetes configuration") and "Traceback" not in err
    assert _main_with(fails, ["-v"], monkeypatch) == 1
    assert "Traceback" in capsys.readouterr().err  # -v shows where it came from


def test_main_exits_130_on_ctrl_c(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(_: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    assert _main_with(interrupted, [], monkeypatch) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_main_does_not_hide_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(_: argparse.Namespace) -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        _main_with(buggy, [], monkeypatch)


def test_controller_with_a_missing_kubeconfig_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Fails while loading the kubeconfig, before any connection or port is opened.
    assert cli.main(["controller", "--kubeconfig", "/nonexistent/kubeconfig"]) == 1
    err = capsys.readouterr().err
    assert "error: no usable Kubernetes configuration" in err and "/nonexistent/kubeconfig" in err


def test_a_failed_control_plane_build_is_an_expected_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(argv: list[str], **_: object) -> None:
        raise subprocess.CalledProcessError(127, argv)

    monkeypatch.setattr(binaries, "locate", lambda: None)
    monkeypatch.setattr(binaries.subprocess, "run", build)
    with pytest.raises(binaries.BuildError) as exc:
        binaries.ensure()
    msg = expected_error(exc.value)
    assert msg is not None and "build-kube.sh exited 127" in msg and "pdorch dev-cluster build" in msg


def test_scaler_refuses_unknown_coefficients_before_reaching_the_cluster(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Checked once, before the kubeconfig is read (the bad path below would fail first otherwise)."""
    assert cli.main(["scaler", "--coefficients", "no-such-preset", "--kubeconfig", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert "--coefficients: unknown coefficients preset 'no-such-preset'" in err
    assert "kubeconfig" not in err


@pytest.mark.parametrize("lines", [3, 5000])  # flushed by main at the end / while printing
def test_a_closed_stdout_pipe_exits_141_without_a_traceback(
    lines: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pdorch dev-cluster status | head -8` ended with a BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # `head` has read its lines and exited
    with open(write_end, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)

        def prints(_: argparse.Namespace) -> int:
            for i in range(lines):
                print(f"line {i} " + "x" * 60)
            return 0

        assert _main_with(prints, [], monkeypatch) == 141
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_a_broken_pipe_elsewhere_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def peer_gone(_: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")  # a socket, while stdout is fine

    with pytest.raises(BrokenPipeError):
        _main_with(peer_gone, [], monkeypatch)


def test_listen_addresses_split_into_host_and_port() -> None:
    assert split_host_port("127.0.0.1:8090") == ("127.0.0.1", 8090)
    assert split_host_port("[::1]:8081") == ("::1", 8081)


async def test_a_taken_ops_address_is_one_error_naming_the_flag() -> None:
    """The controller's --health-addr and the scaler's --metrics-addr (helper-75 B2: the scaler's
    gave a traceback)."""
    import socket

    from aiohttp import web

    from pdorch.cli_errors import CliError
    from pdorch.ops_endpoint import serve_ops_endpoint

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(CliError) as exc:
            await serve_ops_endpoint(web.Application(), addr, "--metrics-addr", "/metrics")
    assert f"cannot serve /metrics on --metrics-addr {addr}" in str(exc.value)
    assert "pass another --metrics-addr HOST:PORT" in str(exc.value)
