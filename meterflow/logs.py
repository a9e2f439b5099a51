"""Logging set-up shared by every meterflow process: one format, optionally JSON lines."""

from __future__ import annotations

import logging
import sys
import time

import orjson


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class _Repeats(logging.Filter):
    """Lets a message template of the loggers under `prefix` through at most once per interval."""

    def __init__(self, prefix: str, interval_s: float) -> None:
        super().__init__()
        self._prefix = prefix
        self._interval_s = interval_s
        self._last: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefix):
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -self._interval_s) < self._interval_s:
            return False
        self._last[key] = now
        return True


def configure(level: str = "INFO", *, json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every retry at ERROR, thousands a second while a broker is down: keep one line
    # per kind of message per interval.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
    handler.addFilter(_Repeats("aiokafka", interval_s=10.0))
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # One line per HTTP request drowns what matters when a simulator registers thousands of devices.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
