"""The relay's SSE event alignment: only whole events go out, whatever the upstream's read sizes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdorch.proxy import sse
from pdorch.proxy.sse import EventAligner, complete_events

pytestmark = pytest.mark.unit

EV = b'data: {"choices":[{"index":0,"text":" a"}]}\n\n'


def test_complete_events_is_the_end_of_the_last_blank_line() -> None:
    assert complete_events(EV) == len(EV)
    assert complete_events(EV + EV[:10]) == len(EV)
    assert complete_events(EV[:10]) == 0
    assert complete_events(b"data: x\r\n\r\ndata: y") == len(b"data: x\r\n\r\n")


def test_a_chunk_ending_on_a_boundary_is_passed_through_uncopied() -> None:
    chunk = EV * 3
    assert EventAligner().feed(chunk) is chunk


def test_half_an_event_is_held_until_its_end_arrives() -> None:
    a = EventAligner()
    assert a.feed(EV + EV[:20]) == EV
    assert a.holding
    assert a.feed(EV[20:30]) == b""
    assert a.feed(EV[30:] + EV) == EV + EV
    assert not a.holding


def test_a_cut_off_stream_leaves_the_half_event_held_not_sent() -> None:
    """What the relay does when the engine dies mid-event: what went out parses, event by event."""
    a = EventAligner()
    sent = a.feed(EV) + a.feed(EV[:40])
    assert sent == EV
    assert a.rest() == EV[:40]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_blank_line_split_across_reads_is_found(split: int) -> None:
    for sep in (b"\n\n", b"\r\n\r\n"):
        ev = b"data: 1" + sep
        a = EventAligner()
        cut = len(ev) - min(split, len(sep) - 1)
        assert a.feed(ev[:cut]) == b""
        assert a.feed(ev[cut:] + b"data: 2") == ev  # not held back until the next event's end
        assert a.rest() == b"data: 2"


def test_a_stream_without_boundaries_is_not_held_without_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_HELD_BYTES", 100)
    a = EventAligner()
    assert a.feed(b"x" * 60) == b""
    assert a.feed(b"x" * 60) == b"x" * 120
    assert not a.holding


@given(st.lists(st.integers(min_value=0, max_value=len(EV) * 4), max_size=12))
def test_any_split_sends_whole_events_in_order(cuts: list[int]) -> None:
    stream = EV * 3 + b"data: [DONE]\n\n" + b"data: {trunc"
    points = sorted({0, len(stream), *(min(c, len(stream)) for c in cuts)})
    a = EventAligner()
    sent = b""
    for lo, hi in itertools.pairwise(points):
        out = a.feed(stream[lo:hi])
        assert complete_events(out) == len(out)  # every write ends on a boundary
        sent += out
    assert sent == EV * 3 + b"data: [DONE]\n\n"
    assert a.rest() == b"data: {trunc"


@given(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=30))
def test_crlf_events_split_into_tiny_pieces_are_sent_as_soon_as_whole(sizes: list[int]) -> None:
    """helper-74: a "\\r\\n\\r\\n" split over three reads with a 1-2 byte middle piece was missed
    (the window looked at the last piece only), so the event waited for the next boundary."""
    ev = b"data: 1\r\n\r\n"
    stream = ev * 3
    a, sent, i = EventAligner(), b"", 0
    for n in itertools.cycle(sizes):
        if i >= len(stream):
            break
        sent += a.feed(stream[i : i + n])
        i += n
        assert len(sent) == complete_events(stream[:i]), (sizes, i)  # nothing whole is held
    assert sent == stream and not a.holding
