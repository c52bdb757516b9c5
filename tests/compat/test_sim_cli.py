"""`pdorch sim` as a process: starts, serves, and exits cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from pdorch.cli import main
from tests.compat.helpers import free_port, sim_argv, spawn, stop, wait_http_ok

pytestmark = pytest.mark.compat


def test_sigterm_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "sim.log"
    proc = spawn(
        sim_argv("--port", str(port), "--coefficients", "distserve-opt13b-a100", "--time-scale", "0.01"),
        log,
    )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 30, proc, log)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"prompt": "hello", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.load(r)["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    except subprocess.TimeoutExpired:
        pytest.fail("pdorch sim did not exit within 15 s of SIGTERM")
    finally:
        stop(proc)


def test_bad_arguments_exit_nonzero(tmp_path: Path) -> None:
    assert main(["sim", "--coefficients", "no-such-preset"]) == 2
    bad = tmp_path / "roles.json"
    bad.write_text(json.dumps({"127.0.0.1": "router"}))
    assert main(["sim", "--role-map", str(bad)]) == 2


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--fault-status", "200"], "--fault-status"),
        (["--fault-stall-after", "-1"], "--fault-stall-after"),
        (["--fault-hang", "--fault-roles", "router"], "--fault-roles"),
    ],
)
def test_bad_fault_flags_exit_2_naming_the_flag(
    args: list[str], flag: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["sim", *args])
    except SystemExit as exc:  # refused by the flag's argparse type
        code = exc.code
    assert code == 2
    assert flag in caplog.text + capsys.readouterr().err
