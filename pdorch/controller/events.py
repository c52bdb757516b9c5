"""Kubernetes Events (events.k8s.io/v1) for transitions, deduplicated and best-effort.

Events are for humans running `kubectl describe`; a failure to write one never fails a reconcile.
Only true repeats are dropped: an event of a `series` (e.g. one condition's transitions) is dropped
when it equals the last one sent for that object and series (a pass that read a status cache older
than its own write reports the same transition again), so a flip back and a second flip are both
sent; an event without a series is dropped only when the same one was sent within `repeat_window`.
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
# The autoscaler's events (on ServingRoleScalers), so `kubectl describe` points at its log, not the
# controller's.
SCALER_REPORTING_CONTROLLER = "pdorch.io/scaler"
FLUSH_SECONDS = 5.0


class EventRecorder:
    """Writes events; `ttl` bounds how long a series' last event is remembered (0: no dedup)."""

    def __init__(
        self,
        api: KubeApi,
        instance: str,
        ttl: float = 600.0,
        repeat_window: float = 10.0,
        controller: str = REPORTING_CONTROLLER,
    ) -> None:
        self.api, self.instance, self.ttl, self.controller = api, instance, ttl, controller
        self.repeat_window = min(repeat_window, ttl)
        # (object, series) -> (what was sent, when); events without a series use (object, reason, note).
        self._last: dict[tuple[str, ...], tuple[tuple[str, str, str], float]] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def emit_soon(
        self,
        obj: dict[str, Any],
        etype: str,
        reason: str,
        note: str,
        action: str = "Reconcile",
        series: str | None = None,
        same_as: str | None = None,
    ) -> None:
        """Record an event without making the reconcile wait for the API round trip."""
        task = asyncio.get_running_loop().create_task(
            self.emit(obj, etype, reason, note, action, series, same_as)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait (at most FLUSH_SECONDS) for events still being sent, e.g. on shutdown."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=FLUSH_SECONDS)

    async def emit(
        self,
        obj: dict[str, Any],
        etype: str,
        reason: str,
        note: str,
        action: str = "Reconcile",
        series: str | None = None,
        same_as: str | None = None,
    ) -> None:
        """Record an event about `obj` (Normal or Warning), unless it repeats (see the module doc).
        `same_as`: what tells a repeat instead of the note (a condition flip's "X is now Y", whose
        note also carries a message with live counts)."""
        if self.is_repeat(obj, etype, reason, note if same_as is None else same_as, series):
            return
        md = obj["metadata"]
        # The log tells the same story as `kubectl describe` (at INFO it said nothing after
        # "became leader", through recreated objects, reverts and stalls).
        log.log(
            logging.WARNING if etype == "Warning" else logging.INFO,
            "%s %s/%s: %s: %s",
            obj.get("kind"),
            md.get("namespace", ""),
            md["name"],
            reason,
            note,
        )
        event = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": f"{md['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": md.get("namespace", "default"),
            },
            "eventTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": self.controller,
            "reportingInstance": self.instance[:128],
            "action": action,
            "reason": reason,
            # The API's limit is 1024 bytes, not characters.
            "note": note.encode()[:1024].decode(errors="ignore"),
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

    def is_repeat(self, obj: dict[str, Any], etype: str, reason: str, note: str, series: str | None) -> bool:
        """Whether this event repeats the last one of its series (or, without a series, one sent
        within `repeat_window`); records it as the last one when it does not."""
        md = obj["metadata"]
        uid = str(md.get("uid") or md["name"])
        now = time.monotonic()
        key: tuple[str, ...] = (uid, series) if series is not None else (uid, "", reason, note)
        window = self.ttl if series is not None else self.repeat_window
        sent = (etype, reason, note)
        last = self._last.get(key)
        if last is not None and last[0] == sent and now - last[1] < window:
            return True
        if len(self._last) > 1024:
            self._last = {k: v for k, v in self._last.items() if now - v[1] < self.ttl}
        self._last[key] = (sent, now)
        return False
