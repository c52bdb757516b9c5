"""An informer: a local cache of one resource kind, kept current by list + watch.

- Watches ask for bookmarks, so a quiet watch still advances its resourceVersion.
- A watch that reports 410 Gone (or an expired resourceVersion) triggers a relist that is diffed
  against the cache: objects deleted during the gap produce synthetic DELETED events.
- A watchdog restarts a watch that delivers nothing (not even a bookmark) for `inactivity`
  seconds: half-open connections otherwise hang silently forever.
- Handlers only map events to work-queue keys; they must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import Counter

from pdorch.controller.kubeapi import ApiError, KubeApi, Resource

log = logging.getLogger(__name__)

# A watch that ends cleanly sooner than this is retried with backoff, not at once.
_SHORT_WATCH_S = 1.0

Obj = dict[str, Any]
Handler = Callable[[str, Obj], None]  # (event type ADDED|MODIFIED|DELETED, object)

RELISTS = Counter(
    "pdorch_informer_relists_total", "Full relists per resource, by reason.", ["resource", "reason"]
)


def key_of(obj: Obj) -> str:
    md = obj["metadata"]
    return f"{md.get('namespace', '')}/{md['name']}"


def strip(obj: Obj) -> Obj:
    """Drop what the controller never reads, to keep the cache small.

    Of managedFields only who wrote when is kept (not the field sets, the bulk of it): it tells a
    restarted controller when it last changed an object (pdorch.controller.failures)."""
    md = obj.get("metadata", {})
    managed = md.pop("managedFields", None)
    if isinstance(managed, list):
        md["managedFields"] = [
            {k: v for k, v in e.items() if k != "fieldsV1"} for e in managed if isinstance(e, dict)
        ]
    ann = md.get("annotations")
    if ann:
        ann.pop("kubectl.kubernetes.io/last-applied-configuration", None)
    return obj


def relist_events(old: dict[str, Obj], fresh: dict[str, Obj]) -> list[tuple[str, Obj]]:
    """Events that turn cache `old` into the relisted `fresh`: deletions missed while not
    watching first, then additions and changes (by resourceVersion)."""
    events = [("DELETED", obj) for k, obj in old.items() if k not in fresh]
    for k, obj in fresh.items():
        prev = old.get(k)
        if prev is None:
            events.append(("ADDED", obj))
        elif prev["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
            events.append(("MODIFIED", obj))
    return events


class _Expired(Exception):
    pass


class LabelIndex:
    """Cached objects grouped by (namespace, value of one label). A controller asks for one
    group's children on every reconcile; scanning the whole cache each time made reconciles
    O(objects), and converging N groups O(N^2)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._buckets: dict[tuple[str, str], dict[str, Obj]] = {}

    def _bucket_of(self, obj: Obj) -> tuple[str, str] | None:
        md = obj["metadata"]
        value = (md.get("labels") or {}).get(self.label)
        return None if value is None else (md.get("namespace", ""), value)

    def add(self, key: str, obj: Obj) -> None:
        """Index `obj` under `key` (its previous version must have been removed)."""
        bucket = self._bucket_of(obj)
        if bucket is not None:
            self._buckets.setdefault(bucket, {})[key] = obj

    def remove(self, key: str, obj: Obj) -> None:
        """Drop `obj`, indexed under `key`."""
        bucket = self._bucket_of(obj)
        found = self._buckets.get(bucket) if bucket is not None else None
        if found is not None:
            found.pop(key, None)
            if not found:
                del self._buckets[bucket]  # type: ignore[arg-type]

    def get(self, namespace: str, value: str) -> list[Obj]:
        """The objects in `namespace` whose label is `value`."""
        return list(self._buckets.get((namespace, value), {}).values())


class Informer:
    """Cache of one resource kind in one namespace (or all), with event handlers."""

    def __init__(
        self,
        api: KubeApi,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        watch_timeout: int = 300,
        inactivity: float = 120.0,
        index_label: str | None = None,
    ) -> None:
        self.api, self.res = api, res
        self.namespace, self.label_selector = namespace, label_selector
        self.watch_timeout = watch_timeout
        self.inactivity = inactivity
        self.store: dict[str, Obj] = {}
        self._index = LabelIndex(index_label) if index_label else None
        self.synced = asyncio.Event()
        self._handlers: list[Handler] = []
        self._rv = ""

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.store.get(f"{namespace}/{name}")

    def list(self, namespace: str | None = None, labels: dict[str, str] | None = None) -> list[Obj]:
        """Cached objects, optionally filtered by namespace and exact label matches."""
        candidates: Any = self.store.values()
        if self._index is not None and namespace is not None and labels and self._index.label in labels:
            candidates = self._index.get(namespace, labels[self._index.label])
        out = []
        for obj in candidates:
            md = obj["metadata"]
            if namespace is not None and md.get("namespace") != namespace:
                continue
            if labels and any((md.get("labels") or {}).get(k) != v for k, v in labels.items()):
                continue
            out.append(obj)
        return out

    def _emit(self, etype: str, obj: Obj) -> None:
        for h in self._handlers:
            try:
                h(etype, obj)
            except Exception:
                log.exception("informer %s: handler failed on %s %s", self.res.plural, etype, key_of(obj))

    async def _relist(self, reason: str) -> None:
        items, rv = await self.api.list(self.res, self.namespace, self.label_selector)
        RELISTS.labels(self.res.plural, reason).inc()
        fresh = {key_of(o): strip(o) for o in items}
        old = self.store
        self.store = fresh
        if self._index is not None:
            self._index = LabelIndex(self._index.label)
            for k, o in fresh.items():
                self._index.add(k, o)
        self._rv = rv
        for etype, obj in relist_events(old, fresh):
            self._emit(etype, obj)
        self.synced.set()

    async def _events(self) -> AsyncIterator[Obj]:
        stream = self.api.watch(
            self.res, self._rv, self.namespace, self.label_selector, timeout_seconds=self.watch_timeout
        )
        it = stream.__aiter__()
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow a cancellation
                    # that lands as the next event arrives, and the informer outlived shutdown.
                    async with asyncio.timeout(self.inactivity):
                        ev = await it.__anext__()
                except StopAsyncIteration:
                    return  # the server ended the watch (timeoutSeconds): resume from _rv
                except TimeoutError:
                    log.warning(
                        "informer %s: watch silent for %.0fs; reconnecting", self.res.plural, self.inactivity
                    )
                    return
                yield ev
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _watch_once(self) -> None:
        try:
            await self._consume_watch()
        except ApiError as e:
            if e.code == 410:  # the watch request itself was refused as too old
                raise _Expired from e
            raise

    async def _consume_watch(self) -> None:
        async for ev in self._events():
            etype, obj = ev.get("type"), ev.get("object") or {}
            if etype == "ERROR":
                if obj.get("code") == 410 or obj.get("reason") in ("Expired", "Gone"):
                    raise _Expired
                raise ApiError(obj.get("code", 500), obj.get("reason", ""), obj.get("message", ""))
            rv = obj.get("metadata", {}).get("resourceVersion")
            if rv:
                self._rv = rv
            if etype == "BOOKMARK":
                continue
            obj = strip(obj)
            k = key_of(obj)
            prev = self.store.get(k)
            if etype == "DELETED":
                self.store.pop(k, None)
            else:
                self.store[k] = obj
            if self._index is not None:
                if prev is not None:
                    self._index.remove(k, prev)  # its labels may have changed
                if etype != "DELETED":
                    self._index.add(k, obj)
            self._emit(str(etype), obj)

    async def run(self, resume: bool = False) -> None:
        """List, then watch forever; relist on 410 and back off on errors. Cancel to stop.

        `resume=True` skips the initial list and watches on from the cache's resourceVersion
        (after a restart of the watch loop with a warm cache).
        """
        delay = 0.5
        need_list = not resume
        reason = "initial"
        while True:
            try:
                if need_list:
                    await self._relist(reason)
                    need_list = False
                started = time.monotonic()
                await self._watch_once()
                if time.monotonic() - started >= _SHORT_WATCH_S:
                    delay = 0.5
                else:
                    # A watch that ends cleanly at once, again and again (a proxy or server closing
                    # it), must not turn into a busy loop of watch requests.
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, 30.0)
            except _Expired:
                need_list, reason = True, "expired"
            except Exception as e:  # CancelledError is not an Exception: cancelling still stops us
                log.warning("informer %s: %r; retrying in %.1fs", self.res.plural, e, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30.0)
                need_list, reason = True, "error"
