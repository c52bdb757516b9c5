"""Print the autoscaling tables of docs/benchmarks.md from a results json (so the docs' numbers are
the committed results', not retyped).

    PYTHONPATH=$PWD python3 bench/autoscale/doc_tables.py bench/results/autoscale.json
    PYTHONPATH=$PWD python3 bench/autoscale/doc_tables.py --headline bench/results/autoscale.json \\
        bench/results/autoscale-proxy-queue.json --workloads azure-conv azure-code
    PYTHONPATH=$PWD python3 bench/autoscale/doc_tables.py --seeds bench/results/autoscale.json \\
        bench/results/autoscale-quick-seed*.json --workloads azure-conv azure-code
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from run import ORDER


def policy_table(data: dict[str, object], title: str) -> str:
    """One workload's table in the docs' columns, then its static-best and oracle line."""
    rows = data["policies"]  # type: ignore[index]
    lines = [
        f"**{title}** ({data['requests']} requests)",  # type: ignore[index]
        "",
        "| policy | SLO attainment | GPU-hours | vs oracle | attainment per GPU-hour | scale events P+D | peak P/D |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in ORDER if n in rows):
        r = rows[name]
        label = f"**{name}**" if name == "pdorch" else name
        lines.append(
            f"| {label} | {r['attainment']:.2%} | {r['gpu_hours']:.2f} | {r['gpu_hours_vs_oracle']:.2f}x | "
            f"{r['attainment_per_gpu_hour']:.4f} | {r['scale_events_prefill']:.0f}+{r['scale_events_decode']:.0f} | "
            f"{r['peak_prefill']:.0f}/{r['peak_decode']:.0f} |"
        )
    o, st = rows["oracle"], rows["static-best"]
    lines += [
        "",
        f"Static best {st['prefill']:.0f}P + {st['decode']:.0f}D; oracle = window requirement "
        f"x{1 + o['eps_prefill']:.2f} (prefill), x{1 + o['eps_decode']:.2f} (decode).",
    ]
    return "\n".join(lines)


def headline(paths: list[Path], only: list[str] | None = None) -> str:
    """Every policy on every workload (or those in `only`) of the given runs, one row each, and its
    rank per GPU-hour among the non-oracle policies."""
    lines = [
        "| run | workload | policy | SLO attainment | GPU-hours | x oracle | attainment per GPU-hour | rank per GPU-hour |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        res = json.loads(path.read_text())
        run = "prefill queue" if res["setup"].get("proxy_queue") else "engine queues"
        for wl, data in res["workloads"].items():
            if only and wl not in only:
                continue
            rows = data["policies"]
            # The oracle is the bar, not a competitor: rank the others.
            ranked = _ranked(rows)
            for name in (n for n in ORDER if n in rows):
                r = rows[name]
                rank = "-" if name == "oracle" else str(ranked.index(name) + 1)
                label = f"**{name}**" if name == "pdorch" else name
                lines.append(
                    f"| {run} | {wl} | {label} | {r['attainment']:.2%} | {r['gpu_hours']:.2f} | "
                    f"{r['gpu_hours_vs_oracle']:.2f}x | {r['attainment_per_gpu_hour']:.4f} | {rank} |"
                )
    return "\n".join(lines)


def _ranked(rows: dict[str, dict[str, float]]) -> list[str]:
    """The non-oracle policies by attainment per GPU-hour, best first (the oracle is the bar)."""
    return sorted((n for n in rows if n != "oracle"), key=lambda n: -rows[n]["attainment_per_gpu_hour"])


def seeds_table(paths: list[Path], only: list[str] | None = None) -> str:
    """pdorch across the seeds of several runs: per run (engine queues or prefill queue) and
    workload, the median and range of its attainment and x oracle, its rank per GPU-hour on each
    seed, the policy most often best among the others, and on how many seeds the goal held."""
    by_cell: dict[tuple[str, str], list[tuple[int, dict[str, dict[str, float]]]]] = {}
    for path in paths:
        res = json.loads(path.read_text())
        run = "prefill queue" if res["setup"].get("proxy_queue") else "engine queues"
        for wl, data in res["workloads"].items():
            if not only or wl in only:
                by_cell.setdefault((run, wl), []).append((res["setup"]["seed"], data["policies"]))
    lines = [
        "| run | workload | seeds | pdorch attainment, median [min, max] | x oracle, median [min, max] | "
        "pdorch's rank per GPU-hour, by seed | most often best other | seeds meeting the goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (run, wl), cells in sorted(by_cell.items()):
        cells.sort()
        att = [rows["pdorch"]["attainment"] for _, rows in cells]
        xo = [rows["pdorch"]["gpu_hours_vs_oracle"] for _, rows in cells]
        ranks = [_ranked(rows).index("pdorch") + 1 for _, rows in cells]
        best_other = Counter(next(n for n in _ranked(rows) if n != "pdorch") for _, rows in cells)
        met = sum(a >= 0.99 and x <= 1.15 and r == 1 for a, x, r in zip(att, xo, ranks, strict=True))
        lines.append(
            f"| {run} | {wl} | {len(cells)} | {statistics.median(att):.2%} [{min(att):.2%}, {max(att):.2%}] | "
            f"{statistics.median(xo):.2f}x [{min(xo):.2f}, {max(xo):.2f}] | {' '.join(map(str, ranks))} | "
            f"{best_other.most_common(1)[0][0]} ({best_other.most_common(1)[0][1]}/{len(cells)}) | {met}/{len(cells)} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--headline", action="store_true", help="one table of every run's policies and ranks")
    ap.add_argument("--seeds", action="store_true", help="pdorch across the seeds of the given runs")
    ap.add_argument("--workloads", nargs="+", metavar="NAME", help="with --headline or --seeds: only these")
    args = ap.parse_args()
    if args.seeds:
        print(seeds_table(args.results, args.workloads))
        return 0
    if args.headline:
        print(headline(args.results, args.workloads))
        return 0
    for path in args.results:
        res = json.loads(path.read_text())
        half = res["setup"].get("half")
        for wl, data in res["workloads"].items():
            title = wl + (", minutes 30\u201360 only" if half == "second" else "")
            print(policy_table(data, title), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
