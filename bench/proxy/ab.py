"""bench/proxy/ab: two builds of the pdorch proxy, A/B, in turns with the P/D-direct baseline.

For a change to the proxy's hot path. Two processes of each build (``--a`` and ``--b``: source
trees, e.g. a `git worktree` of the old commit and this checkout) sit in front of the same sims.
In every step the P/D-direct baseline and the four proxies take turns in blocks of
``--block-seconds`` (as the main bench's half-load steps do), so machine drift cancels. Two
processes per build average out what one process's placement adds. Prints each step's added TTFT
p50 against P/D-direct and each build's CPU per 1000 requests (from /proc), and the medians of (b - a)
per step for both.

    git worktree add /tmp/pdorch-old HEAD~1
    python bench/proxy/ab.py --a /tmp/pdorch-old --b . --protocol sglang --rate 50 --reps 7
    python bench/proxy/ab.py --a /tmp/pdorch-old --b . --sglang-sims two-process --no-stream --rate 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the main bench's process and load-generator plumbing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="source tree of build A (holds pdorch/)")
    ap.add_argument("--b", required=True, help="source tree of build B")
    ap.add_argument("--protocol", choices=["vllm", "sglang"], default="sglang")
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--step-seconds", type=float, default=60.0, help="one step, shared by 5 targets")
    ap.add_argument("--block-seconds", type=float, default=0.5)
    ap.add_argument("--sglang-sims", choices=["one-process", "two-process"], default="one-process")
    ap.add_argument("--no-stream", action="store_true", help="non-streaming requests (default: streaming)")
    args = ap.parse_args()
    run_args = argparse.Namespace(
        step_seconds=args.step_seconds,
        warmup=2.0,
        request_timeout=30.0,
        engine_loop="uvloop",
        block_seconds=args.block_seconds,
    )
    front = f"pdorch-{args.protocol}"
    slots = [("a1", args.a), ("b1", args.b), ("b2", args.b), ("a2", args.a)]
    with tempfile.TemporaryDirectory(prefix="bench-proxy-ab-") as tmp:
        stacks = bench.Stacks(Path(tmp), 1e-3, sglang_sims=args.sglang_sims)
        try:
            pd: dict[str, object] = {}
            spawn = stacks.spawn_sglang_pd if args.protocol == "sglang" else stacks.spawn_vllm_pd
            pd[args.protocol], waits = spawn()
            for proc, url in waits:
                bench.wait_http_ok(url, proc)
            saved = os.environ.get("PYTHONPATH")
            for name, tree in slots:
                os.environ["PYTHONPATH"] = str(Path(tree).resolve())  # this build's pdorch package
                stacks.start_front(front, pd)
                stacks.rename_front(front, name)
            if saved is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = saved
            for name, _ in slots:
                stacks.finish_front(name)
                if stacks.targets[name].error:
                    raise SystemExit(f"{name}: {stacks.targets[name].error}")
            base_name = f"pd-direct-{args.protocol}"
            targets = [stacks.targets[base_name]] + [stacks.targets[n] for n, _ in slots]
            # Streaming: time to the first chunk; non-streaming: to the whole answer.
            lat_key, lat_label = ("ttft_p50_ms", "added TTFT p50 ms")
            if args.no_stream:
                lat_key, lat_label = ("p50_ms", "added latency p50 ms")
            diffs: dict[str, list[float]] = {lat_label: [], "CPU s/1k req": []}
            for rep in range(args.reps):
                got = bench.run_turns(targets, args.rate, not args.no_stream, run_args, 7 + rep)
                added: dict[str, float] = {}
                cpu: dict[str, float] = {}
                for name, _ in slots:
                    bench.add_deltas(got[name], got[base_name], prefix="added_vs_pd_")
                    added[name] = got[name]["added_vs_pd_" + lat_key]
                    cpu[name] = got[name]["cpu_s_per_1k_req"]
                for label, vals in ((lat_label, added), ("CPU s/1k req", cpu)):
                    diffs[label].append((vals["b1"] + vals["b2"] - vals["a1"] - vals["a2"]) / 2)
                    cells = " ".join(f"{n} {vals[n]:.3f}" for n, _ in slots)
                    print(f"step {rep + 1}: {label} {cells}; b - a {diffs[label][-1]:+.3f}", flush=True)
            for label, d in diffs.items():
                print(
                    f"{label}, b - a over {args.reps} steps: median {statistics.median(d):+.3f}, "
                    f"mean {statistics.fmean(d):+.3f}, s.d. {statistics.pstdev(d):.3f}"
                )
        finally:
            stacks.stop_all()


if __name__ == "__main__":
    main()
