"""The access log's direct JSON path writes exactly the line the logging route would."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterator

import orjson
import pytest

from proxy.config import LoggingConfig
from proxy.logs import AccessRecord, configure
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
