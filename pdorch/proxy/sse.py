"""Cutting a relayed SSE byte stream at event boundaries, without parsing it.

A decode that dies inside an event used to leave half an event on the client's stream; closing it
with a blank line made the client parse half a JSON object (and never reach the proxy's error
event). The relay therefore forwards only whole events and holds the bytes after the last event
boundary until the rest of their event arrives. The cost on the hot path is one search from the end
of each chunk: engines write whole events, so a chunk usually ends on a boundary and is forwarded
as it is.
"""

from __future__ import annotations

# Above this many held bytes (an engine streaming something without event boundaries), the held
# bytes are forwarded as they are rather than kept without bound.
MAX_HELD_BYTES = 16 * 1024 * 1024


def complete_events(data: bytes) -> int:
    """How many leading bytes of ``data`` are whole SSE events: up to and including its last blank
    line. Engines end events with "\\n\\n"; "\\r\\n\\r\\n" is searched only in data without that."""
    end = data.rfind(b"\n\n")
    if end >= 0:
        return end + 2
    end = data.rfind(b"\r\n\r\n")
    return end + 4 if end >= 0 else 0


class EventAligner:
    """Turns upstream chunks into writes that end on event boundaries.

    `feed` returns what may be sent now (possibly nothing); `rest` what is still held, for a stream
    that ended normally (a failed one drops it and sends its error event on a boundary).
    """

    __slots__ = ("_held", "_size")

    def __init__(self) -> None:
        self._held: list[bytes] = []
        self._size = 0

    @property
    def holding(self) -> bool:
        """Whether part of an event is held back."""
        return self._size > 0

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk`` (and of what was held) that complete events; holds the rest."""
        cut = complete_events(chunk)
        if not self._held:
            if cut == len(chunk):  # the usual case: no copy
                return chunk
            if cut:
                self._held.append(chunk[cut:])
                self._size = len(chunk) - cut
                return chunk[:cut]
            self._held.append(chunk)
            self._size = len(chunk)
            return self._flush_if_too_big()
        if cut == 0:
            # A boundary may straddle the previous reads and this one ("...\n" + "\n..."; with
            # "\r\n\r\n", over pieces shorter than the window).
            window = self._tail(3)
            straddle = complete_events(window + chunk[:3])
            cut = straddle - len(window) if straddle > len(window) else 0
        if cut == 0:
            self._held.append(chunk)
            self._size += len(chunk)
            return self._flush_if_too_big()
        self._held.append(chunk[:cut])
        out = b"".join(self._held)
        self._held = [chunk[cut:]] if cut < len(chunk) else []
        self._size = len(chunk) - cut
        return out

    def _tail(self, n: int) -> bytes:
        """The last `n` held bytes, across pieces."""
        tail = b""
        for piece in reversed(self._held):
            tail = piece[-(n - len(tail)) :] + tail
            if len(tail) >= n:
                break
        return tail

    def rest(self) -> bytes:
        """Everything held (and forget it)."""
        out = b"".join(self._held)
        self._held, self._size = [], 0
        return out

    def _flush_if_too_big(self) -> bytes:
        return self.rest() if self._size > MAX_HELD_BYTES else b""
