"""bench/proxy/medians: per-front medians over several full `bench/proxy/run.py` runs.

One run of the proxy bench on a 2-core machine moves by a few tenths of a millisecond at p50
between runs; this folds the summaries of several runs (each a complete side-by-side run of every
front) into one table of medians, listing each run's value too.

    python bench/proxy/medians.py bench/results/proxy.json bench/results/proxy-run-c.json ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = (
    ("max_sustained_rps", "max req/s (p99 added <= 10 ms)"),
    ("half_load_rps", "half load req/s"),
    ("added_vs_pd_ttft_p50_ms", "added TTFT p50 ms vs P/D-direct"),
    ("added_vs_pd_ttft_p99_ms", "added TTFT p99 ms vs P/D-direct"),
    ("cpu_s_per_1k_req_max", "CPU s / 1k req, non-stream @ max"),
    ("cpu_s_per_1k_req_stream", "CPU s / 1k req, stream @ half"),
)


def fmt(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    each = " / ".join("-" if v is None else f"{v:g}" for v in values)
    return f"**{statistics.median(got):g}** ({each})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="write the table here too (.md)")
    args = ap.parse_args()
    runs = [json.loads(p.read_text())["summary"] for p in args.runs]
    fronts = [row["front"] for row in runs[0]]
    lines = [
        f"Medians over {len(runs)} full runs (each run's value in brackets, in the order "
        + ", ".join(p.name for p in args.runs)
        + ").",
        "",
        "| front | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for front in fronts:
        rows = [next((r for r in run if r["front"] == front), {}) for run in runs]
        cells = [fmt([r.get(key) for r in rows]) for key, _ in COLUMNS]
        lines.append(f"| {front} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
