"""Structured logs: one JSON object per line, the request id of the call on every line written
while it runs, customer ids only as keyed hashes (SPEC §6).

    configure_logging("json", level=logging.INFO)
    with call_context(request_id="…", client="email"):
        logger.info("call", extra={"customer": hash_customer_id("c001")})

A line looks like `{"ts": "2026-11-23T13:40:00.123Z", "level": "INFO", "logger": "nextbest.server",
"msg": "call", "request_id": "9f…", "method": "/nextbest.v1.Recommender/RecommendProducts",
"code": "OK", "ms": 1.9, "client": "email", "customer": "3b1c…"}`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hmac
import json
import logging
import secrets
import sys
from collections.abc import Iterator

__all__ = [
    "JsonFormatter",
    "call_context",
    "configure_logging",
    "hash_customer_id",
    "set_hash_key",
    "context_value",
    "FIELDS",
]

FIELDS = ("method", "code", "ms", "client", "customer", "requests", "peer")
"""Extra keys a log call may pass (`extra={...}`) that the JSON line carries."""

_context: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "call", default=()
)
_key = secrets.token_bytes(32)


def set_hash_key(key: str) -> None:
    """Use `key` for customer id hashes (so one customer hashes alike across processes);
    empty keeps the random per-process key."""
    global _key
    if key:
        _key = key.encode()


def hash_customer_id(customer_id: str) -> str:
    """A keyed hash of a customer id for logs: stable for one key, not reversible by trying the
    (small, guessable) space of customer numbers without the key."""
    if not customer_id:
        return ""
    return hmac.digest(_key, customer_id.encode(), "sha256").hex()[:16]  # one C call


@contextlib.contextmanager
def call_context(**values: str) -> Iterator[None]:
    """Attach `values` (request_id, client) to every log line written inside the block."""
    token = _context.set((*_context.get(), *values.items()))
    try:
        yield
    finally:
        # A stream's generator may be closed from another thread (another context).
        with contextlib.suppress(ValueError):
            _context.reset(token)


def context_value(key: str) -> str:
    """The value of `key` (request_id, client) in the current call context, '' if none."""
    return dict(_context.get()).get(key, "")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the call context and the whitelisted extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
            **dict(_context.get()),
        }
        for name in FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(fmt: str, level: int) -> None:
    """Send every log record to stderr as `json` lines or as `text`."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # No line says where it was logged from: skip the stack walk of every record (the logging
    # HOWTO's "Optimization" section). It was 3% of a served call.
    logging._srcfile = None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
