"""Unit tests for proxy.sse: the byte-level SSE decoder and the [DONE] watch."""

from __future__ import annotations

import random
from collections.abc import Iterable
from itertools import accumulate, pairwise

import orjson
import pytest

from proxy.sse import (
    DONE,
    DoneWatch,
    Event,
    SSEDecoder,
    decode_events,
    decode_stream,
    ends_with_done,
    event_data,
)


def decode(*chunks: bytes) -> list[Event]:
    """Every event of a stream given as the reads ``chunks``."""
    return list(decode_events(chunks))


def split_at(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``stream`` cut into reads at the (sorted, possibly repeated) offsets ``cuts``."""
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in pairwise(bounds)]


# A stream that uses every line ending, comments, event names, multi-line data, an event
# without data, unknown fields and multi-byte characters: the reference for the split tests.
MIXED_STREAM = (
    b": keep-alive comment\r\n"
    b'data: {"a": "caf\xc3\xa9"}\n'
    b"\n"
    b"event: ping\r"
    b"data:first\r"
    b"data: second\r"
    b"\r"
    b"id: 7\r\n"
    b"retry: 100\r\n"
    b"event: lonely\r\n"
    b"\r\n"
    b"data: \xf0\x9f\x98\x80 \xe4\xb8\xad\xe6\x96\x87\r\n"
    b": another comment\r\n"
    b"data\r\n"
    b"\r\n"
    b"data: [DONE]\n\n"
)
MIXED_EVENTS = [
    Event('{"a": "café"}'.encode()),
    Event(b"first\nsecond", b"ping"),
    Event("😀 中文\n".encode()),
    Event(b"[DONE]"),
]


# -- SSEDecoder / decode_events ----------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings(eol: bytes) -> None:
    stream = b"data: a" + eol + eol + b"data: b" + eol + b"data: c" + eol + eol
    assert decode(stream) == [Event(b"a"), Event(b"b\nc")]


def test_line_endings_mixed_in_one_stream() -> None:
    stream = b"data: a\r\n\ndata: b\r\rdata: c\n\r\n"
    assert decode(stream) == [Event(b"a"), Event(b"b"), Event(b"c")]


def test_cr_then_lf_is_one_line_end_not_two() -> None:
    # Two data lines with CRLF between them form one event, not two.
    assert decode(b"data: a\r\ndata: b\r\n\r\n") == [Event(b"a\nb")]


def test_lf_then_cr_is_two_line_ends() -> None:
    assert decode(b"data: a\n\rdata: b\n\n") == [Event(b"a"), Event(b"b")]


def test_crlf_split_between_two_feeds() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The LF completes the CRLF: no blank line, so the next data line joins the same event.
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [Event(b"a\nb")]
    assert decoder.feed(b"\n") == []
    assert decoder.finish() == []


def test_crlf_split_with_empty_reads_in_between() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\ndata: b\r\n\r\n") == [Event(b"a\nb")]


def test_lone_cr_at_end_of_read_followed_by_other_text() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [Event(b"a")]
    assert decoder.feed(b"data: b\r") == []
    assert decoder.feed(b"data: c\r\r") == [Event(b"b\nc")]


def test_comments_are_ignored() -> None:
    stream = b": hello\n\n:\n\ndata: a\n: inside an event\ndata: b\n\n: bye\n\n"
    assert decode(stream) == [Event(b"a\nb")]


def test_only_comments_dispatch_nothing() -> None:
    assert decode(b": keep-alive\n\n: keep-alive\r\n\r\n") == []


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b"data: x", b"x"),
        (b"data:x", b"x"),
        (b"data:  x", b" x"),  # only one space is dropped
        (b"data: x ", b"x "),  # trailing space kept
        (b"data:", b""),
        (b"data: ", b""),
        (b"data", b""),  # a field name alone has an empty value
        (b"data: a: b", b"a: b"),  # only the first colon separates
        (b"data:\tx", b"\tx"),  # only a space is dropped, not a tab
    ],
)
def test_data_field_value(line: bytes, data: bytes) -> None:
    assert decode(line + b"\n\n") == [Event(data)]


def test_multi_line_data_joined_by_lf() -> None:
    stream = b"data: a\ndata: b\ndata:\ndata: c\n\n"
    assert decode(stream) == [Event(b"a\nb\n\nc")]


def test_event_name() -> None:
    stream = b"event: ping\ndata: 1\n\ndata: 2\n\n"
    # The name belongs to one event only: the next one has none.
    assert decode(stream) == [Event(b"1", b"ping"), Event(b"2")]


def test_last_event_name_wins_and_may_follow_data() -> None:
    stream = b"event: a\ndata: 1\nevent: b\n\n"
    assert decode(stream) == [Event(b"1", b"b")]


def test_event_without_data_is_not_dispatched_and_forgets_its_name() -> None:
    stream = b"event: lonely\n\ndata: 2\n\n"
    assert decode(stream) == [Event(b"2")]


@pytest.mark.parametrize(
    "stream",
    [b"\n\n\n", b"event: x\n\n", b"id: 1\nretry: 5\n\n", b"foo: bar\n\n", b"Data: x\n\n", b""],
)
def test_nothing_dispatched_without_a_data_field(stream: bytes) -> None:
    assert decode(stream) == []


def test_unknown_fields_are_ignored() -> None:
    stream = b"id: 1\nretry: 3000\nfoo: bar\ndata: x\nbaz\n\n"
    assert decode(stream) == [Event(b"x")]


def test_events_completed_by_a_read_are_returned_by_that_read() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [Event(b"a")]
    assert decoder.feed(b"\ndata: c\n\ndata: d\n\n") == [Event(b"b"), Event(b"c"), Event(b"d")]
    assert decoder.finish() == []


@pytest.mark.parametrize(
    "stream",
    [b"data: a\n\ndata: tail", b"data: a\n\ndata: tail\n", b"data: a\n\ndata: tail\r"],
    ids=["unterminated-line", "unterminated-event-LF", "unterminated-event-CR"],
)
def test_trailing_unterminated_event_counts_at_finish(stream: bytes) -> None:
    decoder = SSEDecoder()
    assert decoder.feed(stream) == [Event(b"a")]
    assert decoder.finish() == [Event(b"tail")]
    assert decode(stream) == [Event(b"a"), Event(b"tail")]


def test_finish_on_an_empty_decoder() -> None:
    assert SSEDecoder().finish() == []


def test_finish_keeps_trailing_event_name() -> None:
    assert decode(b"event: end\ndata: x") == [Event(b"x", b"end")]


def test_decoder_after_finish_starts_afresh() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"event: e\ndata: a\r")
    assert decoder.finish() == [Event(b"a", b"e")]
    assert decoder.feed(b"\ndata: b\n\n") == [Event(b"b")]


def test_payload_stays_bytes_even_when_not_utf8() -> None:
    assert decode(b"data: \xff\xfe\n\n") == [Event(b"\xff\xfe")]


def test_decode_events_accepts_any_iterable_and_is_lazy() -> None:
    reads = iter([b"data: a\n\n", b"data: b\n\n"])
    events = decode_events(reads)
    assert next(events) == Event(b"a")
    assert next(events) == Event(b"b")
    assert list(events) == []


def test_mixed_stream_reference() -> None:
    assert decode(MIXED_STREAM) == MIXED_EVENTS


def test_every_split_point_gives_the_same_events() -> None:
    for cut in range(len(MIXED_STREAM) + 1):
        assert decode(*split_at(MIXED_STREAM, [cut])) == MIXED_EVENTS, cut


def test_every_pair_of_split_points_gives_the_same_events() -> None:
    size = len(MIXED_STREAM)
    for first in range(size + 1):
        for second in range(first, size + 1):
            reads = split_at(MIXED_STREAM, [first, second])
            assert decode(*reads) == MIXED_EVENTS, (first, second)


def test_one_byte_reads_give_the_same_events() -> None:
    reads = [MIXED_STREAM[i : i + 1] for i in range(len(MIXED_STREAM))]
    assert decode(*reads) == MIXED_EVENTS


@pytest.mark.parametrize("seed", range(20))
def test_random_partitions_give_the_same_events(seed: int) -> None:
    rng = random.Random(seed)
    cuts = [rng.randrange(len(MIXED_STREAM) + 1) for _ in range(rng.randrange(2, 30))]
    reads = split_at(MIXED_STREAM, cuts)  # repeated cuts give empty reads too
    assert decode(*reads) == MIXED_EVENTS, cuts


def test_events_returned_by_feed_and_finish_match_decode_events() -> None:
    decoder = SSEDecoder()
    events: list[Event] = []
    for read in split_at(MIXED_STREAM, [5, 40, 41, 90]):
        events += decoder.feed(read)
    events += decoder.finish()
    assert events == MIXED_EVENTS


@pytest.mark.parametrize("text", ["é", "😀", "中", "naïve 😀 日本語 ✓"])
def test_multi_byte_character_straddling_two_reads(text: str) -> None:
    payload = orjson.dumps({"content": text})
    stream = b"data: " + payload + b"\r\n\r\n"
    # Cut inside the first multi-byte character, at each of its inner byte boundaries.
    wide = next(char.encode() for char in text if len(char.encode()) > 1)
    start, width = stream.index(wide), len(wide)
    for inner in range(1, width):
        cut = start + inner
        head, tail = stream[:cut], stream[cut:]
        with pytest.raises(UnicodeDecodeError):
            head.decode("utf-8")  # the read alone really is cut inside the character
        (event,) = decode(head, tail)
        assert orjson.loads(event.data) == {"content": text}
        assert event.data.decode("utf-8") == payload.decode("utf-8")


def test_multi_byte_characters_at_every_split() -> None:
    text = "é😀中"
    stream = b"data: " + text.encode() + b"\n\n"
    for cut in range(len(stream) + 1):
        assert decode(*split_at(stream, [cut])) == [Event(text.encode())], cut


def test_a_large_capture_in_one_read() -> None:
    chunk = b'data: {"x": 1}\n\n'
    count = 20_000
    events = decode(chunk * count + b"data: [DONE]\n\n")
    assert len(events) == count + 1
    assert events[0] == Event(b'{"x": 1}')
    assert events[-1] == Event(DONE)


# -- DoneWatch -----------------------------------------------------------------------------------

CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[]}\n\n'
DONE_EVENT = b"data: [DONE]\n\n"


def test_done_marker_whole_in_one_read() -> None:
    watch = DoneWatch()
    assert watch.seen_in(CHUNK) is False
    assert watch.seen_in(CHUNK + DONE_EVENT) is True


def test_done_marker_alone_in_a_read() -> None:
    watch = DoneWatch()
    assert watch.seen_in(CHUNK) is False
    assert watch.seen_in(DONE) is True


@pytest.mark.parametrize("offset", range(1, len(DONE)))
def test_done_marker_split_across_two_reads(offset: int) -> None:
    stream = CHUNK + DONE_EVENT
    cut = len(CHUNK) + len(b"data: ") + offset
    watch = DoneWatch()
    assert watch.seen_in(stream[:cut]) is False
    assert watch.seen_in(stream[cut:]) is True


def test_done_marker_split_at_every_offset_of_the_stream() -> None:
    stream = CHUNK * 2 + DONE_EVENT
    marker_end = stream.index(DONE) + len(DONE)
    for cut in range(len(stream) + 1):
        watch = DoneWatch()
        first, second = watch.seen_in(stream[:cut]), watch.seen_in(stream[cut:])
        # Seen exactly once, in the read that completes the marker.
        assert (first, second) == (cut >= marker_end, cut < marker_end), cut


def test_done_marker_across_one_byte_reads() -> None:
    stream = CHUNK + DONE_EVENT
    marker_end = stream.index(DONE) + len(DONE)
    watch = DoneWatch()
    hits = [i for i in range(len(stream)) if watch.seen_in(stream[i : i + 1])]
    assert hits == [marker_end - 1]


@pytest.mark.parametrize("seed", range(10))
def test_done_marker_across_random_reads(seed: int) -> None:
    rng = random.Random(seed)
    stream = CHUNK + DONE_EVENT
    marker_end = stream.index(DONE) + len(DONE)
    cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randrange(2, 12)))
    reads = split_at(stream, cuts)
    watch = DoneWatch()
    hits = [i for i, read in enumerate(reads) if watch.seen_in(read)]
    # The first read that reaches the marker's end completes it.
    ends = accumulate(len(read) for read in reads)
    completing = next(i for i, end in enumerate(ends) if end >= marker_end)
    assert hits == [completing], cuts


def test_done_marker_split_with_empty_reads_between() -> None:
    watch = DoneWatch()
    assert watch.seen_in(b"data: [DO") is False
    assert watch.seen_in(b"") is False
    assert watch.seen_in(b"N") is False
    assert watch.seen_in(b"") is False
    assert watch.seen_in(b"E]\n\n") is True


@pytest.mark.parametrize(
    "reads",
    [
        [CHUNK, CHUNK],
        [b""],
        [b"data: [DONE", b"\n\n"],
        [b"data: [DON", b"E"],
        [b"data: DONE]\n\n"],
        [b"[done]"],
        [b"[DO", b"XNE]"],
    ],
)
def test_done_marker_absent(reads: list[bytes]) -> None:
    watch = DoneWatch()
    assert not any(watch.seen_in(read) for read in reads)


def test_done_marker_not_reported_again_by_later_reads() -> None:
    watch = DoneWatch()
    assert watch.seen_in(DONE_EVENT) is True
    assert watch.seen_in(b": trailing comment\n\n") is False
    assert watch.seen_in(b"") is False


# -- ends_with_done ------------------------------------------------------------------------------


def content_chunk(content: str) -> bytes:
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"delta": {"content": content}}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


@pytest.mark.parametrize(
    "capture",
    [
        CHUNK + DONE_EVENT,
        DONE_EVENT,
        CHUNK.replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n",
        CHUNK + b"data:[DONE]\r\r",
        CHUNK + DONE_EVENT + b": trailing comment\n\n",
        CHUNK + b"data: [DONE]",  # unterminated: counted at the end, as the decoder is lenient
        CHUNK + b"event: done\ndata: [DONE]\n\n",
    ],
)
def test_ends_with_done_true(capture: bytes) -> None:
    assert ends_with_done(capture) is True


@pytest.mark.parametrize(
    "capture",
    [
        b"",
        CHUNK,
        CHUNK + b"data: [DONE",
        DONE_EVENT + CHUNK,  # [DONE] is not the last event
        CHUNK + b": [DONE]\n\n",  # a comment, not an event
        CHUNK + b"event: [DONE]\n\n",  # a name without data
        CHUNK + b"data: [DONE] extra\n\n",
        CHUNK + content_chunk("data: [DONE]"),
        CHUNK + content_chunk("[DONE]"),
        CHUNK + content_chunk("data: [DONE]\n\n"),
    ],
)
def test_ends_with_done_false(capture: bytes) -> None:
    assert ends_with_done(capture) is False


def test_done_inside_content_is_a_candidate_but_not_the_end() -> None:
    capture = CHUNK + content_chunk("data: [DONE]")
    watch = DoneWatch()
    assert watch.seen_in(capture) is True  # only a candidate
    assert ends_with_done(capture) is False
    capture += DONE_EVENT
    assert watch.seen_in(DONE_EVENT) is True
    assert ends_with_done(capture) is True


@pytest.mark.parametrize(
    "stream",
    [
        b"",
        b"data: a\n\ndata: b\ndata: c\n\n: comment\nevent: x\ndata: d\n\ndata: [DONE]\n\n",
        b"data: unterminated",
        b"data: a\n\ndata: tail\n",
        b"data: a\r\n\r\ndata: b\r\rdata: c\n\n",
        "data: é😀中\n\n".encode(),
    ],
)
def test_decode_stream_matches_the_incremental_decoder(stream: bytes) -> None:
    assert decode_stream(stream) == list(decode_events((stream,)))


# -- event_data: the fast split of a whole capture ------------------------------------------

EVENT_DATA_STREAMS = [
    b"",
    b"data: a\n\n",
    b"data: \n\n",
    b"data: a\n\ndata: b\n\ndata: [DONE]\n\n",
    b"data:  two spaces\n\n",
    b"data:no-space\n\n",
    b"data: a\n\n\n\ndata: b\n\n",  # extra blank lines
    b"\ndata: a\n\n",  # a blank line first
    b"data: a\ndata: b\n\n",  # multi-line data
    b"data: a\n\n: comment\n\ndata: b\n\n",
    b"data: a\n\nevent: error\ndata: b\n\n",
    b"data: a\n\ndata: cut",  # no blank line at the end
    b"data: a\n\ndata: b\n",
    b"data: a\r\n\r\ndata: b\r\n\r\n",
    b'data: {"text": "data: x"}\n\n',
    b'data: {"text": "\\n\\ndata: x"}\n\n',  # escaped line ends inside the JSON
    "data: é😀中\n\n".encode(),
    b"id: 1\ndata: a\n\n",
]


@pytest.mark.parametrize("stream", EVENT_DATA_STREAMS)
def test_event_data_matches_the_decoder(stream: bytes) -> None:
    assert event_data(stream) == [event.data for event in decode_stream(stream)]


@pytest.mark.parametrize("seed", range(20))
def test_event_data_matches_the_decoder_on_random_streams(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [b"data: ", b"data:", b"x", b"\n", b"\n\n", b"\r", b": c\n", b"event: e\n", b"{}"]
    for _ in range(200):
        stream = b"".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        assert event_data(stream) == [event.data for event in decode_stream(stream)], stream
