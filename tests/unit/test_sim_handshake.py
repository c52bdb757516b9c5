"""vLLM NIXL parameter shapes and SGLang bootstrap room bookkeeping."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from pdorch.sim import bootstrap, nixl
from pdorch.sim.bootstrap import BootstrapError, Rendezvous

pytestmark = pytest.mark.unit

VALID = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[1, 2]],
    "remote_engine_id": "e",
    "remote_request_id": "r",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
}


def test_prefill_response_params_shape() -> None:
    p = nixl.prefill_response_params(engine_id="e", request_id="r", host="127.1.0.5", block_ids=[4, 5, 6])
    assert p == {**VALID, "remote_block_ids": [[4, 5, 6]], "remote_host": "127.1.0.5"}
    assert nixl.is_valid_remote_prefill(p)


def test_router_prefill_request_params() -> None:
    sent = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    assert nixl.wants_remote_decode(sent)
    assert not nixl.is_valid_remote_prefill(sent)
    assert not nixl.wants_remote_decode({"do_remote_decode": "true"})


@pytest.mark.parametrize("missing", nixl.REQUIRED_DECODE_FIELDS)
def test_decode_params_missing_field_is_invalid(missing: str) -> None:
    assert not nixl.is_valid_remote_prefill({**VALID, missing: None})


def test_block_counting_flat_and_grouped() -> None:
    assert nixl.count_blocks([1, 2, 3]) == 3
    assert nixl.count_blocks([[1, 2], [3]]) == 3
    assert nixl.count_blocks([[]]) == 0
    assert not nixl.is_valid_remote_prefill({**VALID, "remote_block_ids": [[]]})
    assert not nixl.is_valid_remote_prefill({**VALID, "do_remote_prefill": False})


def test_parse_room_key() -> None:
    assert bootstrap.parse_key({}) is None
    body = {"bootstrap_host": "[::1]", "bootstrap_port": 8998, "bootstrap_room": 2**63 - 1}
    assert bootstrap.parse_key(body) == ("::1", 8998, 2**63 - 1)
    with pytest.raises(ValueError):
        bootstrap.parse_key({"bootstrap_host": "h", "bootstrap_room": -1})
    with pytest.raises(ValueError):
        bootstrap.parse_key({"bootstrap_host": "h", "bootstrap_port": "x", "bootstrap_room": 1})
    # sglang-router sends null for a prefill registered without one: the server's own port (8998
    # by default), not port 0.
    unset = {"bootstrap_host": "h", "bootstrap_port": None, "bootstrap_room": 1}
    assert bootstrap.parse_key(unset) == ("h", 8998, 1)
    assert bootstrap.parse_key(unset, 9100) == ("h", 9100, 1)


async def test_rendezvous_duplicates_and_completion() -> None:
    rv = Rendezvous()
    key = ("127.0.0.1", 1, 42)
    room = rv.register_prefill(key)
    with pytest.raises(BootstrapError):
        rv.register_prefill(key)
    assert not room.decode_connected.is_set()
    rv.register_decode(key)
    assert room.decode_connected.is_set()
    with pytest.raises(BootstrapError):
        rv.register_decode(key)
    waiter = asyncio.create_task(rv.wait_prefill(key, 5.0))
    rv.finish(key)
    await asyncio.wait_for(waiter, 5.0)
    assert room.status == "done"


async def test_rendezvous_failure_propagates_to_decode() -> None:
    rv = Rendezvous()
    key = ("h", 1, 7)
    rv.register_decode(key)  # decode may arrive first
    rv.register_prefill(key)
    rv.finish(key, "prefill aborted")
    with pytest.raises(BootstrapError, match="prefill aborted"):
        await rv.wait_prefill(key, 5.0)
    with pytest.raises(BootstrapError, match="timed out"):
        await rv.wait_prefill(("h", 1, 8), 0.01)


async def test_ended_rooms_refuse_reuse_until_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    rv = Rendezvous()
    ended, failed = ("h", 1, 1), ("h", 1, 2)
    room = rv.register_prefill(ended)
    waiting = room.prefill_done  # the event a decode already waits on
    rv.register_decode(ended)
    decode = asyncio.create_task(rv.wait_prefill(ended, 5.0))
    await asyncio.sleep(0)
    rv.finish(ended)
    await asyncio.wait_for(decode, 1.0)  # woken by the room's own event before it was swapped
    assert waiting.is_set() and room.status == "done"
    # An ended room no longer carries events of its own (thousands are kept for the duplicate check),
    # and every room that ended well is kept as one shared object, not one per request.
    assert room.prefill_done is not waiting
    other = ("h", 1, 9)
    rv.register_prefill(other)
    rv.register_decode(other)
    rv.finish(other)
    assert rv.rooms[other] is rv.rooms[ended] and rv.rooms[ended] is not room
    assert rv.rooms[other].status == "done"
    with pytest.raises(BootstrapError, match="duplicate"):
        rv.register_prefill(ended)
    with pytest.raises(BootstrapError, match="duplicate"):
        rv.register_decode(ended)
    # A decode arriving after its prefill failed gets the failure at once.
    rv.register_prefill(failed)
    rv.finish(failed, "bootstrap timed out")
    assert rv.register_decode(failed).status == "failed"
    with pytest.raises(BootstrapError, match="bootstrap timed out"):
        await rv.wait_prefill(failed, 5.0)
    # Rooms are forgotten ROOM_RETENTION_S after they ended, swept when a later room ends.
    later = time.monotonic() + bootstrap.ROOM_RETENTION_S
    monkeypatch.setattr(bootstrap, "time", SimpleNamespace(monotonic=lambda: later))
    pending = ("h", 1, 4)
    rv.register_prefill(pending)
    rv.register_prefill(("h", 1, 3))
    rv.finish(("h", 1, 3))
    rv.finish(("h", 1, 3))  # a second finish changes nothing
    assert ended not in rv.rooms and failed not in rv.rooms
    assert ("h", 1, 3) in rv.rooms and pending in rv.rooms
    rv.register_prefill(ended)  # a forgotten room may be used again


async def test_rooms_no_prefill_claims_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    rv = Rendezvous()
    # In process: the decode's own wait ending (timeout or cancel) forgets its unclaimed room.
    orphan, left = ("h", 1, 1), ("h", 1, 2)
    rv.register_decode(orphan)  # its prefill failed before it reached the prefill server
    with pytest.raises(BootstrapError, match="timed out"):
        await rv.wait_prefill(orphan, 0.01)
    assert orphan not in rv.rooms
    rv.register_decode(left)
    waiter = asyncio.create_task(rv.wait_prefill(left, 5.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert left not in rv.rooms
    # A claimed room is left to `finish`, whatever the decode's wait does.
    claimed = ("h", 1, 3)
    rv.register_decode(claimed)
    rv.register_prefill(claimed)
    with pytest.raises(BootstrapError, match="timed out"):
        await rv.wait_prefill(claimed, 0.01)
    assert claimed in rv.rooms

    # Over the WebSocket the decode waits elsewhere: its room is kept past that wait, then swept.
    now = [time.monotonic()]
    monkeypatch.setattr(bootstrap, "time", SimpleNamespace(monotonic=lambda: now[0]))
    remote, reused = ("h", 1, 4), ("h", 1, 5)
    rv.register_decode(remote, remote_wait_s=900.0)
    rv.register_decode(reused, remote_wait_s=0.0)  # kept UNCLAIMED_ROOM_S at least
    rv.register_prefill(reused)
    rv.finish(reused)
    now[0] += bootstrap.ROOM_RETENTION_S
    rv.register_decode(("h", 1, 99))  # any later rendezvous sweeps: the ended room is forgotten...
    assert reused not in rv.rooms
    rv.register_decode(reused, remote_wait_s=0.0)  # ...and its key is used again by a new decode
    now[0] += bootstrap.UNCLAIMED_ROOM_S - bootstrap.ROOM_RETENTION_S
    rv.register_decode(("h", 1, 6))
    assert remote in rv.rooms  # its decode may still be waiting (900 s)
    assert reused in rv.rooms  # the first use's deadline passed, not the new room's
    now[0] += bootstrap.ROOM_RETENTION_S  # the new room's own deadline
    rv.register_decode(("h", 1, 7))
    assert reused not in rv.rooms and remote in rv.rooms
    now[0] += 960.0 - bootstrap.UNCLAIMED_ROOM_S - bootstrap.ROOM_RETENTION_S  # the 900 s wait + 60 s
    rv.register_decode(("h", 1, 8))
    assert remote not in rv.rooms
