"""The access log's direct JSON path writes exactly the line the logging route would, and a
server's lines go out together, once per pass of the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Iterator

import orjson
import pytest

from proxy.config import LoggingConfig
from proxy.logs import AccessLog, AccessRecord, configure
from proxy.outcome import Outcome


@contextlib.contextmanager
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The proxy's own JSON log setup (``configure``), writing into a buffer. Entered in the
    test itself: pytest adds its own capture handler to the root logger for each phase."""
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stderr", buffer)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure(LoggingConfig(format="json", level="info"))
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _access() -> AccessRecord:
    record = AccessRecord(
        request_id="req_1",
        method="POST",
        path="/v1/chat/completions\r\nforged\u2028line",
        started=time.perf_counter(),
        status=200,
        caller="caller_abc",
        model="gpt-4o-mini",
        stream=False,
    )
    record.outcome = Outcome.COMPLETE
    return record


def test_the_direct_line_is_the_line_logging_would_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger = logging.getLogger("proxy.access")
    with configured(monkeypatch) as buffer:
        _access().emit(logger)  # the direct path: the proxy's own handler, nothing filtering
        logger.addFilter(lambda record: True)  # now the record goes through logging
        try:
            _access().emit(logger)
        finally:
            logger.filters.clear()
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2  # CR, LF and U+2028 in a field split nothing
    assert "\u2028" not in buffer.getvalue()
    direct, routed = (orjson.loads(line) for line in lines)
    for entry in (direct, routed):
        assert entry.pop("time") == pytest.approx(time.time(), abs=60)
        assert entry.pop("duration_ms") >= 0
    assert direct == routed
    assert list(direct) == list(routed)  # same keys in the same order
    assert direct["logger"] == "proxy.access"
    assert direct["path"] == "/v1/chat/completions\r\nforged\u2028line"


def test_an_access_log_below_its_level_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    with configured(monkeypatch) as buffer:
        logging.getLogger().setLevel(logging.WARNING)
        _access().emit(logging.getLogger("proxy.access"))
    assert buffer.getvalue() == ""


class _Writes(io.StringIO):
    """A stream that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_the_lines_of_one_loop_pass_go_out_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with configured(monkeypatch):
        stream = _Writes()
        logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
        access_log = AccessLog(logging.getLogger("proxy.access"))
        for _ in range(3):
            access_log.write(_access())
        assert stream.getvalue() == ""  # kept until the pass ends
        await asyncio.sleep(0)
        assert stream.writes == 1
        lines = stream.getvalue().splitlines()
        assert len(lines) == 3
        direct = _access()
        direct.emit(logging.getLogger("proxy.access"))  # the same line, written at once
        expected = orjson.loads(stream.getvalue().splitlines()[-1])
        for line in lines:
            entry = orjson.loads(line)
            for varying in ("time", "duration_ms"):
                entry.pop(varying), expected.pop(varying, None)
            assert entry == expected
        access_log.write(_access())
        access_log.flush()  # what the app does on shutdown
        assert len(stream.getvalue().splitlines()) == 5
        await asyncio.sleep(0)  # the pass's scheduled write finds nothing left
        assert len(stream.getvalue().splitlines()) == 5
