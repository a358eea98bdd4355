"""Logging set-up for the command line and services: plain text or JSON lines.

Hospital IT ships node logs to their collectors (journald, Loki, Splunk), which
want one JSON object per line; people at a terminal want readable text.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record with time, level, logger, message and extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line; ``extra=`` fields become keys."""
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(
            {key: value for key, value in record.__dict__.items() if key not in _RESERVED}
        )
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(level: str = "warning", fmt: LogFormat = "text") -> None:
    """Send log records to stderr at ``level`` in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every refused connection as an error of its own, and pydicom
    # warns about every quirk it repairs while reading; the node reports what matters
    # itself, with the file or destination, so keep their chatter for debugging.
    # Python warnings (pydicom's UserWarnings about the files it repairs) go through the
    # logger too, so that JSON logs stay JSON. httpx logs every request at info: the sync
    # client polls the federation every few minutes and logs what it does itself.
    logging.captureWarnings(True)
    if root.level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    threading.excepthook = _log_thread_death


def _log_thread_death(args: threading.ExceptHookArgs) -> None:
    """A thread that dies of an exception is one log line, in the configured format.

    Why: Python's default prints the traceback to stderr, past the JSON formatter and
    the collectors that read it. The node's threads catch what they expect; this is the
    net for what they do not. The traceback is kept for ``--log-level debug``.
    """
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logger = logging.getLogger("dafne_node")
    logger.error("thread %s died: %s: %s", name, args.exc_type.__name__, args.exc_value)
    if args.exc_value is not None:
        logger.debug("the failure in detail", exc_info=args.exc_value)
