"""bench/soak: the pdorch proxy (vLLM NIXL mode) under steady load for a long time.

Reuses bench/proxy's pieces: the same `pdorch sim` prefill+decode process, the same `pdorch proxy`
front and the same open-loop Poisson load generator (a separate process). The rate defaults to 70% of
the max sustained rate measured for pdorch-vllm in bench/results/proxy.json. While the load runs, the
proxy's RSS and open file descriptors are sampled from /proc every few seconds; after it, once more
when idle. Nothing is asserted: the report gives first/last/max, the slope over the second half and
the requests lost (issued minus completed, plus errors).

    python bench/soak/run.py                       # 10 minutes at 70% of max (the committed run)
    python bench/soak/run.py --duration 30         # smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
PROXY_BENCH = REPO / "bench" / "proxy" / "run.py"


def _load_proxy_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_proxy_run", PROXY_BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


pb = _load_proxy_bench()


def max_sustained_rate(front: str = "pdorch-vllm") -> float:
    """The max sustained req/s of ``front`` recorded by bench/proxy."""
    data = json.loads((RESULTS / "proxy.json").read_text())
    for row in data.get("summary", []):
        if row.get("front") == front and row.get("max_sustained_rps"):
            return float(row["max_sustained_rps"])
    raise SystemExit(f"no max sustained rate for {front} in bench/results/proxy.json; pass --rate")


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_conns(*, local: int | None = None, remote: frozenset[int] = frozenset()) -> int:
    """Open loopback TCP sockets (not LISTEN/TIME_WAIT) with local port ``local`` or a remote port in
    ``remote``, from /proc/net/tcp."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            lport, rport = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
            if fields[3] not in ("0A", "06") and (lport == local or rport in remote):
                n += 1
    return n


def fd_sample(pid: int, port: int, engine_ports: frozenset[int]) -> dict[str, int]:
    """The proxy's open fds, split into client connections, pooled engine connections and the rest.

    Connection counts follow the offered concurrency (and the pools keep idle ones for a while); a
    leak shows up as growth of ``other_fds`` or of connections beyond the concurrency seen.
    """
    fds = open_fds(pid)
    client = tcp_conns(local=port)
    upstream = tcp_conns(remote=engine_ports)  # only the proxy connects to the sims here
    return {
        "fds": fds,
        "client_conns": client,
        "upstream_conns": upstream,
        "other_fds": fds - client - upstream,
    }


def proxy_counter(url: str, name: str) -> dict[str, float]:
    """Samples of a counter from the proxy's /metrics, keyed by their label text."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, val = line.rpartition(" ")
            out[key[len(name) :]] = float(val)
    return out


def slope_per_min(samples: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of ``key`` over the second half of the run, per minute."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return None
    xs = [s["t_s"] for s in half]
    ys = [s[key] for s in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def stats(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    vals = [s[key] for s in samples]
    slope = slope_per_min(samples, key)
    return {
        "first": vals[0],
        "last": vals[-1],
        "min": min(vals),
        "max": max(vals),
        "slope_per_min_2nd_half": None if slope is None else round(slope, 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    logdir = Path(tempfile.mkdtemp(prefix="pdorch-soak-"))
    stacks = pb.Stacks(logdir=logdir, time_scale=args.time_scale)
    try:
        pd, waits = stacks.spawn_vllm_pd()
        for proc, url in waits:
            pb.wait_http_ok(url, proc)
        stacks.start_front("pdorch-vllm", {"vllm": pd})
        stacks.finish_front("pdorch-vllm")
        target = stacks.targets["pdorch-vllm"]
        if target.error:
            raise SystemExit(target.error)
        pid = target.pid
        port = int(target.url.rsplit(":", 1)[1])
        engine_ports = frozenset(int(u.rsplit(":", 1)[1]) for u in pd)
        base = {"rss_mib": round(pb.tree_rss_mib(pid), 2), **fd_sample(pid, port, engine_ports)}
        cmd = [sys.executable, str(PROXY_BENCH), "loadgen", "--url", target.url, "--rate", str(args.rate)]
        cmd += ["--duration", str(args.duration), "--warmup", str(args.warmup), "--seed", "7"]
        cmd += ["--max-tokens", "16", "--request-timeout", str(args.request_timeout)]
        print(f"[soak] {args.rate} req/s for {args.duration}s against {target.url}", flush=True)
        gen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **pb.OFFLINE_ENV}
        )
        t0 = time.monotonic()
        cpu0 = pb.tree_cpu_s(pid)
        samples: list[dict[str, Any]] = []
        while gen.poll() is None:
            t = time.monotonic() - t0
            samples.append(
                {
                    "t_s": round(t, 1),
                    "rss_mib": round(pb.tree_rss_mib(pid), 2),
                    **fd_sample(pid, port, engine_ports),
                    "cpu_s": round(pb.tree_cpu_s(pid) - cpu0, 2),
                }
            )
            if len(samples) % 12 == 0:
                print(f"[soak] t={t:.0f}s {samples[-1]}", flush=True)
            try:
                gen.wait(timeout=args.sample_interval)
            except subprocess.TimeoutExpired:
                pass
        out, err = gen.communicate()
        if gen.returncode != 0:
            raise SystemExit(f"loadgen exit {gen.returncode}: {err.decode(errors='replace')[-800:]}")
        load = json.loads(out.decode().strip().splitlines()[-1])
        time.sleep(args.settle)
        after = {"rss_mib": round(pb.tree_rss_mib(pid), 2), **fd_sample(pid, port, engine_ports)}
        statuses = proxy_counter(target.url, "pdorch_proxy_requests_total")
        alive = Path(f"/proc/{pid}").exists()
    finally:
        stacks.stop_all()
    lost = load["issued"] - load["completed"]
    return {
        "front": "pdorch-vllm",
        "rate": args.rate,
        "rate_fraction_of_max": round(args.rate / args.max_rate, 3) if args.max_rate else None,
        "max_rate": args.max_rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "time_scale": args.time_scale,
        "sample_interval_s": args.sample_interval,
        "request": "non-streaming /v1/completions, ~128-token prompt, max_tokens 16, P/D (NIXL)",
        "load": load,
        "lost_requests": lost,
        "proxy_alive_after": alive,
        "proxy_requests_by_status": statuses,
        "baseline_idle": base,
        "after_idle": after,
        "rss_mib": stats(samples, "rss_mib"),
        "fds": stats(samples, "fds"),
        "other_fds": stats(samples, "other_fds"),
        "client_conns": stats(samples, "client_conns"),
        "upstream_conns": stats(samples, "upstream_conns"),
        "peak_client_inflight": load.get("peak_inflight"),
        "samples": samples,
    }


def markdown(res: dict[str, Any]) -> str:
    ld, r = res["load"], res["rss_mib"]
    b, a = res["baseline_idle"], res["after_idle"]

    def row(label: str, key: str) -> str:
        x = res[key]
        return (
            f"| {label} | {b[key]} | {x['first']} | {x['last']} | {x['max']} | "
            f"{x['slope_per_min_2nd_half']} | {a[key]} |"
        )

    lines = [
        "# bench/soak",
        "",
        f"pdorch proxy (vLLM NIXL mode, static sims at --time-scale {res['time_scale']}) at "
        f"{res['rate']} req/s = {100 * (res['rate_fraction_of_max'] or 0):.0f}% of its max sustained "
        f"{res['max_rate']} req/s (bench/results/proxy.json), {res['duration_s']:.0f} s after a "
        f"{res['warmup_s']:.0f} s warm-up; {res['request']}. Open-loop Poisson arrivals. RSS and open fds "
        f"of the proxy process sampled every {res['sample_interval_s']:.0f} s.",
        "",
        "| metric | idle before | first | last | max | slope (2nd half, per min) | idle after |",
        "|---|---|---|---|---|---|---|",
        f"| RSS MiB | {res['baseline_idle']['rss_mib']} | {r['first']} | {r['last']} | {r['max']} | "
        f"{r['slope_per_min_2nd_half']} | {res['after_idle']['rss_mib']} |",
        row("open fds (all)", "fds"),
        row("  client connections", "client_conns"),
        row("  pooled engine connections", "upstream_conns"),
        row("  other fds", "other_fds"),
        "",
        f"Connections follow concurrency: the load generator keeps up to its peak in-flight "
        f"({res['peak_client_inflight']}) connections open, and the proxy's engine pool keeps idle "
        "connections for 60 s; a leak would show as growth of 'other fds' or connections beyond that.",
        "",
        "| issued | completed | lost (issued - completed) | errors | completed req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        f"| {ld['issued']} | {ld['completed']} | {res['lost_requests']} | {ld['errors']} | "
        f"{ld['completed_rate']} | {ld['lat_p50_ms']} | {ld['lat_p99_ms']} |",
        "",
        f"Error kinds: {ld['error_kinds'] or 'none'}. Proxy alive after the run: {res['proxy_alive_after']}.",
        "",
        "Reproduce: `python bench/soak/run.py` (10 min).",
        "",
    ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    a1.plot(t, [x["rss_mib"] for x in s])
    a1.set_ylabel("proxy RSS MiB")
    a1.set_ylim(bottom=0)
    for key, label in (
        ("fds", "all fds"),
        ("client_conns", "client conns"),
        ("upstream_conns", "engine conns"),
        ("other_fds", "other fds"),
    ):
        a2.plot(t, [x[key] for x in s], label=label)
    a2.legend(fontsize=7)
    a2.set_ylabel("proxy open fds")
    a2.set_ylim(bottom=0)
    a2.set_xlabel("minutes")
    fig.suptitle(f"pdorch proxy soak at {res['rate']} req/s; lost requests: {res['lost_requests']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of measured load")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--fraction", type=float, default=0.7, help="of the max sustained rate")
    ap.add_argument("--rate", type=float, default=None, help="req/s (default: fraction x max sustained)")
    ap.add_argument("--sample-interval", type=float, default=5.0)
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds before the 'after' sample")
    ap.add_argument("--time-scale", type=float, default=0.001)
    ap.add_argument("--request-timeout", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "soak")
    args = ap.parse_args()
    args.max_rate = max_sustained_rate()
    if args.rate is None:
        args.rate = round(args.fraction * args.max_rate, 1)
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    plot(res, args.out.with_suffix(".png"))
    print(markdown(res), flush=True)


if __name__ == "__main__":
    main()
