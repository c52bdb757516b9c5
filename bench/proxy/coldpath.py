"""bench/proxy/coldpath: what the proxy's per-request steps cost hot and after an idle gap.

At the bench's half-load rates a request reaches the proxy every 10-20 ms, and in between the sims
and the load generator run. On this 2-core VM, code that ran 20 ms ago runs many times slower than
code in a tight loop: its instructions and data are no longer in the CPU caches. The per-request
cost that counts for added latency is therefore the *cold* one, and it ranks the steps differently
than a hot microbenchmark does (a system call or a large pure-Python routine suffers most).

Each step runs `--samples` times after a busy-wait of `--gap-ms` (the caches decay while this process
itself keeps the CPU, so no sleep or wake-up is measured), and once more in a tight loop; the table
gives the medians in microseconds and their ratio. Steps come in pairs where the proxy changed one
for the other.

    python bench/proxy/coldpath.py            # writes bench/results/proxy-coldpath.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from pdorch.proxy.protocols import RoomMinter, sglang_body
from pdorch.proxy.request_ids import RequestIds
from pdorch.proxy.validation import decode_json, validate

REPO = Path(__file__).resolve().parents[2]
BODY = json.dumps({"model": "sim-model", "prompt": "word " * 128, "max_tokens": 16, "stream": True}).encode()


def steps() -> dict[str, tuple[str, Callable[[], Any]]]:
    """name -> (what it is in the proxy, the call)."""
    parsed = json.loads(BODY)
    ids, rooms = RequestIds(), RoomMinter()
    encoder = msgspec.json.Encoder()
    return {
        "noop": ("the measurement itself", lambda: None),
        "json.loads": ("request body decode, before", lambda: json.loads(BODY)),
        "decode_json": ("request body decode, now (msgspec, stdlib fallback)", lambda: decode_json(BODY)),
        "uuid4().hex": ("request id, before", lambda: uuid.uuid4().hex),
        "RequestIds.next": ("request id, now", ids.next),
        "validate": ("request checks", lambda: validate(parsed, "completion", None)),
        "sglang_body+encode": (
            "SGLang leg body",
            lambda: encoder.encode(sglang_body(parsed, "127.0.0.1", 8998, rooms.mint())),
        ),
    }


def measure(call: Callable[[], Any], gap_s: float, samples: int) -> float:
    """Median microseconds of `call` after a busy-wait of `gap_s` (0: back to back)."""
    out = []
    clock = time.perf_counter
    for _ in range(samples):
        until = clock() + gap_s
        while clock() < until:
            pass
        t = clock()
        call()
        out.append(clock() - t)
    return statistics.median(out) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gap-ms", type=float, default=20.0, help="busy-wait before each cold sample")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    rows = []
    for name, (what, call) in steps().items():
        for _ in range(1000):  # imports, first-call setup
            call()
        hot = measure(call, 0.0, args.samples * 10)
        cold = measure(call, args.gap_ms / 1000, args.samples)
        rows.append({"step": name, "what": what, "hot_us": round(hot, 2), "cold_us": round(cold, 1)})
        print(f"{name:20s} hot {hot:7.2f} us   cold {cold:7.1f} us", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"gap_ms": args.gap_ms, "samples": args.samples, "rows": rows}
    (out / "proxy-coldpath.json").write_text(json.dumps(doc, indent=2))
    lines = [
        "# bench/proxy/coldpath",
        "",
        f"Median microseconds per call, back to back (hot) and after a {args.gap_ms:g} ms busy-wait "
        f"(cold), {args.samples} cold samples each (`python bench/proxy/coldpath.py`).",
        "",
        "| step | in the proxy | hot us | cold us | cold / hot |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["cold_us"] / r["hot_us"] if r["hot_us"] else float("nan")
        lines.append(f"| {r['step']} | {r['what']} | {r['hot_us']} | {r['cold_us']} | {ratio:.0f}x |")
    (out / "proxy-coldpath.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'proxy-coldpath.md'}")


if __name__ == "__main__":
    main()
