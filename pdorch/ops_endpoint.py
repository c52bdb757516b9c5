"""The small HTTP listener of /metrics and health probes that the controller and scaler serve."""

from __future__ import annotations

from aiohttp import web

from pdorch.cli_args import split_host_port
from pdorch.cli_errors import CliError


async def serve_ops_endpoint(app: web.Application, addr: str, flag: str, what: str) -> web.AppRunner:
    """Serve `app` on `addr` ("HOST:PORT", from `flag`); a taken or unusable address is one clear
    CliError naming `flag`, not a traceback."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_host_port(addr)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise CliError(
            f"cannot serve {what} on {flag} {addr}: {exc.strerror or exc}",
            f"stop whatever holds that address or pass another {flag} HOST:PORT",
        ) from exc
    return runner
