"""What the SGLang P/D sim's rendezvous costs every full garbage collection.

Freezes the start-up heap as `pdorch sim` does, fills one `Rendezvous` with the rooms a sim keeps
at a given rate (rooms are kept `ROOM_RETENTION_S` after they end) and times `gc.collect()`.

    python bench/sim/rendezvous_gc.py            # 400 req/s -> 48k ended rooms
    python bench/sim/rendezvous_gc.py --rate 800
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time

from pdorch.sim.bootstrap import ROOM_RETENTION_S, Rendezvous


async def measure(rooms: int, reps: int) -> tuple[int, float]:
    """(objects the collector tracks, median full-collection seconds) with `rooms` ended rooms kept."""
    rv = Rendezvous()
    # As `pdorch sim` does once started (pdorch.lifecycle.freeze_startup_heap): what the process
    # imported is frozen, so a full collection scans what serving created.
    gc.collect()
    gc.freeze()
    for i in range(rooms):
        key = ("127.0.0.1", 8998, i)
        rv.register_prefill(key)
        rv.register_decode(key)
        rv.finish(key)
    gc.collect()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    return len(gc.get_objects()), statistics.median(times)  # get_objects() skips the frozen heap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=400.0, help="requests per second the sim serves")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rooms = int(args.rate * ROOM_RETENTION_S)
    tracked, median = asyncio.run(measure(rooms, args.reps))
    print(f"{rooms} ended rooms: {tracked} tracked objects, full gc median {median * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
