"""Errors of the `pdorch` command line the user can act on, as one line each.

`pdorch.cli.main` prints an expected failure (a missing kubeconfig, an unreachable API server, a
failed build, ...) as `error: <what> — <what to do>` and exits 1; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class CliError(Exception):
    """An expected failure the user can fix: `what` went wrong, `fix` says what to do about it."""

    def __init__(self, what: str, fix: str = "") -> None:
        super().__init__(f"{what} — {fix}" if fix else what)
        self.what = what
        self.fix = fix


def _leaf(exc: BaseException) -> BaseException:
    # asyncio.TaskGroup wraps a single failure in an ExceptionGroup; judge the failure itself.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def expected_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for anything else (a bug)."""
    parts = expected_parts(exc)
    if parts is None:
        return None
    what, fix = parts
    return f"{what} — {fix}" if fix else what


def expected_parts(exc: BaseException) -> tuple[str, str] | None:
    """`expected_error` as (what went wrong, what to do), or None for anything else (a bug)."""
    exc = _leaf(exc)
    if isinstance(exc, CliError):
        return exc.what, exc.fix
    # Imported here: `pdorch --help` should not pay for the HTTP and Kubernetes client libraries.
    import httpx2
    from lightkube.core.exceptions import ConfigError

    if isinstance(exc, ConfigError):
        return f"no usable Kubernetes configuration: {exc}", "pass --kubeconfig PATH or set KUBECONFIG"
    if isinstance(exc, httpx2.TransportError):
        url = _request_url(exc)
        where = f" at {url}" if url else ""
        return (
            f"cannot reach the Kubernetes API server{where}: {exc or type(exc).__name__}",
            "check that the cluster is up (`pdorch dev-cluster status`) and that "
            "--kubeconfig/KUBECONFIG points at it",
        )
    return None


def _request_url(exc: BaseException) -> str:
    try:
        request = exc.request  # type: ignore[attr-defined]  # raises RuntimeError when unset
    except (AttributeError, RuntimeError):
        return ""
    return f"{request.url.scheme}://{request.url.netloc.decode()}"
