"""How the policies' knobs are chosen: a grid on the tuning half of the Azure traces, by a fixed rule.

The tuning half is minutes 0-30 of azure-conv and azure-code (4x, seed 1); minutes 30-60 are
held out (`run.py --half second`). The rule, fixed before the grid is run:
  1. most traces meeting the goal (>= 99% attainment at <= 1.15x the oracle's GPU-hours of that half),
  2. then most traces at >= 99%,
  3. then the highest mean attainment per GPU-hour relative to the oracle's.
Every policy starts from the half's static-best fleet, as in run.py. pdorch's grid has 216 members;
each peer gets a grid of its own knobs of the same size (notes/autoscaling.md §5.1: equal tuning
budgets). Behind the queue (`--proxy-queue`) the peers read the proxy's queue (`run.sees_queue`).

    PYTHONPATH=$PWD python3 bench/autoscale/tune.py                 # pdorch, 3 min -> autoscale-tuning.*
    PYTHONPATH=$PWD python3 bench/autoscale/tune.py --policy hpa    # -> autoscale-tuning-hpa.*
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import policies
import run

from pdorch.scaler.damping import DampingConfig
from pdorch.scaler.policy import SloPolicyConfig
from pdorch.sim.latency import DISTSERVE_OPT13B_A100

BUDGET = 1.15
TRACES = ("azure-conv", "azure-code")
GRID: dict[str, list[object]] = {  # pdorch
    "scale_down_s": [75.0, 150.0, 300.0, 600.0],
    # None: forecast off (size for the last tick only).
    "forecast_quantile": [None, 0.5, 0.75, 0.9, 0.95],
    "forecast_weighted": [True, False],
    "max_prefill_utilisation": [0.85, 0.9, 0.95],
    "decode_burst_z": [1.64, 2.33],
}

# Each peer's grid has 216 members, as pdorch's, over the knobs an operator of that autoscaler
# tunes (notes/autoscaling.md §5.1: equal tuning budgets; before 2026-12-07 they had 24-120).
PEER_GRIDS: dict[str, dict[str, list[float | str]]] = {
    "hpa": {  # 6 x 3 x 3 x 2 x 2
        "waiting_target": [1.0, 2.0, 5.0, 10.0, 20.0, 40.0],  # prefill: waiting requests per pod
        "kv_target": [0.6, 0.75, 0.9],  # decode: KV usage
        "scale_down_s": [75.0, 300.0, 600.0],  # behavior.scaleDown.stabilizationWindowSeconds
        "tolerance": [0.1, 0.2],  # the HPA's dead band (per-HPA since k8s 1.33)
        "scale_up_s": [0.0, 60.0],  # behavior.scaleUp.stabilizationWindowSeconds
    },
    "fixed-ratio": {  # 6 x 4 x 3 x 3
        "tps_fraction": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9],  # target share of profiled decode tokens/s
        "ratio_scale": [0.75, 1.0, 1.5, 2.0],  # P:D as a multiple of the static-best ratio
        "scale_down_s": [150.0, 300.0, 600.0],
        "window_s": [15.0, 60.0, 180.0],  # the tokens/s metric's averaging window
    },
    "dynamo-sla": {  # 4 x 6 x 3 x 3
        "interval_s": [15.0, 30.0, 60.0, 180.0],  # adjustment_interval
        "ttft_scale": [0.1, 0.2, 0.3, 0.5, 0.75, 1.0],  # planner TTFT target / real SLO
        "itl_scale": [0.5, 0.75, 1.0],  # planner ITL target / real SLO
        "predictor": ["constant", "arima", "kalman"],
    },
}

C = replace(DISTSERVE_OPT13B_A100, max_model_len=16384)
SETUP = run.Setup(c=C, slo=policies.Slo(2.0, 0.1), startup_s=60.0, tick_s=15.0, window_s=30.0)


def members(policy: str = "pdorch", holds: list[float] | None = None) -> list[dict[str, object]]:
    """The policy's grid; pdorch's forecast-off members are counted once (weighting means nothing without it).

    `holds` replaces pdorch's scale-down windows (a wider check; the published choice used GRID's).
    """
    if policy != "pdorch":
        grid = PEER_GRIDS[policy]
        return [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]
    pd_grid = {**GRID, "scale_down_s": holds} if holds else GRID
    out = []
    for vals in itertools.product(*pd_grid.values()):
        k = dict(zip(pd_grid, vals, strict=True))
        if k["forecast_quantile"] is None and not k["forecast_weighted"]:
            continue
        out.append(k)
    return out


def config(k: dict[str, object]) -> tuple[SloPolicyConfig, DampingConfig]:
    """The policy and damping a grid member stands for (other fields: the API and policy defaults)."""
    q = k["forecast_quantile"]
    cfg = SloPolicyConfig(
        forecast_lead_s=SETUP.startup_s + SETUP.tick_s,
        forecast_horizon_s=0.0 if q is None else 1800.0,
        forecast_quantile=float(q) if q is not None else 0.75,  # type: ignore[arg-type]
        forecast_weighted=bool(k["forecast_weighted"]),
        max_prefill_utilisation=float(k["max_prefill_utilisation"]),  # type: ignore[arg-type]
        decode_burst_z=float(k["decode_burst_z"]),  # type: ignore[arg-type]
    )
    return cfg, DampingConfig(1, 1000, 0.0, float(k["scale_down_s"]), 60.0)  # type: ignore[arg-type]


@functools.cache  # built once per worker process, not once per replay (~0.1 s each)
def _half(name: str, seed: int) -> run.workloads.Workload:
    wl = next(w for w in run.build_workloads(True, seed) if w.name == name)
    return run.half_of(wl, "first")


def _references(args: tuple[str, int]) -> tuple[str, tuple[int, int], dict[str, float]]:
    name, seed = args
    wl = _half(name, seed)
    start, _, _ = run.best_static(SETUP, wl)
    orc, _ = run.run_oracle(SETUP, wl)
    return name, start, orc


def _replay(args: tuple[str, str, int, tuple[int, int], dict[str, object]]) -> dict[str, float]:
    policy, name, seed, start, k = args
    wl = _half(name, seed)
    if policy == "pdorch":
        cfg, damping = config(k)
        pol = policies.pdorch_policy(C, SETUP.slo, damping, cfg)
    else:
        knobs = {key: v if isinstance(v, str) else float(v) for key, v in k.items()}  # type: ignore[arg-type]
        pol = policies.peer_policy(
            policy, knobs, C, SETUP.slo, SETUP.tick_s, wl.arrivals, start[0] / start[1]
        )
    return run.summarize(SETUP, run.simulate(SETUP, wl, pol, start, peer=policy != "pdorch"))


def rank_key(row: dict[str, object]) -> tuple[float, float, float]:
    """The fixed rule as a sort key (larger is better)."""
    per = row["traces"].values()  # type: ignore[union-attr]
    goal = sum(1 for t in per if t["attainment"] >= run.TARGET and t["vs_oracle"] <= BUDGET)
    met = sum(1 for t in per if t["attainment"] >= run.TARGET)
    eff = sum(t["efficiency_vs_oracle"] for t in per) / len(per)
    return (goal, met, eff)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="pdorch", choices=["pdorch", *PEER_GRIDS])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--holds",
        type=float,
        nargs="+",
        help="pdorch only: scale-down windows to try instead of the grid's (writes autoscale-tuning-holds.*)",
    )
    ap.add_argument(
        "--proxy-queue",
        action="store_true",
        help="replay behind the proxy's prefill queue (run.py --proxy-queue; writes autoscale-tuning*-proxy-queue.*)",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=run.REPO / "bench" / "results")
    args = ap.parse_args()
    t0 = time.time()
    global SETUP
    SETUP = replace(SETUP, proxy_queue=args.proxy_queue)  # before the pool forks: the workers inherit it
    if args.holds and args.policy != "pdorch":
        ap.error("--holds applies to pdorch only")
    grid = members(args.policy, args.holds)
    with ProcessPoolExecutor(args.workers) as pool:
        refs = {
            name: (start, orc) for name, start, orc in pool.map(_references, [(n, args.seed) for n in TRACES])
        }
        jobs = [(args.policy, n, args.seed, refs[n][0], k) for k in grid for n in TRACES]
        results = list(pool.map(_replay, jobs, chunksize=4))
    rows: list[dict[str, object]] = []
    for i, k in enumerate(grid):
        traces = {}
        for j, n in enumerate(TRACES):
            s, orc = results[i * len(TRACES) + j], refs[n][1]
            traces[n] = {
                "attainment": s["attainment"],
                "gpu_hours": s["gpu_hours"],
                "vs_oracle": s["gpu_hours"] / orc["gpu_hours"],
                "efficiency_vs_oracle": s["attainment_per_gpu_hour"] / orc["attainment_per_gpu_hour"],
            }
        rows.append({"knobs": k, "traces": traces})
    rows.sort(key=rank_key, reverse=True)
    out = {
        "policy": args.policy,
        "half": "first (minutes 0-30)",
        "seed": args.seed,
        "proxy_queue": args.proxy_queue,
        "budget": BUDGET,
        "grid": (
            {**GRID, "scale_down_s": args.holds or GRID["scale_down_s"]}
            if args.policy == "pdorch"
            else PEER_GRIDS[args.policy]
        ),
        "references": {
            n: {"static_best": list(refs[n][0]), "oracle_gpu_hours": refs[n][1]["gpu_hours"]} for n in TRACES
        },
        "chosen": rows[0],
        "ranked": rows,
        "wall_s": round(time.time() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        "autoscale-tuning"
        + ("" if args.policy == "pdorch" else f"-{args.policy}")
        + ("-holds" if args.holds else "")
        + ("-proxy-queue" if args.proxy_queue else "")
    )
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    keys = list(grid[0])
    lines = [
        f"# Tuning {args.policy} on minutes 0-30 of {', '.join(TRACES)} (seed {args.seed})"
        + (", behind the proxy's prefill queue" if args.proxy_queue else ""),
        "",
        f"Grid: {json.dumps(out['grid'])} ({len(grid)} members). Rule: most traces meeting the goal (>= 99% at "
        f"<= {BUDGET}x oracle), then most at >= 99%, then mean attainment per GPU-hour relative to the oracle.",
        "",
        "| rank | "
        + " | ".join(keys)
        + " | "
        + " | ".join(f"{n} attainment | {n} x oracle" for n in TRACES)
        + " | mean efficiency vs oracle |",
        "|---" * (2 + len(keys) + 2 * len(TRACES)) + "|",
    ]
    for rank, r in enumerate(rows[:15], 1):
        k, tr = r["knobs"], r["traces"]
        lines.append(
            f"| {rank} | "
            + " | ".join("off" if k[key] is None else str(k[key]) for key in keys)  # type: ignore[index]
            + " | "
            + " | ".join(f"{tr[n]['attainment']:.2%} | {tr[n]['vs_oracle']:.2f}x" for n in TRACES)  # type: ignore[index]
            + f" | {rank_key(r)[2]:.3f} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"{len(grid)} members x {len(TRACES)} traces in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
