"""Kubernetes Events (events.k8s.io/v1) for transitions, deduplicated and best-effort.

Events are for humans running `kubectl describe`; a failure to write one never fails a reconcile,
and the same (object, reason, note) is not repeated within `ttl` seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from typing import Any

from pdorch.controller.kubeapi import KubeApi

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "pdorch.io/controller"
FLUSH_SECONDS = 5.0


class EventRecorder:
    def __init__(self, api: KubeApi, instance: str, ttl: float = 600.0) -> None:
        self.api, self.instance, self.ttl = api, instance, ttl
        self._seen: dict[tuple[str, str, str], float] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def emit_soon(
        self, obj: dict[str, Any], etype: str, reason: str, note: str, action: str = "Reconcile"
    ) -> None:
        """Record an event without making the reconcile wait for the API round trip."""
        task = asyncio.get_running_loop().create_task(self.emit(obj, etype, reason, note, action))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait (at most FLUSH_SECONDS) for events still being sent, e.g. on shutdown."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=FLUSH_SECONDS)

    async def emit(
        self, obj: dict[str, Any], etype: str, reason: str, note: str, action: str = "Reconcile"
    ) -> None:
        """Record an event about `obj` (Normal or Warning)."""
        md = obj["metadata"]
        key = (md.get("uid", md["name"]), reason, note)
        now = time.monotonic()
        if now - self._seen.get(key, -1e9) < self.ttl:
            return
        self._seen = {k: t for k, t in self._seen.items() if now - t < self.ttl}
        self._seen[key] = now
        event = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": f"{md['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": md.get("namespace", "default"),
            },
            "eventTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance[:128],
            "action": action,
            "reason": reason,
            "note": note[:1024],
            "type": etype,
            "regarding": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": md["name"],
                "namespace": md.get("namespace"),
                "uid": md.get("uid"),
            },
        }
        try:
            await self.api.create(event)
        except Exception as e:
            log.debug("event not recorded (%s %s): %r", reason, note, e)
