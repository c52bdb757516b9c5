"""bench/proxy/servers: the proxy's client-facing HTTP server choices side by side.

Each variant runs in its own process on 127.0.0.1 with the same trivial handler (read the JSON
body, answer a small JSON completion). A separate client process sends sequential POSTs over one
kept-alive connection; the table gives the server process's CPU microseconds per request, read
from /proc (medians of the rounds), and the client-observed wall time per request.

Variants: aiohttp's web server (what the proxy used before) and `pdorch.proxy.http_server` (what
it uses now), each on asyncio's default event loop and on uvloop.

    python bench/proxy/servers.py             # 3 rounds of 3000 requests per variant
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pdorch.devcluster.process import free_port
from pdorch.lifecycle import loop_factory

REPO = Path(__file__).resolve().parents[2]
BODY = json.dumps({"model": "sim-model", "prompt": "word " * 128, "max_tokens": 1}).encode()
ANSWER = json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "a"}]}).encode()
VARIANTS = {
    "aiohttp-web/asyncio": ("aiohttp", "asyncio"),
    "aiohttp-web/uvloop": ("aiohttp", "uvloop"),
    "pdorch-http_server/asyncio": ("pdorch", "asyncio"),
    "pdorch-http_server/uvloop": ("pdorch", "uvloop"),
}
CLK = os.sysconf("SC_CLK_TCK")


def serve(kind: str, loop: str, port: int) -> None:
    """Run one server variant forever (a subprocess entry point)."""
    from aiohttp import web

    from pdorch.proxy.http_server import HttpServer, Request, Response

    async def aio_handler(req: web.Request) -> web.Response:
        json.loads(await req.read())
        return web.Response(body=ANSWER, content_type="application/json")

    async def pd_handler(req: Request) -> Response:
        json.loads(await req.read())
        return Response(200, ANSWER, {"Content-Type": "application/json"})

    async def main() -> None:
        if kind == "aiohttp":
            app = web.Application()
            app.router.add_post("/v1/completions", aio_handler)
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
        else:
            srv = HttpServer(
                {("POST", "/v1/completions"): pd_handler},
                max_body_bytes=1 << 20,
                idle_timeout_s=60,
                error=lambda s, m: Response(s, m.encode()),
            )
            await srv.start("127.0.0.1", port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(main())


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def client(port: int, n: int) -> float:
    """Sequential keep-alive POSTs with a blocking socket; returns wall seconds."""
    req = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(BODY)
        + BODY
    )
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    for _ in range(n):
        s.sendall(req)
        got = b""
        while not (b"\r\n\r\n" in got and got.endswith(ANSWER)):
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("server closed the connection")
            got += chunk
    dt = time.perf_counter() - t0
    s.close()
    return dt


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=3000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "proxy-servers"))
    args = ap.parse_args()
    procs: dict[str, tuple[subprocess.Popen[str], int]] = {}
    try:
        for name, (kind, loop) in VARIANTS.items():
            port = free_port()
            p = subprocess.Popen(
                [sys.executable, __file__, "serve", kind, loop, str(port)], stdout=subprocess.PIPE, text=True
            )
            procs[name] = (p, port)
        for p, _ in procs.values():
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
        wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for _ in range(args.rounds):  # rounds interleave the variants, so drift hits all alike
            for name, (p, port) in procs.items():
                client(port, 200)  # warm-up
                c0 = cpu_s(p.pid)
                dt = client(port, args.n)
                cpu[name].append((cpu_s(p.pid) - c0) / args.n * 1e6)
                wall[name].append(dt / args.n * 1e6)
    finally:
        for p, _ in procs.values():
            p.terminate()
            p.wait(5)
    rows = {k: {"cpu_us": statistics.median(cpu[k]), "wall_us": statistics.median(wall[k])} for k in VARIANTS}
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps({"n": args.n, "rounds": args.rounds, "rows": rows}, indent=2)
    )
    lines = [
        "# bench/proxy/servers",
        "",
        f"Sequential keep-alive POSTs (small JSON in and out), {args.n} per round, median of {args.rounds} "
        "rounds; server CPU from /proc.",
        "",
        "| server / event loop | server CPU us / request | wall us / request |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['cpu_us']:.0f} | {v['wall_us']:.0f} |" for k, v in rows.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
