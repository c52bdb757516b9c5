"""Event deduplication: a repeat of an unchanged state is dropped, a new transition never is."""

from __future__ import annotations

from typing import Any

import pytest

from pdorch.controller import events as ev
from pdorch.controller.events import EventRecorder

pytestmark = pytest.mark.unit

OBJ = {"metadata": {"name": "g", "namespace": "ns", "uid": "u1"}}


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(ev.time, "monotonic", c)
    return c


def _rec(**kw: Any) -> EventRecorder:
    return EventRecorder(None, "test", **kw)  # type: ignore[arg-type]  # is_repeat never calls the API


def test_a_condition_that_flips_back_and_again_is_reported_every_time(clock: _Clock) -> None:
    rec = _rec()
    down = ("Warning", "RoleNotReady", "Available is now False", "Available")
    up = ("Normal", "AllRolesReady", "Available is now True", "Available")
    assert not rec.is_repeat(OBJ, *down)
    # The same flip computed again from a status cache older than our write: a true repeat.
    assert rec.is_repeat(OBJ, *down)
    clock.t += 30
    assert not rec.is_repeat(OBJ, *up)
    clock.t += 30
    # A second outage within the old 10-minute window: a new transition, reported.
    assert not rec.is_repeat(OBJ, *down)
    # Another group's flip is its own.
    assert not rec.is_repeat({"metadata": {"name": "h", "uid": "u2"}}, *up)


def test_a_second_rollout_reports_its_stall_again(clock: _Clock) -> None:
    rec = _rec()
    stalled = ("Warning", "ProgressDeadlineExceeded", "RolloutStalled is now True", "RolloutStalled")
    assert not rec.is_repeat(OBJ, *stalled)
    assert not rec.is_repeat(OBJ, "Normal", "NoRollout", "RolloutStalled is now False", "RolloutStalled")
    clock.t += 60
    assert not rec.is_repeat(OBJ, *stalled)


def test_events_without_a_series_are_deduplicated_only_briefly(clock: _Clock) -> None:
    rec = _rec(repeat_window=10.0)
    created = ("Normal", "Created", "created LeaderWorkerSet/g-decode", None)
    assert not rec.is_repeat(OBJ, *created)
    clock.t += 1
    assert rec.is_repeat(OBJ, *created)
    # Deleted by hand and created again a minute later: a new action, reported.
    clock.t += 60
    assert not rec.is_repeat(OBJ, *created)


def test_ttl_zero_deduplicates_nothing(clock: _Clock) -> None:
    rec = _rec(ttl=0.0)
    for series in ("S", None):
        assert not rec.is_repeat(OBJ, "Normal", "ScaledUp", "2 -> 3", series)
        assert not rec.is_repeat(OBJ, "Normal", "ScaledUp", "2 -> 3", series)


class _Api:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.created.append(obj)
        return obj


async def test_each_event_sent_is_logged_and_names_its_reporter(caplog: pytest.LogCaptureFixture) -> None:
    """The log tells what `kubectl describe` does (it was silent after "became leader"); a repeat
    is neither sent nor logged. The scaler's events name it, not the controller."""
    api = _Api()
    rec = EventRecorder(api, "scaler-0", controller=ev.SCALER_REPORTING_CONTROLLER)  # type: ignore[arg-type]
    sg = {**OBJ, "kind": "ServingGroup"}
    with caplog.at_level("INFO", logger="pdorch.controller.events"):
        await rec.emit(sg, "Warning", "Reverted", "put back LeaderWorkerSet/g-decode")
        await rec.emit(sg, "Warning", "Reverted", "put back LeaderWorkerSet/g-decode")
        await rec.emit(sg, "Normal", "Created", "created LeaderWorkerSet/g-prefill")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "ServingGroup ns/g: Reverted: put back LeaderWorkerSet/g-decode"),
        ("INFO", "ServingGroup ns/g: Created: created LeaderWorkerSet/g-prefill"),
    ]
    assert len(api.created) == 2
    assert {(e["reportingController"], e["reportingInstance"]) for e in api.created} == {
        ("pdorch.io/scaler", "scaler-0")
    }


async def test_a_flip_reported_again_with_other_counts_is_a_repeat_and_notes_fit_in_1024_bytes() -> None:
    """helper-74 R4: the note of a condition flip carries its message (live counts): the same flip
    re-read from a stale cache must still be dropped. Notes are cut to the API's 1024 bytes."""
    api = _Api()
    rec = EventRecorder(api, "ctl")  # type: ignore[arg-type]
    head = "RolloutStalled is now True"
    await rec.emit(OBJ, "Warning", "Stall", f"{head}: prefill 1/2", series="RolloutStalled", same_as=head)
    await rec.emit(OBJ, "Warning", "Stall", f"{head}: prefill 2/2", series="RolloutStalled", same_as=head)
    assert len(api.created) == 1
    await rec.emit(OBJ, "Warning", "Wide", "é" * 1000)
    assert len(api.created[-1]["note"].encode()) <= 1024 and api.created[-1]["note"] == "é" * 512
