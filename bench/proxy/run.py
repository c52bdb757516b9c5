"""bench/proxy: overhead of the pdorch proxy vs vllm-router and sglang-router in front of the same sims.

Everything runs on 127.0.0.1 in one invocation. Engines are `pdorch sim` subprocesses with a tiny
`--time-scale`, so their modelled latency is ~0 and what remains is HTTP/event-loop cost:

- vLLM: one sim process serving a prefill and a decode port (the NIXL lease registry is in-process);
- SGLang: the same, one sim process with a prefill port (and its bootstrap server) and a decode port, so
  both protocols load the machine with the same processes (``--sglang-sims two-process`` puts the
  prefill and the decode in two processes that meet over the bootstrap server's WebSocket);
- baselines ("direct"): one sim process per protocol with role ``both``, which answers a request alone.

Fronts: ``pdorch-vllm`` (pdorch proxy, NIXL), ``vllm-router`` (NIXL), ``pdorch-sglang`` (pdorch proxy,
bootstrap), ``sglang-router``. The load generator is a separate process (this script, ``loadgen``
subcommand) so it shares no event loop with sims or fronts. For each offered rate of a doubling ladder
(open-loop Poisson arrivals, same seed for every front at a rate), the matching direct baseline and every
front still in the race run one step each; "added" latency at a percentile is the front's percentile minus
the direct baseline's percentile at that same rate and seed. A front drops out at its first step with
p99 added > 10 ms, > 1% errors, or < 95% of the offered rate completed. At half its max sustained rate,
streaming steps measure added TTFT and chunks/s: in each step (`--half-reps` of them) the front and its two
baselines (one engine; the client doing the P/D handshake itself) take turns in blocks of
`--block-seconds`, so the machine's drift over the step hits all three alike and cancels in their
differences. CPU and RSS come from /proc for the front's process tree.

    python bench/proxy/run.py                  # full run (the lead runs this)
    python bench/proxy/run.py --quick          # smoke run, < 1 min
    python bench/proxy/run.py --fronts pdorch-vllm,vllm-router
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdorch.devcluster.process import free_port
from pdorch.devcluster.waiting import wait_http_ok as shared_wait_http_ok
from pdorch.lifecycle import EVENT_LOOPS, freeze_startup_heap, loop_factory
from pdorch.proxy.protocols import RoomMinter, sglang_body, vllm_decode_body, vllm_prefill_body

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
MODEL = "sim-model"
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Routers must never reach a model hub: any hub lookup goes to a closed loopback port.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_PROXY": "*", "no_proxy": "*"}
FRONTS = ("pdorch-vllm", "vllm-router", "pdorch-sglang", "sglang-router")
FRONT_PROTOCOL = {
    "pdorch-vllm": "vllm",
    "vllm-router": "vllm",
    "pdorch-sglang": "sglang",
    "sglang-router": "sglang",
}
RUST = ("vllm-router", "sglang-router")
ADDED_P99_LIMIT_MS = 10.0
MAX_ERROR_FRACTION = 0.01
MIN_COMPLETED_FRACTION = 0.95
STARTUP_S = 40.0


# --------------------------------------------------------------------------------------------------
# /proc accounting


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux exposes them per thread under /proc/<pid>/task/*/children)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out.extend(int(x) for x in (task / "children").read_text().split())
            except OSError:
                continue
    except OSError:
        pass
    return out


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def tree_cpu_s(pid: int) -> float:
    """utime+stime of the tree, plus the reaped children's time charged to each live member."""
    total = 0
    for p in proc_tree(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK


def tree_rss_mib(pid: int) -> float:
    """Resident set size of the tree (sum of members' RSS; shared pages are counted per process)."""
    total = 0
    for p in proc_tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total / (1024 * 1024)


# --------------------------------------------------------------------------------------------------
# subprocesses


@dataclass
class Proc:
    """A subprocess in its own process group, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def log_counts(path: Path) -> dict[str, int]:
    """How often a log mentions errors, tracebacks or HTTP/2 prefaces (sglang-router probes h2)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    keys = ("ERROR", "WARN", "Traceback", "PRI/Upgrade")
    return {k: text.count(k) for k in keys} | {"lines": text.count("\n")}


def spawn(name: str, cmd: list[str], logdir: Path) -> Proc:
    """Start ``cmd`` in a new session (so its whole group can be killed) with output to a log."""
    log = logdir / f"{name}.log"
    with log.open("wb") as fh:
        popen = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **OFFLINE_ENV},
            start_new_session=True,
        )
    return Proc(name, popen, log)


def stop(proc: Proc) -> None:
    """SIGTERM the group, SIGKILL it if it lingers; bounded."""
    if proc.popen.poll() is None:
        try:
            os.killpg(proc.popen.pid, signal.SIGTERM)
            proc.popen.wait(timeout=8)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
    # Children (e.g. a launcher's worker) may outlive a leader that exited: kill the group regardless.
    try:
        os.killpg(proc.popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def wait_http_ok(url: str, proc: Proc, timeout: float = STARTUP_S) -> None:
    """Block until GET ``url`` answers 200; raise if ``proc`` exits or after ``timeout``."""

    def died() -> str | None:
        code = proc.popen.poll()
        return None if code is None else f"{proc.name} exited {code}:\n{proc.tail()}"

    shared_wait_http_ok(url, timeout, died)


def router_bin(name: str) -> str:
    """The real router executable next to this interpreter (not a pyenv shim, whose pid would differ)."""
    p = BIN / name
    if not p.exists():
        raise RuntimeError(f"{name} not installed next to {sys.executable}: pip install -e '.[dev]'")
    return str(p)


def prompt_text(i: int, target_tokens: int = 128) -> str:
    """A prompt of ~``target_tokens`` sim tokens, unique per request so no front can cache answers."""
    # " lorem" is two sim tokens (pieces of <= 4 chars) and "req<i>" one or two: pad with the filler.
    head = f"req{i}"
    return head + " lorem" * max(0, (target_tokens - 2) // 2)


def sanity_request(base: str, timeout: float = 10.0) -> None:
    """One non-streaming completion through ``base``; raises with the server's answer on failure."""
    body = json.dumps({"model": MODEL, "prompt": prompt_text(0), "max_tokens": 4}).encode()
    req = urllib.request.Request(
        base + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"sanity request: HTTP {exc.code}: {exc.read()[:300]!r}") from exc
    if not data.get("choices"):
        raise RuntimeError(f"sanity request: no choices in {str(data)[:300]}")


@dataclass
class Target:
    """Something the load generator can hit, with the pid whose tree we account."""

    name: str
    protocol: str
    url: str
    pid: int | None
    error: str | None = None
    # Sim processes behind this target: their CPU shows extra per-request calls a front makes
    # (vllm-router's /tokenize and /render on both workers).
    engine_pids: list[int] = field(default_factory=list)
    # P/D-direct baselines: the load generator does the handshake (decode URL, protocol, bootstrap port).
    pd_decode: str | None = None
    pd_protocol: str = "vllm"
    pd_bootstrap_port: int | None = None

    def loadgen_args(self) -> list[str]:
        """The load generator's flags for this target alone."""
        args = ["--url", self.url]
        if self.pd_decode:
            args += ["--pd-decode", self.pd_decode, "--pd-protocol", self.pd_protocol]
            if self.pd_bootstrap_port is not None:
                args += ["--pd-bootstrap-port", str(self.pd_bootstrap_port)]
        return args

    def loadgen_spec(self) -> dict[str, Any]:
        """This target as one entry of the load generator's ``--targets``."""
        return {
            "name": self.name,
            "url": self.url,
            "pd_decode": self.pd_decode,
            "pd_protocol": self.pd_protocol,
            "pd_bootstrap_port": self.pd_bootstrap_port,
        }


@dataclass
class Stacks:
    """All processes of the run; `targets` maps front/baseline name -> Target."""

    logdir: Path
    time_scale: float
    # The Rust routers log two INFO lines per request by default; pdorch's proxy logs none per request.
    quiet_routers: bool = True
    # Event loop of the sims and the load generator (the same for every front).
    event_loop: str = "uvloop"
    # "one-process" (as the vLLM sims) or "two-process" (the decode reaches the prefill's bootstrap server).
    sglang_sims: str = "one-process"
    # Extra `pdorch proxy` flags for the pdorch fronts (e.g. an A/B of a proxy setting).
    pdorch_args: tuple[str, ...] = ()
    procs: list[Proc] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    _pending: dict[str, tuple[Proc, str]] = field(default_factory=dict)
    engine_pids: dict[str, list[int]] = field(default_factory=dict)

    def _sim(self, name: str, protocol: str, extra: list[str]) -> Proc:
        cmd = [sys.executable, "-m", "pdorch.cli", "sim", "--host", HOST, "--model", MODEL]
        cmd += ["--protocol", protocol, "--time-scale", str(self.time_scale), "--event-loop", self.event_loop]
        cmd += extra
        proc = spawn(name, cmd, self.logdir)
        self.procs.append(proc)
        return proc

    def spawn_baseline(self, protocol: str) -> list[tuple[Proc, str]]:
        """Start a role-``both`` sim; returns (process, health URL) pairs to wait for."""
        port = free_port()
        extra = ["--role", "both", "--port", str(port)]
        if protocol == "sglang":
            extra += ["--bootstrap-port", str(free_port())]
        proc = self._sim(f"sim-{protocol}-both", protocol, extra)
        url = f"http://{HOST}:{port}"
        pid = proc.popen.pid
        self.targets[f"direct-{protocol}"] = Target(
            f"direct-{protocol}", protocol, url, pid, engine_pids=[pid]
        )
        return [(proc, url + "/health")]

    def spawn_vllm_pd(self) -> tuple[tuple[str, str], list[tuple[Proc, str]]]:
        """One sim process with a prefill and a decode port (NIXL leases are looked up in-process)."""
        p, d = free_port(), free_port()
        roles = self.logdir / "vllm-roles.json"
        roles.write_text(json.dumps({f"{HOST}:{p}": "prefill", f"{HOST}:{d}": "decode"}))
        proc = self._sim(
            "sim-vllm-pd", "vllm", ["--port", str(p), "--port", str(d), "--role-map", str(roles)]
        )
        pu, du = f"http://{HOST}:{p}", f"http://{HOST}:{d}"
        self.engine_pids["vllm"] = [proc.popen.pid]
        self.targets["pd-direct-vllm"] = Target(
            "pd-direct-vllm",
            "vllm",
            pu,
            None,
            engine_pids=[proc.popen.pid],
            pd_decode=du,
            pd_protocol="vllm",
        )
        return (pu, du), [(proc, pu + "/health"), (proc, du + "/health")]

    def spawn_sglang_pd(self) -> tuple[tuple[str, int, str], list[tuple[Proc, str]]]:
        """SGLang prefill and decode sims: one process with two ports, or two processes (`sglang_sims`)."""
        p, d, boot = free_port(), free_port(), free_port()
        timeouts = ["--bootstrap-timeout", "20", "--waiting-timeout", "20"]
        common = [*timeouts, "--bootstrap-port", str(boot)]  # the decode-only process serves no bootstrap
        if self.sglang_sims == "one-process":
            roles = self.logdir / "sglang-roles.json"
            roles.write_text(json.dumps({f"{HOST}:{p}": "prefill", f"{HOST}:{d}": "decode"}))
            pre = dec = self._sim(
                "sim-sglang-pd",
                "sglang",
                [*common, "--port", str(p), "--port", str(d), "--role-map", str(roles)],
            )
        else:
            pre = self._sim("sim-sglang-prefill", "sglang", [*common, "--role", "prefill", "--port", str(p)])
            dec = self._sim("sim-sglang-decode", "sglang", [*timeouts, "--role", "decode", "--port", str(d)])
        pu, du = f"http://{HOST}:{p}", f"http://{HOST}:{d}"
        pids = sorted({pre.popen.pid, dec.popen.pid})
        self.engine_pids["sglang"] = pids
        self.targets["pd-direct-sglang"] = Target(
            "pd-direct-sglang",
            "sglang",
            pu,
            None,
            engine_pids=pids,
            pd_decode=du,
            pd_protocol="sglang",
            pd_bootstrap_port=boot,
        )
        waits = [(pre, pu + "/health"), (pre, f"http://{HOST}:{boot}/health"), (dec, du + "/health")]
        return (pu, boot, du), waits

    def start_front(self, name: str, pd: dict[str, Any]) -> None:
        """Spawn one front (see `finish_front`); on failure record the error instead of raising."""
        protocol = FRONT_PROTOCOL[name]
        port, prom = free_port(), free_port()
        url = f"http://{HOST}:{port}"
        health = "/health"
        if name == "pdorch-vllm":
            p, d = pd["vllm"]
            cmd = [
                sys.executable,
                "-m",
                "pdorch.cli",
                "proxy",
                "--engine",
                "vllm",
                "--prefill",
                p,
                "--decode",
                d,
            ]
            cmd += ["--host", HOST, "--port", str(port), "--metrics-port", "0", *self.pdorch_args]
        elif name == "pdorch-sglang":
            p, boot, d = pd["sglang"]
            cmd = [sys.executable, "-m", "pdorch.cli", "proxy", "--engine", "sglang"]
            cmd += ["--prefill", f"{p}#{boot}", "--decode", d, "--host", HOST, "--port", str(port)]
            cmd += ["--metrics-port", "0", *self.pdorch_args]
        elif name == "vllm-router":
            p, d = pd["vllm"]
            cmd = [router_bin("vllm-router"), "--host", HOST, "--port", str(port), "--vllm-pd-disaggregation"]
            cmd += ["--kv-connector", "nixl", "--prefill", p, "--decode", d, "--prometheus-port", str(prom)]
            cmd += ["--worker-startup-timeout-secs", "10"]
            if self.quiet_routers:
                cmd += ["--log-level", "warning"]
        else:
            p, boot, d = pd["sglang"]
            cmd = [router_bin("sglang-router"), "launch", "--host", HOST, "--port", str(port)]
            cmd += ["--prometheus-port", str(prom), "--pd-disaggregation", "--prefill", p, str(boot)]
            cmd += ["--decode", d, "--worker-startup-timeout-secs", "10"]
            if self.quiet_routers:
                cmd += ["--log-level", "warn"]
            health = "/readiness"  # 200 once a prefill and a decode are registered and healthy
        target = Target(name, protocol, url, None, engine_pids=list(self.engine_pids[protocol]))
        self.targets[name] = target
        try:
            proc = spawn(name, cmd, self.logdir)
            self.procs.append(proc)
            target.pid = proc.popen.pid
            self._pending[name] = (proc, url + health)
        except Exception as exc:  # recorded in the results, the other fronts still run
            target.error = f"startup failed: {exc}"

    def rename_front(self, old: str, new: str) -> None:
        """File a started front under another name (to start several builds of one front)."""
        self.targets[new] = self.targets.pop(old)
        self.targets[new].name = new
        if old in self._pending:
            self._pending[new] = self._pending.pop(old)

    def finish_front(self, name: str) -> None:
        """Wait for a started front to be ready and answer one request; record any failure."""
        target = self.targets[name]
        try:
            if target.error is None:
                proc, health = self._pending.pop(name)
                wait_http_ok(health, proc)
                sanity_request(target.url)
        except Exception as exc:
            target.error = f"startup failed: {exc}"
        if target.error:
            print(f"[bench] {name}: {target.error[:500]}", flush=True)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


# --------------------------------------------------------------------------------------------------
# load generator (runs in its own process)


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class _Tally:
    """One load-generator target's samples."""

    issued: int = 0
    done: int = 0
    chunks: int = 0
    lat_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def err(self, kind: str) -> None:
        self.errors[kind[:160]] = self.errors.get(kind[:160], 0) + 1

    def summary(self, window: float) -> dict[str, Any]:
        lat = self.lat_ms
        return {
            "issued": self.issued,
            "completed": self.done,
            "completed_rate": round(self.done / window, 2),
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
            "lat_p50_ms": _r(pct(lat, 0.5)),
            "lat_p90_ms": _r(pct(lat, 0.9)),
            "lat_p99_ms": _r(pct(lat, 0.99)),
            "lat_mean_ms": _r(statistics.fmean(lat) if lat else None),
            "ttft_p50_ms": _r(pct(self.ttft_ms, 0.5)),
            "ttft_p99_ms": _r(pct(self.ttft_ms, 0.99)),
            "chunks": self.chunks,
            "chunks_per_s": round(self.chunks / window, 1),
        }


def block_schedule(n_targets: int, seed: int) -> Callable[[int], int]:
    """Target of block k when `n_targets` share a step in turns: every cycle of n blocks visits each
    target once, in a seeded random order (so no target always follows the same one)."""
    rng = random.Random(seed)
    orders: list[list[int]] = []

    def target(k: int) -> int:
        cycle, pos = divmod(k, n_targets)
        while len(orders) <= cycle:
            order = list(range(n_targets))
            rng.shuffle(order)
            orders.append(order)
        return orders[cycle][pos]

    return target


async def _loadgen(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(args.seed)
    prompts = [prompt_text(i) for i in range(256)]
    path = "/v1/completions"
    # Interleaved targets take turns in blocks of --block-seconds, so each sees the machine in the same
    # state over the step (its drift cancels in their differences); one target is the plain case.
    targets = [argparse.Namespace(**t) for t in json.loads(args.targets)] if args.targets else [args]
    turn = block_schedule(len(targets), args.seed)
    tallies = [_Tally() for _ in targets]
    lag_ms: list[float] = []
    inflight = 0
    peak_inflight = 0
    t0 = time.perf_counter() + 0.05
    warm_end = t0 + args.warmup
    end = warm_end + args.duration

    async def one(i: int, tgt: argparse.Namespace, tally: _Tally, record: bool) -> None:
        nonlocal inflight
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": args.max_tokens,
        }
        if args.stream:
            body["stream"] = True
        start = time.perf_counter()
        n_chunks = 0
        first: float | None = None
        url, prefill_leg = tgt.url, None
        try:
            if tgt.pd_decode:
                # P/D-direct baseline: this client does the handshake a front would do, so a front's
                # latency above this is the front's own cost, not the second engine hop.
                url, body, prefill_leg = await pd_handshake(session, tgt, body, minter)
                if url is None:
                    if record:
                        tally.err(f"prefill leg: {prefill_leg}")
                    return
            async with session.post(url + path, json=body) as r:
                if r.status != 200:
                    text = (await r.read())[:120].decode(errors="replace")
                    if record:
                        tally.err(f"HTTP {r.status}: {text}")
                    return
                if args.stream:
                    async for line in r.content:
                        if line.startswith(b"data:"):
                            if first is None:
                                first = time.perf_counter()
                            if line.strip() != b"data: [DONE]":
                                n_chunks += 1
                else:
                    data = await r.read()
                    if b'"choices"' not in data:
                        if record:
                            tally.err(f"no choices: {data[:100]!r}")
                        return
            stop_t = time.perf_counter()
            if isinstance(prefill_leg, asyncio.Task) and (status := await prefill_leg) != 200:
                if record:
                    tally.err(f"prefill leg: HTTP {status}")
                return
        except Exception as exc:
            if record:
                tally.err(type(exc).__name__ + ": " + str(exc)[:100])
            return
        finally:
            inflight -= 1
        if record:
            tally.done += 1
            tally.lat_ms.append(1000 * (stop_t - start))
            if args.stream:
                if first is None or n_chunks == 0:
                    tally.err("stream without chunks")
                else:
                    tally.ttft_ms.append(1000 * (first - start))
                    tally.chunks += n_chunks

    # Random start: seeded starts of successive steps (seed, seed + 1, ...) would overlap, and a sim
    # refuses a room it has seen (rooms need not be reproducible; arrivals are).
    minter = RoomMinter()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    conn = aiohttp.TCPConnector(limit=args.max_inflight, limit_per_host=args.max_inflight)
    # Only the requests in flight: done tasks are dropped at once, so the heap a full garbage collection
    # scans stays small (keeping a step's ~20k finished tasks cost 50 ms pauses at 400 req/s).
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        freeze_startup_heap()
        t = t0
        i = 0
        while True:
            # Open loop: arrivals follow the seeded Poisson schedule whatever the answers do.
            t += rng.expovariate(args.rate)
            if t >= end:
                break
            k = turn(int((t - t0) / args.block_seconds)) if len(targets) > 1 else 0
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            record = t >= warm_end
            if record:
                lag_ms.append(1000 * max(0.0, time.perf_counter() - t))
                tallies[k].issued += 1
            if inflight >= args.max_inflight:
                if record:
                    tallies[k].err("client in-flight cap reached (request not sent)")
                continue
            inflight += 1
            peak_inflight = max(peak_inflight, inflight)
            task = asyncio.create_task(one(i, targets[k], tallies[k], record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        window = end - warm_end
        if tasks:
            await asyncio.wait(tasks, timeout=args.request_timeout + 5)
        for task in list(tasks):
            task.cancel()
    common = {
        "offered_rate": args.rate,
        "stream": args.stream,
        "duration_s": args.duration,
        "peak_inflight": peak_inflight,
        "gen_lag_p50_ms": _r(pct(lag_ms, 0.5)),
        "gen_lag_p99_ms": _r(pct(lag_ms, 0.99)),
    }
    if not args.targets:
        return common | tallies[0].summary(window)
    # Each target ran in 1/n of the window: its rates are per second of its own turns.
    share = window / len(targets)
    return common | {
        "block_seconds": args.block_seconds,
        "targets": {tgt.name: tl.summary(share) for tgt, tl in zip(targets, tallies, strict=True)},
    }


async def pd_handshake(
    session: Any, tgt: argparse.Namespace, body: dict[str, Any], minter: RoomMinter
) -> tuple[str | None, dict[str, Any], Any]:
    """Do a P/D front's first half from the client: returns (decode URL, decode body, prefill leg).

    vLLM: the prefill call completes first and its ``kv_transfer_params`` go into the decode body.
    SGLang: both legs carry the same bootstrap fields and run concurrently; the prefill leg is returned
    as a task (its status is checked after the decode answer). On a failed vLLM prefill the URL is None
    and the third item says why.
    """
    path = "/v1/completions"
    if tgt.pd_protocol == "vllm":
        async with session.post(tgt.url + path, json=vllm_prefill_body(body)) as r:
            if r.status != 200:
                return None, body, f"HTTP {r.status}"
            kv = (await r.json()).get("kv_transfer_params")
        return tgt.pd_decode, vllm_decode_body(body, kv), None
    both = sglang_body(body, HOST, tgt.pd_bootstrap_port, minter.mint())

    async def prefill() -> int:
        async with session.post(tgt.url + path, json=both) as r:
            await r.read()
            return r.status

    return tgt.pd_decode, both, asyncio.create_task(prefill())


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def loadgen_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="run.py loadgen")
    ap.add_argument("--url", default=None, help="the target (or --targets)")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-inflight", type=int, default=2048)
    ap.add_argument("--request-timeout", type=float, default=10.0)
    ap.add_argument("--pd-decode", default=None, help="P/D-direct: --url is the prefill, this the decode")
    ap.add_argument("--pd-protocol", choices=["vllm", "sglang"], default="vllm")
    ap.add_argument("--pd-bootstrap-port", type=int, default=None)
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default="uvloop")
    ap.add_argument(
        "--targets",
        default=None,
        help="JSON list of {name, url, pd_decode, pd_protocol, pd_bootstrap_port} taking turns in blocks",
    )
    ap.add_argument("--block-seconds", type=float, default=0.5, help="length of one target's turn")
    args = ap.parse_args(argv)
    if bool(args.url) == bool(args.targets):
        ap.error("give either --url or --targets")
    urls = [args.url, args.pd_decode]
    for t in json.loads(args.targets) if args.targets else []:
        urls += [t["url"], t.get("pd_decode")]
    if any(u and not u.startswith(f"http://{HOST}:") for u in urls):
        raise SystemExit("loadgen only talks to 127.0.0.1")
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        print(json.dumps(runner.run(_loadgen(args))), flush=True)


# --------------------------------------------------------------------------------------------------
# orchestration


def run_step(
    target: Target, rate: float, stream: bool, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """One load-generator process against ``target``; adds the front's CPU/RSS deltas."""
    return run_turns([target], rate, stream, args, seed)[target.name]


def _alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


def run_turns(
    targets: list[Target], rate: float, stream: bool, args: argparse.Namespace, seed: int
) -> dict[str, dict[str, Any]]:
    """One load-generator process; several targets take turns in blocks of ``args.block_seconds``
    (the same arrival schedule, each block at ``rate``). Returns each target's figures, with the CPU
    and RSS deltas of fronts; the engines' CPU is per request of the whole step (they are shared)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "loadgen", "--rate", str(rate)]
    if len(targets) == 1:
        cmd += targets[0].loadgen_args()
    else:
        cmd += ["--targets", json.dumps([t.loadgen_spec() for t in targets])]
        cmd += ["--block-seconds", str(args.block_seconds)]
    cmd += ["--duration", str(args.step_seconds), "--warmup", str(args.warmup), "--seed", str(seed)]
    cmd += ["--max-tokens", "16", "--request-timeout", str(args.request_timeout)]
    cmd += ["--event-loop", args.engine_loop]
    if stream:
        cmd.append("--stream")
    cpu0 = {t.name: tree_cpu_s(t.pid) for t in targets if t.pid is not None and _alive(t.pid)}
    engines = sorted({p for t in targets for p in t.engine_pids})
    eng0 = sum(tree_cpu_s(p) for p in engines)
    bound = args.warmup + args.step_seconds + args.request_timeout + 30
    out: dict[str, dict[str, Any]] = {}
    try:
        cp = subprocess.run(cmd, capture_output=True, timeout=bound, env={**os.environ, **OFFLINE_ENV})
        if cp.returncode != 0:
            raise RuntimeError(f"loadgen exit {cp.returncode}: {cp.stderr.decode(errors='replace')[-800:]}")
        got: dict[str, Any] = json.loads(cp.stdout.decode().strip().splitlines()[-1])
        if len(targets) == 1:
            out[targets[0].name] = got
        else:
            per = got.pop("targets")
            out = {t.name: got | per[t.name] for t in targets}
    except (subprocess.TimeoutExpired, RuntimeError, ValueError, IndexError, KeyError) as exc:
        failed = {"offered_rate": rate, "stream": stream, "loadgen_error": str(exc)[:1000], "errors": -1}
        out = {t.name: dict(failed) for t in targets}
    eng_cpu = sum(tree_cpu_s(p) for p in engines) - eng0
    # Per 1000 requests issued in the whole step (warm-up included: it used the CPU too).
    scale = 1 + args.warmup / args.step_seconds
    step_req = sum(r.get("issued") or 0 for r in out.values()) * scale
    for t in targets:
        res = out[t.name]
        res["target"] = t.name
        res["engines_cpu_s"] = round(eng_cpu, 3)
        res["engines_cpu_s_per_1k_req"] = round(1000 * eng_cpu / step_req, 3) if step_req else None
        # A late load generator (CPU-starved) offers burstier traffic than asked: flag it.
        res["gen_lagging"] = (res.get("gen_lag_p99_ms") or 0.0) > 5.0
        if t.name in cpu0 and _alive(t.pid):
            assert t.pid is not None
            cpu = tree_cpu_s(t.pid) - cpu0[t.name]
            res["front_cpu_s"] = round(cpu, 3)
            total_req = (res.get("issued") or 0) * scale
            res["cpu_s_per_1k_req"] = round(1000 * cpu / total_req, 3) if total_req else None
            res["front_rss_mib"] = round(tree_rss_mib(t.pid), 1)
            res["front_processes"] = len(proc_tree(t.pid))
        elif t.pid is not None:
            res["front_dead"] = True
    return out


def judge(front: dict[str, Any], base: dict[str, Any]) -> tuple[bool, str]:
    """Pass/fail of a front step against the direct baseline at the same rate."""
    if front.get("loadgen_error"):
        return False, "load generator failed"
    if front.get("front_dead"):
        return False, "front process died"
    issued = front.get("issued") or 0
    if issued and front["errors"] / issued > MAX_ERROR_FRACTION:
        return False, f"errors {front['errors']}/{issued}"
    if issued and front["completed"] < MIN_COMPLETED_FRACTION * issued:
        return False, f"completed {front['completed']}/{issued}"
    added = front.get("added_p99_ms")
    if added is None:
        return False, "no latency samples"
    if added > ADDED_P99_LIMIT_MS:
        return False, f"p99 added {added:.2f} ms > {ADDED_P99_LIMIT_MS} ms"
    return True, "ok"


def add_deltas(front: dict[str, Any], base: dict[str, Any], prefix: str = "added_") -> None:
    """Added latency/TTFT = front percentile minus baseline percentile (same rate, same arrival seed)."""
    for k in ("lat_p50_ms", "lat_p90_ms", "lat_p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
        if front.get(k) is not None and base.get(k) is not None:
            front[prefix + k.removeprefix("lat_")] = round(front[k] - base[k], 3)


def median_step(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median of repeated steps' numbers (errors are summed); `reps` keeps every step's
    added TTFT p50 vs P/D-direct so the spread is on record."""
    out: dict[str, Any] = {"reps": len(reps)}
    keys = {k for r in reps for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for k in sorted(keys):
        vals = [r[k] for r in reps if isinstance(r.get(k), int | float)]
        out[k] = sum(vals) if k == "errors" else _r(statistics.median(vals))
    out["added_vs_pd_ttft_p50_ms_reps"] = [r.get("added_vs_pd_ttft_p50_ms") for r in reps]
    return out


def baseline_ok(base: dict[str, Any]) -> bool:
    issued = base.get("issued") or 0
    return bool(
        not base.get("loadgen_error")
        and issued
        and base["errors"] / issued <= MAX_ERROR_FRACTION
        and base["completed"] >= MIN_COMPLETED_FRACTION * issued
    )


def run_bench(args: argparse.Namespace, stacks: Stacks, fronts: list[str]) -> dict[str, Any]:
    protocols = sorted({FRONT_PROTOCOL[f] for f in fronts})
    steps: list[dict[str, Any]] = []
    alive = [f for f in fronts if stacks.targets[f].error is None]
    status: dict[str, dict[str, Any]] = {f: {"max_sustained_rps": 0.0, "stop_reason": None} for f in fronts}
    for f in fronts:
        if stacks.targets[f].error:
            status[f]["stop_reason"] = stacks.targets[f].error
    baseline_limit: dict[str, float | None] = {p: None for p in protocols}
    for idx, rate in enumerate(args.rates):
        seed = 1000 + idx
        for proto in protocols:
            if not any(FRONT_PROTOCOL[f] == proto for f in alive) or baseline_limit[proto] is not None:
                continue
            print(f"[bench] rate {rate:g}/s direct-{proto} ...", flush=True)
            base = run_step(stacks.targets[f"direct-{proto}"], rate, False, args, seed)
            base["phase"] = "ladder"
            steps.append(base)
            print(
                f"[bench]   p50 {base.get('lat_p50_ms')} p99 {base.get('lat_p99_ms')} ms, "
                f"errors {base.get('errors')}, lag p99 {base.get('gen_lag_p99_ms')} ms",
                flush=True,
            )
            if not baseline_ok(base):
                # The engines or the load generator cannot take this rate even without a front: the ladder
                # ends here for this protocol and its fronts' results are lower bounds.
                baseline_limit[proto] = rate
                for f in alive:
                    if FRONT_PROTOCOL[f] == proto:
                        status[f]["stop_reason"] = (
                            f"direct baseline saturated at {rate:g}/s (result is a lower bound)"
                        )
                        status[f]["lower_bound"] = True
            for f in list(alive):
                if FRONT_PROTOCOL[f] != proto or baseline_limit[proto] is not None:
                    continue
                print(f"[bench] rate {rate:g}/s {f} ...", flush=True)
                res = run_step(stacks.targets[f], rate, False, args, seed)
                res["phase"] = "ladder"
                add_deltas(res, base)
                ok, why = judge(res, base)
                res["pass"], res["verdict"] = ok, why
                for attempt in range(args.confirm):
                    # p99 of a few hundred samples on a shared 2-core box is noisy: confirm a latency-only
                    # failure with a fresh baseline and front step (same seed) before dropping the front.
                    if ok or not why.startswith("p99 added"):
                        break
                    print(f"[bench]   {why}; confirming ({attempt + 1}/{args.confirm})", flush=True)
                    res["phase"] = "ladder-unconfirmed"
                    steps.append(res)
                    base = run_step(stacks.targets[f"direct-{proto}"], rate, False, args, seed)
                    base["phase"] = "ladder-rerun-baseline"
                    steps.append(base)
                    res = run_step(stacks.targets[f], rate, False, args, seed)
                    res["phase"], res["attempt"] = "ladder", attempt + 2
                    add_deltas(res, base)
                    ok, why = judge(res, base)
                    res["pass"], res["verdict"] = ok, why
                steps.append(res)
                print(
                    f"[bench]   p50 {res.get('lat_p50_ms')} p99 {res.get('lat_p99_ms')} ms, "
                    f"added p99 {res.get('added_p99_ms')} ms, errors {res.get('errors')} -> {why}",
                    flush=True,
                )
                if ok:
                    status[f]["max_sustained_rps"] = rate
                else:
                    status[f]["stop_reason"] = f"{rate:g}/s: {why}"
                    alive.remove(f)
        alive = [f for f in alive if baseline_limit[FRONT_PROTOCOL[f]] is None]
        if not alive:
            break
    for f in alive:
        status[f]["stop_reason"] = (
            status[f]["stop_reason"] or "passed every ladder step (result is a lower bound)"
        )
        status[f]["lower_bound"] = True

    # Streaming at half the max sustained load (half the first step if none passed), repeated
    # `--half-reps` times. In each rep the front and both baselines take turns in blocks of
    # `--block-seconds` within one step (as long as three plain steps): the machine's drift over
    # the step hits all three alike, so it cancels in the differences; the front's figures are the
    # median over reps. Two baselines: one engine answering alone (what a client without P/D sees)
    # and the client doing the P/D handshake itself (so "added vs P/D-direct" is the front's own cost).
    turns_args = argparse.Namespace(**{**vars(args), "step_seconds": 3 * args.step_seconds})
    for f in fronts:
        if stacks.targets[f].error:
            continue
        proto = FRONT_PROTOCOL[f]
        half = args.half_rps or (status[f]["max_sustained_rps"] or args.rates[0]) / 2
        status[f]["half_load_rps"] = half
        reps: list[dict[str, Any]] = []
        for rep in range(args.half_reps):
            seed = 7 + rep
            names = [f"direct-{proto}", f"pd-direct-{proto}", f]
            print(
                f"[bench] half load {half:g}/s {f} with its baselines in turns (stream, rep {rep + 1}) ...",
                flush=True,
            )
            got = run_turns([stacks.targets[n] for n in names], half, True, turns_args, seed)
            for n in names[:2]:
                b = got[n]
                b["phase"], b["rep"], b["baseline_for"] = "half-stream", rep, f
                steps.append(b)
            res = got[f]
            res["phase"], res["rep"] = "half-stream", rep
            add_deltas(res, got[names[0]])
            add_deltas(res, got[names[1]], prefix="added_vs_pd_")
            steps.append(res)
            reps.append(res)
            print(
                f"[bench]   TTFT p50 {res.get('ttft_p50_ms')} p99 {res.get('ttft_p99_ms')} ms, added p50 vs "
                f"P/D-direct {res.get('added_vs_pd_ttft_p50_ms')} ms, {res.get('chunks_per_s')} chunks/s, "
                f"errors {res.get('errors')}",
                flush=True,
            )
        status[f]["half"] = median_step(reps)
    return {"steps": steps, "fronts": status}


# --------------------------------------------------------------------------------------------------
# reporting


def summarize(fronts: list[str], result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for f in fronts:
        st = result["fronts"][f]
        half = st.get("half") or {}
        ladder = [s for s in result["steps"] if s["target"] == f and s.get("phase") == "ladder"]
        at_max = next((s for s in ladder if s["offered_rate"] == st["max_sustained_rps"]), None)
        rss = [s["front_rss_mib"] for s in result["steps"] if s["target"] == f and "front_rss_mib" in s]
        rows.append(
            {
                "front": f,
                "max_sustained_rps": st["max_sustained_rps"],
                "lower_bound": bool(st.get("lower_bound")),
                "stop_reason": st.get("stop_reason"),
                "half_load_rps": st.get("half_load_rps"),
                "added_ttft_p50_ms": half.get("added_ttft_p50_ms"),
                "added_ttft_p99_ms": half.get("added_ttft_p99_ms"),
                "added_vs_pd_ttft_p50_ms": half.get("added_vs_pd_ttft_p50_ms"),
                "added_vs_pd_ttft_p99_ms": half.get("added_vs_pd_ttft_p99_ms"),
                "added_vs_pd_ttft_p50_ms_reps": half.get("added_vs_pd_ttft_p50_ms_reps"),
                "chunks_per_s": half.get("chunks_per_s"),
                "half_errors": half.get("errors"),
                "cpu_s_per_1k_req_max": at_max.get("cpu_s_per_1k_req") if at_max else None,
                "cpu_s_per_1k_req_stream": half.get("cpu_s_per_1k_req"),
                "rss_mib_max": max(rss) if rss else None,
            }
        )
    return rows


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _ratio(x: float | None, best: float | None) -> str:
    if x is None or not best:
        return "-"
    return f"{x / best:.2f}x"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| front | max req/s (p99 added <= 10 ms) | added TTFT p50 / p99 ms @ half, vs one engine "
        "| vs P/D-direct | chunks/s @ half "
        "| CPU s / 1k req (non-stream @ max; stream @ half) | RSS MiB | stopped because |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mx = ("≥" if r["lower_bound"] else "") + _fmt(r["max_sustained_rps"], 0)
        out.append(
            f"| {r['front']} | {mx} | {_fmt(r['added_ttft_p50_ms'])} / {_fmt(r['added_ttft_p99_ms'])} "
            f"(@ {_fmt(r['half_load_rps'], 1)}/s) | {_fmt(r['added_vs_pd_ttft_p50_ms'])} / "
            f"{_fmt(r['added_vs_pd_ttft_p99_ms'])} | {_fmt(r['chunks_per_s'], 0)} | "
            f"{_fmt(r['cpu_s_per_1k_req_max'], 3)}; {_fmt(r['cpu_s_per_1k_req_stream'], 3)} | "
            f"{_fmt(r['rss_mib_max'], 1)} | {r['stop_reason'] or '-'} |"
        )
    rust = [r for r in rows if r["front"] in RUST and r["max_sustained_rps"]]
    if rust and any(r["front"] not in RUST for r in rows):

        def best(key: str, higher: bool) -> float | None:
            vals = [r[key] for r in rust if r[key] is not None]
            if not vals:
                return None
            return max(vals) if higher else min(vals)

        b = {
            "max_sustained_rps": best("max_sustained_rps", True),
            "added_ttft_p99_ms": best("added_ttft_p99_ms", False),
            "chunks_per_s": best("chunks_per_s", True),
            "cpu_s_per_1k_req_max": best("cpu_s_per_1k_req_max", False),
            "rss_mib_max": best("rss_mib_max", False),
        }
        out += [
            "",
            "Ratios vs the best Rust router per column (req/s and chunks/s: higher is better; "
            "TTFT, CPU, RSS: lower is better):",
            "",
            "| front | req/s | added TTFT p99 | chunks/s | CPU s/1k (non-stream) | RSS |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            out.append(
                f"| {r['front']} | {_ratio(r['max_sustained_rps'], b['max_sustained_rps'])} | "
                f"{_ratio(r['added_ttft_p99_ms'], b['added_ttft_p99_ms'])} | "
                f"{_ratio(r['chunks_per_s'], b['chunks_per_s'])} | "
                f"{_ratio(r['cpu_s_per_1k_req_max'], b['cpu_s_per_1k_req_max'])} | "
                f"{_ratio(r['rss_mib_max'], b['rss_mib_max'])} |"
            )
    return "\n".join(out)


def reps_table(rows: list[dict[str, Any]]) -> str:
    """Each front's added TTFT p50 vs P/D-direct in every half-load rep, and their median."""
    out = ["| front | req/s | added TTFT p50 vs P/D-direct per rep, ms | median |", "|---|---|---|---|"]
    for r in rows:
        per = ", ".join(_fmt(x) for x in r.get("added_vs_pd_ttft_p50_ms_reps") or [])
        out.append(
            f"| {r['front']} | {_fmt(r['half_load_rps'], 1)} | {per or '-'} | {_fmt(r['added_vs_pd_ttft_p50_ms'])} |"
        )
    return "\n".join(out)


def medians_table(steps: list[dict[str, Any]]) -> str:
    """Plain median (and p99) latency of every ladder step, baselines included.

    For a direct baseline the "front" is the sim itself, so its two CPU columns are the same process.
    """
    out = [
        "| target (step) | offered req/s | completed req/s | p50 ms | p99 ms | added p99 ms | errors "
        "| gen lag p99 ms | front CPU s/1k | sims CPU s/1k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        if not str(s.get("phase", "")).startswith("ladder"):
            continue
        out.append(
            f"| {s['target']} ({s['phase']}) | {_fmt(s['offered_rate'], 0)} | {_fmt(s.get('completed_rate'), 1)} | "
            f"{_fmt(s.get('lat_p50_ms'))} | {_fmt(s.get('lat_p99_ms'))} | {_fmt(s.get('added_p99_ms'))} | "
            f"{_fmt(s.get('errors'))} | {_fmt(s.get('gen_lag_p99_ms'))} | "
            f"{_fmt(s.get('cpu_s_per_1k_req'), 3)} | {_fmt(s.get('engines_cpu_s_per_1k_req'), 3)} |"
        )
    return "\n".join(out)


def plot(fronts: list[str], steps: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for f in fronts:
        pts = [
            (s["offered_rate"], s["added_p99_ms"])
            for s in steps
            if s["target"] == f and s.get("phase") == "ladder" and s.get("added_p99_ms") is not None
        ]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f)
    ax.axhline(ADDED_P99_LIMIT_MS, color="grey", linestyle="--", linewidth=1, label="10 ms limit")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("offered load (req/s, Poisson, non-streaming, max_tokens 16)")
    ax.set_ylabel("p99 added latency vs direct (ms)")
    ax.set_title("P/D fronts over near-zero-latency sims, 127.0.0.1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "loadgen":
        loadgen_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--fronts", default=",".join(FRONTS), help=f"comma-separated subset of {', '.join(FRONTS)}"
    )
    ap.add_argument("--rates", default="25,50,100,200,400,800,1600", help="offered req/s ladder")
    ap.add_argument("--step-seconds", type=float, default=12.0, help="measured seconds per step")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each step")
    ap.add_argument("--time-scale", type=float, default=0.001, help="sim --time-scale")
    ap.add_argument("--request-timeout", type=float, default=10.0)
    ap.add_argument(
        "--engine-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="event loop of the sims and the load generator (the same for every front)",
    )
    ap.add_argument(
        "--sglang-sims",
        choices=["one-process", "two-process"],
        default="one-process",
        help="SGLang P/D sims in one process (as the vLLM ones) or two (rendezvous over the bootstrap server)",
    )
    ap.add_argument(
        "--router-log-level",
        choices=["warn", "info"],
        default="warn",
        help="Rust routers' log level (their default, info, writes two lines per request)",
    )
    ap.add_argument(
        "--confirm",
        type=int,
        default=1,
        help="re-run a failing ladder step (baseline and front) this many times before dropping the front",
    )
    ap.add_argument(
        "--half-reps",
        type=int,
        default=5,
        help="repetitions of the half-load streaming step (baselines + front); medians are reported",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: one short step per front")
    ap.add_argument(
        "--half-rps",
        type=float,
        default=None,
        help="run the streaming reps of every front at this rate (default: half of its own max)",
    )
    ap.add_argument(
        "--block-seconds",
        type=float,
        default=0.5,
        help="length of one target's turn when a front and its baselines share a half-load step",
    )
    ap.add_argument(
        "--pdorch-args",
        default="",
        help="extra `pdorch proxy` flags for the pdorch fronts, e.g. '--prefill-queue-tokens 16384'",
    )
    ap.add_argument("--name", default="proxy", help="results file stem")
    ap.add_argument(
        "--out", default=None, help="results dir (default bench/results; --quick: /tmp/bench-proxy-quick)"
    )
    args = ap.parse_args()
    fronts = [f.strip() for f in args.fronts.split(",") if f.strip()]
    bad = [f for f in fronts if f not in FRONTS]
    if bad or not fronts:
        ap.error(f"unknown fronts {bad}; choose from {FRONTS}")
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.quick:
        args.rates, args.step_seconds, args.warmup, args.request_timeout = [50.0], 1.5, 0.3, 5.0
        args.confirm, args.half_reps = 0, 1
    # A smoke run must not overwrite the real results.
    out = Path(args.out or ("/tmp/bench-proxy-quick" if args.quick else REPO / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    protocols = sorted({FRONT_PROTOCOL[f] for f in fronts})
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        stacks = Stacks(
            Path(tmp),
            args.time_scale,
            quiet_routers=args.router_log_level == "warn",
            event_loop=args.engine_loop,
            sglang_sims=args.sglang_sims,
            pdorch_args=tuple(args.pdorch_args.split()),
        )
        meta: dict[str, Any] = {}
        try:
            # Start everything at once (imports dominate startup), then wait for each, bounded.
            waits: list[tuple[Proc, str]] = []
            for proto in protocols:
                waits += stacks.spawn_baseline(proto)
            pd: dict[str, Any] = {}
            if "vllm" in protocols:
                pd["vllm"], w = stacks.spawn_vllm_pd()
                waits += w
            if "sglang" in protocols:
                pd["sglang"], w = stacks.spawn_sglang_pd()
                waits += w
            for proc, url in waits:
                wait_http_ok(url, proc)
            for proto in protocols:
                sanity_request(stacks.targets[f"direct-{proto}"].url)
            print(f"[bench] sims up; starting {', '.join(fronts)}", flush=True)
            for f in fronts:
                stacks.start_front(f, pd)
            for f in fronts:
                stacks.finish_front(f)
            result = run_bench(args, stacks, fronts)
        finally:
            # Router logs may hold the reason for errors under load. Their tails (full of this
            # machine's paths) go next to the logs, outside the repo; the results keep the counts.
            tails = Path(tempfile.gettempdir()) / "pdorch-bench-proxy-log-tails.json"
            tails.write_text(json.dumps({p.name: p.tail(1500) for p in stacks.procs}, indent=2))
            print(f"[bench] log tails: {tails}", flush=True)
            meta["log_counts"] = {p.name: log_counts(p.log) for p in stacks.procs}
            stacks.stop_all()
    rows = summarize(fronts, result)
    doc = {
        "config": {
            "fronts": fronts,
            "rates": args.rates,
            "step_seconds": args.step_seconds,
            "warmup_s": args.warmup,
            "time_scale": args.time_scale,
            "prompt_tokens": 128,
            "max_tokens": 16,
            "added_p99_limit_ms": ADDED_P99_LIMIT_MS,
            "quick": args.quick,
            "half_reps": args.half_reps,
            "half_rps_fixed": args.half_rps,
            "half_block_seconds": args.block_seconds,
            "engine_loop": args.engine_loop,
            "sglang_sims": args.sglang_sims,
            "pdorch_args": args.pdorch_args,
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "wall_s": round(time.time() - started, 1),
        },
        "summary": rows,
        "fronts": result["fronts"],
        "startup_errors": {n: t.error for n, t in stacks.targets.items() if t.error},
        "steps": result["steps"],
        **meta,
    }
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2))
    md = table(rows)
    header = (
        f"# bench/proxy{' (quick smoke run)' if args.quick else ''}\n\n"
        f"Sims at --time-scale {args.time_scale}, prompt ~128 tokens, max_tokens 16, Poisson arrivals, "
        f"{args.step_seconds:g} s per step, {os.cpu_count()} CPUs, all on 127.0.0.1. Added = front percentile "
        'minus direct-to-sim percentile at the same rate and seed; "vs P/D-direct" subtracts a client that '
        "does the P/D handshake with the same sims itself (no front), which isolates the front's own cost. "
        f"Half-load figures are medians over {args.half_reps} streaming rep(s); in each rep the front and both "
        f"baselines take turns in {args.block_seconds:g} s blocks within one {3 * args.step_seconds:g} s step. "
        f"Sims and load generator on {args.engine_loop}; SGLang P/D sims: {args.sglang_sims}.\n\n"
    )
    (out / f"{args.name}.md").write_text(
        header
        + md
        + "\n\n## Half-load reps\n\n"
        + reps_table(rows)
        + "\n\n## Ladder steps\n\n"
        + medians_table(result["steps"])
        + "\n"
    )
    plot(fronts, result["steps"], out / f"{args.name}.png")
    print(md)
    print()
    print(medians_table(result["steps"]))
    print(f"[bench] wrote {out / args.name}.json/.md/.png in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
