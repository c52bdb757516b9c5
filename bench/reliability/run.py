"""bench/reliability: run the proxy fault and fuzz tests and record the numbers they print.

The tests (tests/compat/test_proxy_faults.py, tests/compat/test_proxy_fuzz.py) assert behaviour
(explicit errors, no hangs, nothing lost, fds back to baseline) and print one
``[reliability] <fault>: {json}`` line each with what they measured (times to error and recovery,
fd and RSS counts). This collects those lines into bench/results/reliability.{json,md}, the source of
the numbers in docs/reliability.md.

    python bench/reliability/run.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TESTS = ["tests/compat/test_proxy_faults.py", "tests/compat/test_proxy_fuzz.py"]
LINE = re.compile(r"\[reliability\] (?P<what>[^:]+): (?P<json>\{.*\})\s*$")


def collect(output: str) -> list[dict[str, Any]]:
    """The ``[reliability]`` records of a pytest -s output, in order."""
    out = []
    for line in output.splitlines():
        m = LINE.search(line)
        if m:
            out.append({"fault": m["what"], **json.loads(m["json"])})
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# bench/reliability",
        "",
        f"`{res['command']}`: {res['summary']}",
        "",
        "| fault | measured |",
        "|---|---|",
    ]
    for r in res["records"]:
        vals = ", ".join(f"{k}={v}" for k, v in r.items() if k != "fault")
        lines.append(f"| {r['fault']} | {vals} |")
    lines += ["", "Reproduce: `python bench/reliability/run.py`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reliability")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TESTS]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cp = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=1800)
    tail = cp.stdout.strip().splitlines()[-1] if cp.stdout.strip() else cp.stderr[-500:]
    res = {
        "command": "python -m pytest -q -s " + " ".join(TESTS),
        "exit_code": cp.returncode,
        "summary": tail,
        "records": collect(cp.stdout),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    if cp.returncode != 0:
        print(cp.stdout[-5000:], file=sys.stderr)
        raise SystemExit(cp.returncode)


if __name__ == "__main__":
    main()
