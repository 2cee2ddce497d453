"""POST /_ah/bounce: App Engine's bounce notifications, reported back to the application that sent the mail.

The Mail API never tells a sender that a message bounced; App Engine posts a
notification to /_ah/bounce instead (with `inbound_services: [mail_bounce]`).
The proxy parses it with the SDK's BounceNotification and forwards the
essentials to GMAIL_BOUNCE_URL as a request signed like a send (signature v2
over a JSON `msg`, the proxy's first key, a fresh timestamp), which the
receiving application checks with gmail.verify_request().

Only App Engine may post here.  app.yaml puts the URL behind `login: admin`,
App Engine's documented protection for its /_ah/ handlers: it lets through App
Engine's own requests and refuses everyone else's.  Off App Engine nothing
enforces that, so the proxy refuses every notification there.
"""

from __future__ import annotations

import json
import logging
import sys
from email import policy
from email.message import Message
from email.parser import BytesParser
from typing import Mapping, Optional
from urllib.parse import urlsplit

import gmail

from .errors import BadRequest, ServiceUnavailable, UnsupportedMediaType
from .form import MAX_FORM_FIELDS, parse_form, read_body
from .sdk import mail
from .settings import EX_CONFIG

log = logging.getLogger("appengine_mailer")

FIELDS = ("from", "to", "cc", "bcc", "subject", "text")
FORWARD_TIMEOUT = 10.0


def read_notification(environ: Mapping, limit: int) -> mail.BounceNotification:
    """Parse App Engine's POST (multipart/form-data, or urlencoded) with the SDK's BounceNotification."""
    content_type = environ.get("CONTENT_TYPE", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded") or "\n" in content_type:
        raise UnsupportedMediaType(f"content type {kind or 'missing'!r}: a bounce notification is a form")
    body = read_body(environ, limit)
    if kind == "multipart/form-data":
        fields = _multipart_fields(content_type, body)
    else:
        fields = {name: value.decode("utf-8", "replace") for name, value in parse_form(body).items()}
    try:
        return mail.BounceNotification(fields)
    except Exception as exc:  # the SDK parses raw-message; whatever it makes of junk is the poster's fault
        raise BadRequest(f"not a bounce notification ({type(exc).__name__})") from None


def _multipart_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of a multipart/form-data body, read with the stdlib email parser (cgi is gone in 3.13).

    App Engine's form has about a dozen fields: a form of many more is not
    App Engine's and is refused before the parser builds them all.
    """
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    boundary = content_type.partition("boundary=")[2].split(";")[0].strip().strip('"').encode("latin-1", "replace")
    if not boundary or body.count(b"--" + boundary) > MAX_FORM_FIELDS * 2:
        raise BadRequest("a bounce notification is a form of a few fields")
    try:
        form = BytesParser(policy=policy.compat32).parsebytes(head + body)
    except RecursionError:
        raise BadRequest("a bounce notification is a form of a few fields, not parts inside parts") from None
    parts = form.get_payload()
    if not form.is_multipart() or not isinstance(parts, list):
        raise BadRequest("a multipart/form-data body without parts")
    fields: dict[str, str] = {}
    for part in parts[: MAX_FORM_FIELDS * 2]:
        if not isinstance(part, Message):
            continue
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in fields:
            data = part.get_payload(decode=True)
            fields[name] = data.decode("utf-8", "replace") if isinstance(data, bytes) else ""
    return fields


def report(notification: mail.BounceNotification) -> dict:
    """What the sender's application needs to know: which message bounced, and the notice itself."""
    try:
        original = notification.original_raw_message.original
        message_id = str(original.get("Message-ID", "")) if original is not None else ""
    except Exception:  # a raw message the SDK could not read: the other fields still say enough
        message_id = ""
    return {
        "event": "bounce",
        "original": {**{field: _text(notification.original.get(field)) for field in FIELDS}, "message_id": message_id},
        "notification": {field: _text(notification.notification.get(field)) for field in FIELDS},
    }


def _text(value) -> str:
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return str(value or "")


def check_url(url: str) -> Optional[str]:
    """What is wrong with GMAIL_BOUNCE_URL, or None: checked at start-up, so a send never finds out."""
    if "," in url or len(url.split()) != 1:
        return "GMAIL_BOUNCE_URL must be one URL (percent-encode commas and spaces in it)"
    try:
        gmail.Endpoint(url, "GMAIL_BOUNCE_URL")
    except gmail.ConfigurationError as problem:  # its text shows the URL without user, password or query
        return str(problem)
    return None


def forward(bounce: dict, url: str, key: bytes, timeout: float = FORWARD_TIMEOUT) -> None:
    """POST the bounce to `url`, signed; ServiceUnavailable (so that App Engine retries) if it is not taken."""
    msg = json.dumps(bounce, ensure_ascii=True, sort_keys=True).encode("ascii")
    body = gmail.form_body(msg, **gmail.sign_request(msg, key, False, signature_v1=False))
    try:
        with gmail.GmailProxy(key, url, timeout=timeout) as receiver:
            receiver.send_signed(body)
    except gmail.MessageSendingFailure as failure:
        raise ServiceUnavailable(f"the bounce could not be forwarded to {where(url)}: {failure}") from None
    except (gmail.ConfigurationError, ValueError, OSError) as failure:  # never quote the URL: it may hold a token
        raise ServiceUnavailable(
            f"the bounce could not be forwarded to {where(url)} ({type(failure).__name__})"
        ) from None


def where(url: str) -> str:
    """The receiver's scheme, host and path, without a query that may carry a token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def describe(bounce: dict) -> str:
    """One log line's worth: who sent what to whom (never the message or the notice's text)."""
    original = bounce["original"]
    return f"from {original['from']!r} to {original['to']!r} message-id {original['message_id']!r}"


def url_from_environment(environ: Mapping[str, str]) -> Optional[str]:
    """GMAIL_BOUNCE_URL, checked: a bad one stops the server with one line (exit 78)."""
    url = environ.get("GMAIL_BOUNCE_URL", "").strip()
    problem = check_url(url) if url else None
    if problem:
        print(f"mailer.py: {problem}", file=sys.stderr)
        raise SystemExit(EX_CONFIG)
    return url or None
