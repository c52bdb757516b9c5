"""bench/rollout/planner_cost.py: CPU time of the rollout planner per controller decision.

The controller asks the planner for the next step on every reconcile of a group in a rollout.
This runs whole rollouts through `planner.simulate` (every group ready one tick after it is
created) at growing fleet sizes and times each decision, for the current planner and, side by side
in the same process, for the planner as of a git revision given with `--before` (read with
`git show`, loaded as a separate module). The first decision of a rollout also pays for
`auto_tolerance` (no ratioTolerance set), exactly as the controller does.

    PYTHONPATH=$PWD python3 bench/rollout/planner_cost.py --before b647565 --before 5534bdb   # about 10 min

MID_CASES start from a mid-rollout state instead (a scale-down that left both cohorts off the
ratio), with the ratio tolerance given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import queue
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
from pdorch.rollout.state import RoleObservation, RolloutSpec

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"

# (prefill groups, decode groups, ratio P, ratio D, maxSurge, maxUnavailable).
CASES: list[tuple[int, int, int, int, int | str, int | str]] = [
    (8, 4, 2, 1, "25%", "25%"),
    (100, 50, 2, 1, "25%", "25%"),
    (300, 150, 2, 1, "25%", "25%"),
    (1000, 500, 2, 1, "25%", "25%"),
    (4, 2, 2, 1, 2000, "25%"),
    (1000, 1000, 1, 1, "25%", "25%"),
    (5000, 5000, 1, 1, "25%", "25%"),
]
# (desired, old, new groups) of prefill, then of decode, ratio P, ratio D, tolerance, maxSurge,
# maxUnavailable: 700 prefill groups (550 old) scaled down to 350 mid-rollout.
MID_CASES: list[tuple[tuple[int, int, int], tuple[int, int, int], int, int, float, int | str, int | str]] = [
    ((350, 550, 150), (550, 550, 250), 1, 2, 0.0, "50%", "50%"),
]
# A planner that takes longer than this on one case is stopped and reported as such (the planner
# before 8c26acb ran for minutes and gigabytes on 1000:1000 at 1:1).
CASE_TIMEOUT_S = 120.0


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


def measure_bounded(planner: ModuleType, *args: Any) -> dict[str, Any]:
    """`measure` in a forked process, stopped after CASE_TIMEOUT_S."""
    ctx = mp.get_context("fork")  # the child inherits the planner module loaded from git
    out: Any = ctx.Queue()
    proc = ctx.Process(target=lambda: out.put(measure(planner, *args)))
    proc.start()
    try:
        return out.get(timeout=CASE_TIMEOUT_S)
    except queue.Empty:
        return {"timeout_s": CASE_TIMEOUT_S}
    finally:
        proc.kill()
        proc.join()


def measure(
    planner: ModuleType,
    p: int,
    d: int,
    rp: int,
    rd: int,
    surge: int | str,
    unavailable: int | str,
    mid: tuple[tuple[int, int, int], tuple[int, int, int], float] | None = None,
) -> dict[str, Any]:
    """Time the first decision and every decision of one whole simulated rollout (from the
    mid-rollout state and tolerance `mid` when given)."""
    start = planner.initial_state([("prefill", "prefill", p), ("decode", "decode", d)])
    if mid is not None:
        start = [
            RoleObservation(name, name, desired, old, new, old, new, old, old + new - desired)
            for name, (desired, old, new) in zip(("prefill", "decode"), mid[:2], strict=True)
        ]
    spec = RolloutSpec(rp, rd, None if mid is None else mid[2], surge, unavailable)
    t0 = time.perf_counter()
    if mid is None:
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
    ap.add_argument(
        "--before", action="append", default=[], help="git revision of a planner to compare with (repeatable)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout-planner-cost")
    args = ap.parse_args()
    impls: dict[str, ModuleType] = {"current": current}
    for rev in args.before:
        impls[rev] = load_planner(rev)
    rows = []
    cases: list[tuple[Any, ...]] = [(*c, None) for c in CASES]
    cases += [(p[0], d[0], rp, rd, surge, unav, (p, d, tol)) for p, d, rp, rd, tol, surge, unav in MID_CASES]
    for p, d, rp, rd, surge, unavailable, mid in cases:
        for name, module in impls.items():
            r = measure_bounded(module, p, d, rp, rd, surge, unavailable, mid)
            rows.append(
                {
                    "planner": name,
                    "prefill": p,
                    "decode": d,
                    "from": None
                    if mid is None
                    else f"{mid[0][1]}+{mid[0][2]}P/{mid[1][1]}+{mid[1][2]}D, tolerance {mid[2]:g}",
                    "ratio": f"{rp}:{rd}",
                    "maxSurge": surge,
                    "maxUnavailable": unavailable,
                    **r,
                }
            )
            if "timeout_s" in r:
                print(f"{name:>8} {p}P/{d}D ({rp}:{rd}): stopped after {CASE_TIMEOUT_S:.0f}s", flush=True)
                continue
            print(
                f"{name:>8} {p}P/{d}D surge {surge} unavailable {unavailable}: first {r['first_decision_s']:.3f}s, "
                f"median {r['median_decision_ms']:.2f}ms, max {r['max_decision_ms']:.2f}ms over {r['decisions']} "
                f"decisions, {r['steps']} steps, {r['outcome']}, peak prefill {r['peak_prefill_groups']}",
                flush=True,
            )
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| fleet | ratio | maxSurge / maxUnavailable | planner | first decision s | median decision ms | max decision ms | steps | peak prefill groups |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fleet = f"{r['prefill']}P/{r['decode']}D" + (f" from {r['from']}" if r.get("from") else "")
        head = f"| {fleet} | {r['ratio']} | {r['maxSurge']} / {r['maxUnavailable']} | {r['planner']} |"
        if "timeout_s" in r:
            lines.append(f"{head} stopped after {r['timeout_s']:.0f} s | | | | |")
            continue
        lines.append(
            f"{head} {r['first_decision_s']:.3f} | {r['median_decision_ms']:.2f} | {r['max_decision_ms']:.2f} | "
            f"{r['steps']} | {r['peak_prefill_groups']} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
