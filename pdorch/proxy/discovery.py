"""Where the engines are: static URLs, or a watch on the group's pods.

`endpoint_from_pod` / `endpoints_from_pods` are pure (tested without a cluster); `KubeDiscovery` only
feeds them from the project's informer (list + watch with bookmarks, relist on 410, watchdog).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from pdorch.proxy.endpoints import Endpoint, EndpointRole, EndpointSet
from pdorch.roles.labels import (
    ANNOTATION_BOOTSTRAP_PORT,
    ANNOTATION_DRAINING,
    ANNOTATION_PORT,
    LABEL_GROUP,
    LABEL_REVISION,
    LABEL_ROLE_TYPE,
    LWS_WORKER_INDEX,
)
from pdorch.roles.pods import is_ready, is_terminating

log = logging.getLogger(__name__)
DEFAULT_ENGINE_PORT = 8000


def parse_static(url: str, role: EndpointRole, bootstrap_port: int | None = None) -> Endpoint:
    """An endpoint from ``http://host:port`` (SGLang prefills: optional ``#bootstrapPort`` suffix)."""
    base, _, frag = url.partition("#")
    if frag:
        if not frag.isdigit() or not 1 <= int(frag) <= 65535:
            raise ValueError(f"{url}: bootstrap port after '#' must be a port in 1-65535")
        bootstrap_port = int(frag)
    parts = urlsplit(base)
    if parts.scheme == "https":
        # The engine legs are plain HTTP/1.1 (pdorch.proxy.upstream): a TLS engine would pass the
        # health checks and fail every request.
        raise ValueError(f"{url}: engines are reached over plain HTTP; use http://host:port")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: expected http://host:port")
    if parts.username is not None:
        raise ValueError(f"{url}: no user or password in an engine URL (the legs would drop them)")
    if parts.path not in ("", "/") or "?" in base:  # a query, even an empty one
        # Requests go to /v1/... on the engine itself; a prefix would hold only for health checks.
        raise ValueError(f"{url}: no path after host:port (the proxy sends /v1/... to the engine itself)")
    try:
        port = parts.port or 80
    except ValueError:  # urllib's message names neither the URL nor the flag
        raise ValueError(f"{url}: the port must be a number in 1-65535") from None
    return Endpoint(
        url=base.rstrip("/"),
        role=role,
        host=parts.hostname,
        port=port,
        bootstrap_port=bootstrap_port if role != "decode" else None,
    )


def static_endpoints(
    prefill: Iterable[str], decode: Iterable[str], bootstrap_port: int | None = None
) -> EndpointSet:
    """The endpoint set of ``--prefill``/``--decode`` URLs (all of one revision)."""
    eps = [parse_static(u, "prefill", bootstrap_port) for u in prefill]
    eps += [parse_static(u, "decode") for u in decode]
    return EndpointSet(tuple(eps))


def _port(value: Any, default: int | None) -> int | None:
    try:
        p = int(value)
    except (TypeError, ValueError):
        return default
    return p if 0 < p < 65536 else default


def endpoint_from_pod(pod: dict[str, Any]) -> Endpoint | None:
    """The endpoint a pod serves, or None if it must not receive traffic (also when draining).

    Included: Ready, has a pod IP, not terminating, leader of its LWS group (worker-index 0), role-type
    prefill or decode. Port from annotation pdorch.io/port (default 8000), SGLang bootstrap port from
    pdorch.io/bootstrap-port, revision from label pdorch.io/revision, identity from the pod's UID (a
    pod that replaces another at the same IP and port is a new endpoint: `Endpoint.key`).
    """
    md = pod.get("metadata") or {}
    labels = md.get("labels") or {}
    ann = md.get("annotations") or {}
    role = labels.get(LABEL_ROLE_TYPE)
    if role not in ("prefill", "decode"):
        return None
    if labels.get(LWS_WORKER_INDEX, "0") != "0":
        return None  # workers of a multi-host group serve no HTTP; only the leader does
    if is_terminating(pod) or ann.get(ANNOTATION_DRAINING) == "true":
        return None  # terminating, or drained by the scaler before a scale-down
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or not is_ready(pod):
        return None
    port = _port(ann.get(ANNOTATION_PORT), DEFAULT_ENGINE_PORT) or DEFAULT_ENGINE_PORT
    host = f"[{ip}]" if ":" in ip else ip
    return Endpoint(
        url=f"http://{host}:{port}",
        role=role,
        host=ip,
        port=port,
        revision=labels.get(LABEL_REVISION, ""),
        bootstrap_port=_port(ann.get(ANNOTATION_BOOTSTRAP_PORT), None) if role == "prefill" else None,
        pod=md.get("name"),
        uid=md.get("uid") or None,
    )


def endpoints_from_pods(pods: Iterable[dict[str, Any]]) -> EndpointSet:
    """The endpoint set of a group's pods (sorted by URL; duplicates of one URL collapse)."""
    by_url: dict[str, Endpoint] = {}
    for pod in pods:
        ep = endpoint_from_pod(pod)
        if ep is not None:
            by_url[ep.url] = ep
    return EndpointSet(tuple(by_url[u] for u in sorted(by_url)))


class StaticDiscovery:
    """A fixed endpoint set."""

    def __init__(self, endpoints: EndpointSet) -> None:
        self._endpoints = endpoints

    def current(self) -> EndpointSet:
        """The endpoint snapshot."""
        return self._endpoints

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to stop."""


class KubeDiscovery:
    """Keeps the endpoint set of one group's pods current by watching them."""

    def __init__(
        self,
        namespace: str,
        group: str,
        kubeconfig: str | None = None,
        on_change: Callable[[EndpointSet], None] | None = None,
    ) -> None:
        self.namespace, self.group, self.kubeconfig = namespace, group, kubeconfig
        self.on_change = on_change
        self._endpoints = EndpointSet()
        self._task: asyncio.Task[None] | None = None
        self._api: Any = None
        self._informer: Any = None

    def current(self) -> EndpointSet:
        """The latest endpoint snapshot."""
        return self._endpoints

    def _rebuild(self, _etype: str, _obj: dict[str, Any]) -> None:
        new = endpoints_from_pods(self._informer.store.values())
        if new != self._endpoints:
            self._endpoints = new
            log.info(
                "endpoints of %s/%s: %s",
                self.namespace,
                self.group,
                ", ".join(f"{e.role}:{e.url}@{e.revision or '-'}" for e in new.endpoints) or "none",
            )
            if self.on_change is not None:
                self.on_change(new)

    async def start(self, sync_timeout: float = 30.0) -> None:
        """Start watching; waits (bounded) for the first list so the proxy starts with endpoints."""
        # Imported here so static mode does not load the controller runtime.
        from pdorch.controller.informer import Informer
        from pdorch.controller.kubeapi import POD, KubeApi

        self._api = KubeApi.from_config(self.kubeconfig)
        self._informer = Informer(
            self._api, POD, self.namespace, label_selector=f"{LABEL_GROUP}={self.group}"
        )
        self._informer.add_handler(self._rebuild)
        self._task = asyncio.create_task(self._informer.run(), name=f"pods-{self.group}")
        try:
            await asyncio.wait_for(self._informer.synced.wait(), sync_timeout)
        except TimeoutError:
            log.warning(
                "pod list of %s/%s not synced after %.0fs; starting anyway",
                self.namespace,
                self.group,
                sync_timeout,
            )

    async def stop(self) -> None:
        """Stop the watch and close the API client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._api is not None:
            with contextlib.suppress(Exception):
                await self._api.close()
            self._api = None
