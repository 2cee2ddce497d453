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
    """Drop the SDK's own lines about sending, which outside App Engine say "via App Engine Mail API"
    of mail that went to the outbox, and which the proxy's own outcome line replaces."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.endswith(_SDK_MAIL_MODULE)


def configure(environ: Optional[Mapping[str, str]] = None) -> None:
    """Make the app's lines appear, once, under whatever server runs it.

    If the application has already set up logging (the root logger has a
    handler), the lines go there.  Otherwise the app's logger gets its own
    handler (JSON to stdout on App Engine, text to stderr elsewhere) and stops
    propagating, so a server that sets up the root logger later (waitress
    does) does not print each line twice.
    """
    environ = os.environ if environ is None else environ
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    root = logging.getLogger()
    if not on_app_engine(environ) and not any(isinstance(f, SdkSendLines) for f in root.filters):
        root.addFilter(SdkSendLines())  # the SDK logs through logging.info(), i.e. on the root logger
    if root.handlers or logger.handlers:
        return
    if on_app_engine(environ):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(CloudLoggingFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
