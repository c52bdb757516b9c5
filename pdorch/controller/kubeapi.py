"""A thin asyncio Kubernetes REST client over raw JSON.

The controller needs a few things the typed clients hide or lack: watch bookmarks, the 410 status
of an expired resourceVersion, server-side apply of plain-dict intents (only the fields pdorch
owns) and a count of every request by verb, so "idle means zero writes" can be checked. Auth and
TLS come from lightkube's kubeconfig / in-cluster config handling.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx2
import msgspec
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig
from prometheus_client import Counter

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "pdorch_kube_requests_total",
    "Requests the controller sent to the Kubernetes API, by verb, resource and status code.",
    ["verb", "resource", "code"],
)
REQUEST_TIMEOUT = httpx2.Timeout(30.0)  # every call but watches, which the informer's watchdog guards
# httpx's default pool (100 connections, only 20 kept, for 5 s) opened a new TLS connection for most
# requests of a burst past the 20th: in a 200-group creation about a third of the controller's CPU
# went to handshakes and to scanning the pool. Every connection is kept now, for a minute; a watch
# holds one for good (eight informers), the rest serve requests, which queue for them beyond that.
POOL_LIMITS = httpx2.Limits(max_connections=32, max_keepalive_connections=32, keepalive_expiry=60.0)
WRITE_VERBS = frozenset({"create", "apply", "update", "patch", "delete"})


@dataclass(frozen=True)
class Resource:
    """One API resource: enough to build its URLs."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


SERVING_GROUP = Resource("pdorch.io", "v1alpha1", "servinggroups", "ServingGroup")
SERVING_ROLE_SCALER = Resource("pdorch.io", "v1alpha1", "servingrolescalers", "ServingRoleScaler")
LWS = Resource("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", "LeaderWorkerSet")
POD = Resource("", "v1", "pods", "Pod")
# Only ever created as a dry run: the pod validation of a role's templates (see the reconciler).
POD_TEMPLATE = Resource("", "v1", "podtemplates", "PodTemplate")
SERVICE = Resource("", "v1", "services", "Service")
SERVICE_ACCOUNT = Resource("", "v1", "serviceaccounts", "ServiceAccount")
ROLE = Resource("rbac.authorization.k8s.io", "v1", "roles", "Role")
ROLE_BINDING = Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease")
EVENT = Resource("events.k8s.io", "v1", "events", "Event")
# Read through the core API: its field selectors (type, reason) are what the apiserver indexes.
CORE_EVENT = Resource("", "v1", "events", "Event")
CONTROLLER_REVISION = Resource("apps", "v1", "controllerrevisions", "ControllerRevision")
NAMESPACE = Resource("", "v1", "namespaces", "Namespace", namespaced=False)

KNOWN: dict[tuple[str, str], Resource] = {
    (r.api_version, r.kind): r
    for r in (
        SERVING_GROUP,
        SERVING_ROLE_SCALER,
        LWS,
        POD,
        POD_TEMPLATE,
        SERVICE,
        SERVICE_ACCOUNT,
        ROLE,
        ROLE_BINDING,
        LEASE,
        EVENT,
        NAMESPACE,
        CONTROLLER_REVISION,
    )
}


def resource_of(obj: dict[str, Any]) -> Resource:
    """The Resource of a dict object, from its apiVersion and kind."""
    key = (obj["apiVersion"], obj["kind"])
    try:
        return KNOWN[key]
    except KeyError:
        raise ValueError(f"pdorch does not manage {key[0]} {key[1]}") from None


# msgspec decodes the API server's JSON several times faster than the stdlib: watch events of
# hundreds of LWS objects are most of an idle-to-busy controller's CPU.
_decode = msgspec.json.Decoder().decode
_ENCODER = msgspec.json.Encoder()


class NotLeader(Exception):
    """A write refused because this replica no longer holds the Lease (see `KubeApi.write_guard`)."""


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status fields."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    @classmethod
    def from_response(cls, status_code: int, body: bytes) -> ApiError:
        try:
            st = json.loads(body)
            return cls(
                st.get("code", status_code), st.get("reason", ""), st.get("message", ""), st.get("details")
            )
        except (ValueError, AttributeError):
            return cls(status_code, "", body.decode(errors="replace")[:500])


class KubeApi:
    """Async REST calls with JSON bodies; every call is counted in pdorch_kube_requests_total."""

    def __init__(self, http: httpx2.AsyncClient, field_manager: str = "pdorch") -> None:
        self.http = http
        self.field_manager = field_manager
        self.writes = 0  # also exposed through the Prometheus counter; handy for tests
        # Called before every write except dry runs; raises NotLeader to refuse it (the leader
        # election fences a replica whose Lease may have passed to another one).
        self.write_guard: Callable[[Resource], None] | None = None

    @classmethod
    def from_config(cls, kubeconfig: str | None = None, field_manager: str = "pdorch") -> KubeApi:
        """From a kubeconfig file, or KUBECONFIG / in-cluster service account when None."""
        cfg = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        single = cfg.get()
        if single is None:
            raise ValueError("no usable context in the Kubernetes configuration")
        # No read timeout: watches are long polls bounded by timeoutSeconds and our watchdog.
        params = ConnectionParams(timeout=httpx2.Timeout(30.0, read=None), trust_env=False)
        # lightkube's kubeconfig handling (TLS, token, exec plugins), with our pool limits.
        http = httpx2.AsyncClient(**params.httpx_params(single), limits=POOL_LIMITS)
        return cls(http, field_manager)

    async def close(self) -> None:
        await self.http.aclose()

    # ------------------------------------------------------------------ plumbing
    async def _request(self, verb: str, method: str, res: Resource, path: str, **kw: Any) -> dict[str, Any]:
        """`_exchange`'s decoded body."""
        return (await self._exchange(verb, method, res, path, **kw))[1]

    async def _exchange(
        self,
        verb: str,
        method: str,
        res: Resource,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        """One request: its HTTP status and decoded body (an ApiError from 400 on)."""
        q = {k: v for k, v in (params or {}).items() if v is not None}
        if self.write_guard is not None and verb in WRITE_VERBS and not q.get("dryRun"):
            self.write_guard(res)
        url = path + (f"?{urlencode(q)}" if q else "")
        headers = {"Accept": "application/json"}
        content = None
        if body is not None:
            content = _ENCODER.encode(body)
            headers["Content-Type"] = content_type
        try:
            r = await self.http.request(
                method, url, content=content, headers=headers, timeout=REQUEST_TIMEOUT
            )
        except httpx2.HTTPError:
            REQUESTS.labels(verb, res.plural, "error").inc()
            raise
        REQUESTS.labels(verb, res.plural, str(r.status_code)).inc()
        if verb in WRITE_VERBS and not (q.get("dryRun")):
            self.writes += 1
        if r.status_code >= 400:
            raise ApiError.from_response(r.status_code, r.content)
        return r.status_code, _decode(r.content) if r.content else {}

    # ------------------------------------------------------------------ reads
    async def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return await self._request("get", "GET", res, res.path(namespace, name))
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        limit: int = 500,
        field_selector: str | None = None,
    ) -> tuple[list[dict[str, Any]], str]:
        """All objects (paginated) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        cont: str | None = None
        while True:
            params = {"labelSelector": label_selector, "limit": limit, "continue": cont}
            if field_selector:
                params["fieldSelector"] = field_selector
            page = await self._request("list", "GET", res, res.path(namespace), params=params)
            items.extend(page.get("items") or [])
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                return items, page.get("metadata", {}).get("resourceVersion", "")

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events ({type, object}) from `resource_version`, bookmarks included."""
        params = {
            "watch": "1",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": timeout_seconds,
            "labelSelector": label_selector,
        }
        url = res.path(namespace) + "?" + urlencode({k: v for k, v in params.items() if v is not None})
        async with self.http.stream("GET", url, headers={"Accept": "application/json"}) as r:
            REQUESTS.labels("watch", res.plural, str(r.status_code)).inc()
            if r.status_code >= 400:
                raise ApiError.from_response(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if line:
                    yield _decode(line)

    # ------------------------------------------------------------------ writes
    async def apply(
        self,
        obj: dict[str, Any],
        *,
        force: bool = True,
        dry_run: bool = False,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Server-side apply of `obj` (only the fields we own) with our field manager."""
        return (await self.apply_created(obj, force=force, dry_run=dry_run, subresource=subresource))[0]

    async def apply_created(
        self,
        obj: dict[str, Any],
        *,
        force: bool = True,
        dry_run: bool = False,
        subresource: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """`apply`, and whether it created the object (201 Created; an update is 200)."""
        res = resource_of(obj)
        md = obj["metadata"]
        status, got = await self._exchange(
            "apply",
            "PATCH",
            res,
            res.path(md.get("namespace"), md["name"], subresource),
            params={
                "fieldManager": self.field_manager,
                "force": "true" if force else None,
                "dryRun": "All" if dry_run else None,
            },
            body=obj,  # JSON is YAML, which the apply-patch content type takes
            content_type="application/apply-patch+yaml",
        )
        return got, status == 201

    async def patch(
        self,
        res: Resource,
        name: str,
        namespace: str | None,
        body: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """JSON merge patch (e.g. `{"spec": {"replicas": 3}}` on a `/scale` subresource)."""
        return await self._request(
            "patch",
            "PATCH",
            res,
            res.path(namespace, name, subresource),
            params={"fieldManager": self.field_manager},
            body=body,
            content_type="application/merge-patch+json",
        )

    async def create(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        res = resource_of(obj)
        return await self._request(
            "create",
            "POST",
            res,
            res.path(obj["metadata"].get("namespace")),
            params={"fieldManager": self.field_manager, "dryRun": "All" if dry_run else None},
            body=obj,
        )

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT with the object's resourceVersion (optimistic lock; 409 on conflict)."""
        res = resource_of(obj)
        md = obj["metadata"]
        return await self._request(
            "update",
            "PUT",
            res,
            res.path(md.get("namespace"), md["name"]),
            params={"fieldManager": self.field_manager},
            body=obj,
        )

    async def delete(
        self, res: Resource, name: str, namespace: str | None = None, *, uid: str | None = None
    ) -> bool:
        """Delete (background propagation), only if the UID still matches. False if already gone."""
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._request("delete", "DELETE", res, res.path(namespace, name), body=body)
        except ApiError as e:
            if e.code in (404, 409):  # gone, or replaced by a newer object of the same name
                return False
            raise
        return True
