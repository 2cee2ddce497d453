"""Logging wherever the app runs: one line per request outcome, JSON on App Engine.

gunicorn, waitress and embedding applications each set up logging differently,
or not at all; the app's own lines must appear under all of them.  On App
Engine each line is a JSON object (severity, message, fields), which Cloud
Logging reads from the process's output.  No line ever holds a key or a
message body: callers pass sizes, counts and reasons only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Mapping, Optional

from .settings import on_app_engine

LOGGER_NAME = "appengine_mailer"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SDK_MAIL_MODULE = os.path.join("google", "appengine", "api", "mail.py")


class CloudLoggingFormatter(logging.Formatter):
    """One JSON object per line: Cloud Logging takes `severity` and `message`, the rest as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"severity": record.levelname, "message": record.getMessage(), "logger": record.name}
        entry.update(getattr(record, "fields", None) or {})
        return json.dumps(entry, ensure_ascii=False, default=str)


class SdkSendLines(logging.Filter):
    """Drop the SDK's own lines about sending: the proxy's outcome line replaces them.

    Outside App Engine they say "via App Engine Mail API" of mail that went to
    the outbox; in SMTP mode they repeat the relay's error with every recipient
    address, unstructured.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.endswith(_SDK_MAIL_MODULE)


class FallbackHandler(logging.StreamHandler):
    """Prints the app's lines to standard error only while nobody else has set up logging.

    The app's logger keeps propagating, so an application or server that sets up
    the root logger, before or after the app is imported, gets every line, once.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def configure(environ: Optional[Mapping[str, str]] = None) -> None:
    """Make the app's lines appear, once, under whatever server runs it.

    On App Engine the app's logger writes JSON lines to stdout for Cloud
    Logging, and only there.  Elsewhere its lines go wherever the application
    or server has set up logging, else to standard error (FallbackHandler).
    """
    environ = os.environ if environ is None else environ
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    root = logging.getLogger()
    mail_api = on_app_engine(environ) and environ.get("APPENGINE_USE_SMTP_MAIL_SERVICE") != "true"
    if not mail_api and not any(isinstance(f, SdkSendLines) for f in root.filters):
        root.addFilter(SdkSendLines())  # the SDK logs through logging.info(), i.e. on the root logger
    if logger.handlers:
        return
    if on_app_engine(environ):
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(CloudLoggingFormatter())
        logger.propagate = False
    else:
        handler = FallbackHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logger.addHandler(handler)


def printable(text: str, limit: int = 500) -> str:
    """`text` safe for a log line: control characters escaped (no forged lines), at most `limit` characters."""
    text = text[:limit]
    safe = text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else safe[: limit - 1] + "…"


def outcome(level: int, verdict: str, status: str, reason: str, **fields) -> None:
    """One line per request: sent, refused (the client's fault) or failed (ours), with sizes and counts only."""
    code = status.split()[0]
    reason = printable(reason)
    fields = {name: value for name, value in fields.items() if value is not None}
    details = " ".join(f"{name}={value}" for name, value in fields.items())
    logging.getLogger(LOGGER_NAME).log(
        level,
        "%s: %s %s%s",
        verdict,
        code,
        f"{reason} " if reason else "",
        details,
        extra={"fields": {"outcome": verdict, "status": int(code), "reason": reason, **fields}},
    )
