"""Is the bench goal reachable by a causal policy? A family sweep per pod start-up time.

For one workload and each start-up time, the clairvoyant oracle (as in run.py) and a broad family
of causal policies built from pdorch's policy: forecast quantile (off or on), scale-down
stabilization window (hold), prefill floor (min replicas held at all times) and prefill
utilisation cap. Reports, per start-up time, the best attainment any family member reaches within
1.15x the oracle's GPU-hours and the fewest GPU-hours (x oracle) any member needs for 99%.

    PYTHONPATH=$PWD python3 bench/autoscale/feasibility.py --workload azure-code --startup 10 60 180
    PYTHONPATH=$PWD python3 bench/autoscale/feasibility.py --workload azure-code --startup 0 10 --tick 5

Writes bench/results/autoscale-feasibility.{json,md}. Evidence, not proof: a family is not every
causal policy, but it spans the usual levers (predict, hold, floor, headroom).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

import policies
import run

from pdorch.scaler.damping import DampingConfig
from pdorch.scaler.policy import SloPolicyConfig
from pdorch.sim.latency import DISTSERVE_OPT13B_A100

BUDGET = 1.15

FAMILY = {
    "forecast_quantile": [None, 0.9, 0.99],
    "scale_down_s": [None, 300.0, 1200.0],  # None: start-up + tick (the default)
    "prefill_floor": [1, 15, 30, 45],
    "max_prefill_utilisation": [0.7, 0.85],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="azure-code")
    ap.add_argument("--startup", type=float, nargs="+", default=[10.0, 60.0, 180.0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tick", type=float, default=15.0, help="controller tick, seconds (default 15)")
    ap.add_argument(
        "--prefill-floors",
        type=int,
        nargs="+",
        default=FAMILY["prefill_floor"],
        help="prefill floors of the family (the default suits azure-code, whose static-best is 45 prefills)",
    )
    ap.add_argument(
        "--weighted",
        action="store_true",
        help="weight the forecast's rises by work, as the policy now does (the published sweeps weigh by tick)",
    )
    ap.add_argument(
        "--proxy-queue",
        action="store_true",
        help="every replay behind pdorch's prefill queue (router.prefillQueue; run.py --proxy-queue)",
    )
    ap.add_argument("--out", type=Path, default=run.REPO / "bench" / "results")
    args = ap.parse_args()
    family = {**FAMILY, "prefill_floor": args.prefill_floors}
    c = replace(DISTSERVE_OPT13B_A100, max_model_len=16384)
    wl = next(w for w in run.build_workloads(True, args.seed) if w.name == args.workload)
    out: dict[str, object] = {
        "workload": wl.name,
        "seed": args.seed,
        "tick_s": args.tick,
        "forecast_weighted": args.weighted,
        "proxy_queue": args.proxy_queue,
        "budget": BUDGET,
        "family": family,
        "startups": {},
    }
    for startup in args.startup:
        t0 = time.time()
        setup = run.Setup(
            c=c,
            slo=policies.Slo(2.0, 0.1),
            startup_s=startup,
            tick_s=args.tick,
            window_s=30.0,
            proxy_queue=args.proxy_queue,
        )
        (sp, sd), static, _ = run.best_static(setup, wl)
        orc, _ = run.run_oracle(setup, wl)
        rows = []
        keys = list(family)
        for vals in itertools.product(*family.values()):
            k = dict(zip(keys, vals, strict=True))
            cfg = SloPolicyConfig(
                forecast_lead_s=startup + setup.tick_s,
                forecast_horizon_s=0.0 if k["forecast_quantile"] is None else 1800.0,
                forecast_quantile=k["forecast_quantile"] or 0.9,
                forecast_weighted=args.weighted,
                max_prefill_utilisation=k["max_prefill_utilisation"],
            )
            down = k["scale_down_s"] or startup + setup.tick_s
            damping = DampingConfig(1, 1000, 0.0, down, 60.0)
            floor = k["prefill_floor"]
            inner = policies.pdorch_policy(c, setup.slo, damping, cfg)

            def pol(t, loads, cur, inner=inner, floor=floor):
                got = inner(t, loads, cur)
                got["prefill"] = max(got["prefill"], floor)
                return got

            s = run.summarize(setup, run.simulate(setup, wl, pol, (max(sp, floor), sd)))
            rows.append({**k, "attainment": s["attainment"], "gpu_hours": s["gpu_hours"]})
        og = orc["gpu_hours"]
        within = [r for r in rows if r["gpu_hours"] <= BUDGET * og]
        meeting = [r for r in rows if r["attainment"] >= run.TARGET]
        best_within = max(within, key=lambda r: r["attainment"], default=None)
        cheapest = min(meeting, key=lambda r: r["gpu_hours"], default=None)
        out["startups"][str(int(startup))] = {  # type: ignore[index]
            "oracle": {"attainment": orc["attainment"], "gpu_hours": og},
            "static_best": {
                "prefill": sp,
                "decode": sd,
                "attainment": static["attainment"],
                "gpu_hours": static["gpu_hours"],
            },
            "best_within_budget": best_within,
            "cheapest_meeting_target": cheapest,
            "family": rows,
        }
        bw = (
            f"{best_within['attainment']:.2%} at {best_within['gpu_hours'] / og:.2f}x"
            if best_within
            else "none"
        )
        ch = f"{cheapest['gpu_hours'] / og:.2f}x ({cheapest['attainment']:.2%})" if cheapest else "none"
        print(
            f"start-up {startup:.0f}s: oracle {orc['attainment']:.2%} at {og:.2f} GPU-h; static-best "
            f"{static['gpu_hours'] / og:.2f}x; best within {BUDGET}x: {bw}; cheapest >= 99%: {ch}; "
            f"{len(rows)} members, {time.time() - t0:.0f}s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = (
        f"autoscale-feasibility-{wl.name}"
        + (f"-tick{args.tick:g}" if args.tick != 15.0 else "")
        + ("-weighted" if args.weighted else "")
        + ("-proxy-queue" if args.proxy_queue else "")
    )
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# Feasibility: {wl.name} (seed {args.seed}, controller tick {args.tick:g} s, "
        f"forecast rises weighted by {'work' if args.weighted else 'tick'}"
        + (", behind pdorch's prefill queue)" if args.proxy_queue else ")"),
        "",
        f"Family: {json.dumps(family)} ({len(list(itertools.product(*family.values())))} policies per start-up).",
        "",
        f"| start-up | oracle attainment | oracle GPU-h | static-best vs oracle | best attainment within {BUDGET}x oracle | fewest GPU-h for 99% (x oracle) |",
        "|---|---|---|---|---|---|",
    ]
    for su, d in out["startups"].items():  # type: ignore[union-attr]
        og = d["oracle"]["gpu_hours"]
        bw, ch = d["best_within_budget"], d["cheapest_meeting_target"]
        lines.append(
            f"| {su} s | {d['oracle']['attainment']:.2%} | {og:.2f} | {d['static_best']['gpu_hours'] / og:.2f}x | "
            + (f"{bw['attainment']:.2%} ({bw['gpu_hours'] / og:.2f}x)" if bw else "none")
            + " | "
            + (f"{ch['gpu_hours'] / og:.2f}x ({ch['attainment']:.2%})" if ch else "none in the family")
            + " |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
