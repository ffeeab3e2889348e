"""The call log's direct line (`log_call`) is exactly the JSON formatter's line."""

from __future__ import annotations

import io
import json
import logging

import pytest

from nextbest import logs


@pytest.fixture
def json_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure_logging("json", logging.INFO)
    stream = io.StringIO()
    logs._json_handler.setStream(stream)
    try:
        yield stream
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logs._json_handler = None


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_the_direct_line_is_the_formatters_line(json_logging):
    logger = logging.getLogger("nextbest.calls")
    odd = 'req-"quoted"\\back/é'  # a caller's x-request-id may hold any printable text
    with logs.call_context(request_id=odd, client="email"):
        logs.log_call(logger, "/nextbest.v1.Recommender/RecommendProducts", "OK", 1.25, "ab12")
        logger.info(
            "call",
            extra={
                "method": "/nextbest.v1.Recommender/RecommendProducts",
                "code": "OK",
                "ms": 1.25,
                "customer": "ab12",
            },
        )
    direct, formatted = _lines(json_logging)
    a, b = json.loads(direct), json.loads(formatted)
    assert list(a) == list(b)  # the same keys in the same order
    assert a.pop("ts")[:16] == b.pop("ts")[:16]  # the same minute (written a moment apart)
    assert a == b and a["request_id"] == odd


def test_the_timestamp_has_the_formatters_shape():
    record = logging.LogRecord("x", logging.INFO, "", 0, "m", (), None)
    record.created = 1_780_000_000.987654
    expected = json.loads(logs.JsonFormatter().format(record))["ts"]
    assert logs._timestamp(1_780_000_000.987654) == expected


def test_any_other_set_up_gets_the_record(json_logging, caplog):
    logger = logging.getLogger("nextbest.calls")
    with caplog.at_level(logging.INFO, logger="nextbest.calls"):  # a second handler
        logs.log_call(logger, "/m", "OK", 1.0, "ab12")
    assert [(r.getMessage(), r.method, r.code, r.customer) for r in caplog.records] == [
        ("call", "/m", "OK", "ab12")
    ]
    logger.setLevel(logging.WARNING)
    try:
        logs.log_call(logger, "/m", "OK", 1.0, "ab12")  # below the level: nothing
    finally:
        logger.setLevel(logging.NOTSET)
    assert len(_lines(json_logging)) == 1  # caplog's record reached the JSON handler too
