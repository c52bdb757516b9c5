"""bench/rollout/planner_cost.py: CPU time of the rollout planner per controller decision.

The controller asks the planner for the next step on every reconcile of a group in a rollout.
This runs whole rollouts through `planner.simulate` (every group ready one tick after it is
created) at growing fleet sizes and times each decision, for the current planner and, side by side
in the same process, for the planner as of a git revision given with `--before` (read with
`git show`, loaded as a separate module). The first decision of a rollout also pays for
`auto_tolerance` (no ratioTolerance set), exactly as the controller does.

    PYTHONPATH=$PWD python3 bench/rollout/planner_cost.py --before ed7ecce   # about 4 min
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from pdorch.rollout import planner as current
from pdorch.rollout.state import RolloutSpec

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"

# (prefill groups, decode groups, maxSurge, maxUnavailable) at a 2:1 ratio.
CASES: list[tuple[int, int, int | str, int | str]] = [
    (8, 4, "25%", "25%"),
    (100, 50, "25%", "25%"),
    (300, 150, "25%", "25%"),
    (1000, 500, "25%", "25%"),
    (4, 2, 2000, "25%"),
]


def load_planner(rev: str) -> ModuleType:
    """The planner module as of git revision `rev` (its imports resolve to the current package)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:pdorch/rollout/planner.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"planner_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"planner_{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def measure(planner: ModuleType, p: int, d: int, surge: int | str, unavailable: int | str) -> dict[str, Any]:
    """Time the first decision and every decision of one whole simulated rollout."""
    start = planner.initial_state([("prefill", "prefill", p), ("decode", "decode", d)])
    spec = RolloutSpec(2, 1, None, surge, unavailable)
    t0 = time.perf_counter()
    spec = replace(spec, tolerance=planner.auto_tolerance(start, spec))
    first = planner.next_step(start, spec)
    first_s = time.perf_counter() - t0

    times: list[float] = []
    inner = planner.next_step

    def timed(observed: Any, s: RolloutSpec) -> Any:
        t = time.perf_counter()
        out = inner(observed, s)
        times.append(time.perf_counter() - t)
        return out

    planner.next_step = timed  # simulate() looks next_step up in its module at call time
    try:
        snaps = planner.simulate(spec, start, lambda *_: 1)
    finally:
        planner.next_step = inner
    return {
        "first_decision_s": first_s,
        "first_kind": first.kind,
        "decisions": len(times),
        "median_decision_ms": 1000 * statistics.median(times),
        "max_decision_ms": 1000 * max(times),
        "rollout_total_s": sum(times),
        "steps": snaps[-1].step,
        "outcome": snaps[-1].decision.kind,
        "peak_prefill_groups": max(
            r.old_total + r.new_total for s in snaps for r in s.roles if r.name == "prefill"
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="git revision of the planner to compare with (e.g. ed7ecce)")
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout-planner-cost")
    args = ap.parse_args()
    impls: dict[str, ModuleType] = {"current": current}
    if args.before:
        impls[args.before] = load_planner(args.before)
    rows = []
    for p, d, surge, unavailable in CASES:
        for name, module in impls.items():
            r = measure(module, p, d, surge, unavailable)
            rows.append(
                {
                    "planner": name,
                    "prefill": p,
                    "decode": d,
                    "maxSurge": surge,
                    "maxUnavailable": unavailable,
                    **r,
                }
            )
            print(
                f"{name:>8} {p}P/{d}D surge {surge} unavailable {unavailable}: first {r['first_decision_s']:.3f}s, "
                f"median {r['median_decision_ms']:.2f}ms, max {r['max_decision_ms']:.1f}ms over {r['decisions']} "
                f"decisions, {r['steps']} steps, {r['outcome']}, peak prefill {r['peak_prefill_groups']}",
                flush=True,
            )
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| fleet (2:1) | maxSurge / maxUnavailable | planner | first decision s | median decision ms | max decision ms | steps | peak prefill groups |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prefill']}P/{r['decode']}D | {r['maxSurge']} / {r['maxUnavailable']} | {r['planner']} | "
            f"{r['first_decision_s']:.3f} | {r['median_decision_ms']:.2f} | {r['max_decision_ms']:.1f} | "
            f"{r['steps']} | {r['peak_prefill_groups']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
