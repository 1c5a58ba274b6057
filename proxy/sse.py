"""Server-sent events on bytes: an incremental decoder and the ``[DONE]`` watch; pure.

Lines are split on bytes (CR, LF or CRLF) before any UTF-8 decoding, so a multi-byte
character that straddles two network reads is never cut. Only field names are compared;
payloads stay bytes until the caller parses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

DONE = b"[DONE]"


@dataclass(frozen=True, slots=True)
class Event:
    data: bytes
    event: bytes = b""


class SSEDecoder:
    """Feed bytes as they arrive; get back every event completed by them.

    Follows the WHATWG event-stream rules that matter here: ``data`` lines of one event are
    joined with LF, a blank line dispatches, comment lines (``:``) are ignored, one space
    after the colon is dropped, and an event with no data is not dispatched.
    """

    __slots__ = ("_buffer", "_data", "_event", "_has_data", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[bytes] = []
        self._event = b""
        self._has_data = False
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        if not chunk:
            return events  # an empty read must not forget a CR that ended the previous one
        if self._pending_cr:
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]  # the LF of a CRLF split across two reads
        buffer = self._buffer
        scan = len(buffer)  # what earlier reads left in the buffer holds no line end
        buffer += chunk
        length = len(buffer)
        start = 0
        # Each line end is searched for once: rescanning the rest of the buffer for every
        # line would make a large capture quadratic to decode.
        cr = buffer.find(b"\r", scan)
        lf = buffer.find(b"\n", scan)
        while cr != -1 or lf != -1:
            if cr == -1 or (lf != -1 and lf < cr):
                end, next_start = lf, lf + 1
            elif cr + 1 < length:
                end = cr
                next_start = cr + 2 if buffer[cr + 1] == 0x0A else cr + 1
            else:
                end, next_start = cr, cr + 1
                self._pending_cr = True
            self._line(bytes(buffer[start:end]), events)
            start = next_start
            if cr != -1 and cr < start:
                cr = buffer.find(b"\r", start)
            if lf != -1 and lf < start:
                lf = buffer.find(b"\n", start)
        del buffer[:start]
        return events

    def finish(self) -> list[Event]:
        """End of stream: an unterminated last line and event still count (lenient, as SDKs are)."""
        events: list[Event] = []
        self._pending_cr = False
        if self._buffer:
            self._line(bytes(self._buffer), events)
            self._buffer.clear()
        self._dispatch(events)
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(b":"):
            return
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._has_data = True
        elif name == b"event":
            self._event = value

    def _dispatch(self, events: list[Event]) -> None:
        if self._has_data:
            events.append(Event(b"\n".join(self._data), self._event))
        self._data = []
        self._event = b""
        self._has_data = False


def decode_events(chunks: Iterable[bytes]) -> Iterator[Event]:
    """Every event in a stream given as any split of its bytes."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.finish()


def decode_stream(stream: bytes) -> list[Event]:
    """Every event of a whole captured stream; the same events as ``decode_events``.

    Streams with LF line ends only (nearly all) are split in one C call instead of being
    scanned line by line, which is much faster on a long stream.
    """
    if b"\r" in stream:
        return list(decode_events((stream,)))
    decoder = SSEDecoder()
    events: list[Event] = []
    lines = stream.split(b"\n")
    last = lines.pop()  # after the final LF: an unterminated line, or b""
    for line in lines:
        decoder._line(line, events)
    if last:
        decoder._line(last, events)
    events.extend(decoder.finish())
    return events


def event_data(stream: bytes) -> list[bytes]:
    """The data of every event of a whole captured stream; ``decode_stream``'s, faster.

    What nearly every upstream sends (LF line ends, each event one ``data: `` line and a
    blank line) is cut apart by a few C calls: when the only line ends in the stream are
    the two after each event, splitting on ``\\n\\ndata: `` finds every event. Anything
    else (comments, ``event:`` lines, multi-line data, CR, a cut-off end) goes through the
    full decoder.
    """
    if stream.startswith(b"data: ") and stream.endswith(b"\n\n") and b"\r" not in stream:
        data = stream[6:-2].split(b"\n\ndata: ")
        if stream.count(b"\n") == 2 * len(data):
            return data
    return [event.data for event in decode_stream(stream)]


class DoneWatch:
    """Tells, read by read and without parsing, whether the ``[DONE]`` marker may have arrived.

    Keeps the last few bytes of the previous read so a marker split across two reads is seen
    in the read that completes it; that read is the one to hold back until the capture is
    committed, because it carries the end of the final event. A hit is only a candidate (the
    text could sit inside a JSON string); the caller confirms it by decoding the capture.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def seen_in(self, chunk: bytes) -> bool:
        keep = len(DONE) - 1
        found = DONE in chunk or DONE in self._tail + chunk[:keep]
        self._tail = (self._tail + chunk)[-keep:] if len(chunk) < keep else chunk[-keep:]
        return found


# The final event is short; decoding only the capture's tail keeps this check O(1) per stream.
# A window that starts mid-line makes that first line an unknown field, which SSE ignores.
_TAIL = 512


def ends_with_done(capture: bytes) -> bool:
    """True when the last event of the captured stream is ``data: [DONE]``."""
    events = decode_stream(capture[-_TAIL:])
    return bool(events) and events[-1].data.strip() == DONE
