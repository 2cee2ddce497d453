"""Where send() goes: the Mail API, the SDK's SMTP mode, or a Maildir outbox.

The SDK renders mail itself only in SMTP mode, and renders it worse than the
Mail API does; render_mime() fixes that for SMTP mode and for the outbox, so
what arrives looks the same on every delivery path.
"""

from __future__ import annotations

import email.encoders
import email.utils
import logging
import mailbox
import os
import sys
import threading
from email.message import Message
from pathlib import Path
from typing import Mapping, MutableMapping, Optional

from . import relay
from .sdk import apiproxy_errors, apiproxy_stub_map, mail
from .settings import DEFAULT_SMTP_TIMEOUT, EX_CONFIG, number_setting, on_app_engine, smtp_mode

log = logging.getLogger("appengine_mailer")


def render_mime(proto) -> Message:
    """Render a MailMessage proto as the SDK does, minus the SDK's SMTP-mode traps.

    The SDK leaves attachment bytes without a transfer encoding (line endings are
    rewritten on the wire), writes an empty Reply-To, and adds no Date or
    Message-ID; the Mail API does all three right, so this does too.
    """
    mime = mail.mail_message_to_mime_message(proto)
    if not proto.ReplyTo:
        del mime["Reply-To"]
    for part in mime.get_payload()[1:]:
        email.encoders.encode_base64(part)
    mime["Date"] = email.utils.formatdate(localtime=False)
    mime["Message-ID"] = email.utils.make_msgid(domain="appengine-mailer.invalid")
    return mime


class RenderedEmailMessage(mail.EmailMessage):
    """The SDK's EmailMessage, rendered by render_mime when the SDK sends over SMTP."""

    def to_mime_message(self):
        return render_mime(self.ToProto())


class MaildirOutbox:
    """A `mail` service stub that files each message into a Maildir, as the Mail API renders it.

    The embedded default for running outside App Engine: any mail client can open
    the folder.  File names come from mailbox.Maildir (time, pid, host), never from
    the message.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def MakeSyncCall(self, service, call, request, response):
        if call not in ("Send", "SendToAdmins"):
            raise apiproxy_errors.CallNotFoundError(f"{service}.{call}")
        mime = render_mime(request)
        recipients = list(request.To) + list(request.Cc) + list(request.Bcc)
        mime["X-Envelope-To"] = ", ".join(recipients)
        with self._lock:
            mailbox.Maildir(self.path, create=True).add(mime.as_bytes())


def install_outbox(path: Path) -> bool:
    """Register the Maildir outbox for `mail` unless a stub is already there."""
    if "mail" in apiproxy_stub_map.apiproxy._CopyStubMap():
        return False
    apiproxy_stub_map.apiproxy.RegisterStub("mail", MaildirOutbox(path))
    return True


def configure_delivery(environ: Optional[Mapping[str, str]], root: Path) -> None:
    """Set up delivery before the first send; stop with one line per bad SMTP setting (exit 78).

    In SMTP mode the SDK's send() gets relay.RelaySMTP (a timeout, a verified
    STARTTLS, the refused recipients kept).  Outside App Engine and SMTP mode
    this registers the Maildir outbox (never replacing a registered stub).
    """
    environ = os.environ if environ is None else environ
    if isinstance(environ, MutableMapping):
        relay.load_from_files(environ, root)
    errors, warnings = relay.check_settings(environ)
    for line in errors:
        print(f"mailer.py: {line}", file=sys.stderr)
    if errors:
        raise SystemExit(EX_CONFIG)
    for line in warnings:
        log.warning("%s", line)
    if smtp_mode(environ):
        timeout = number_setting(environ, "GMAIL_SMTP_TIMEOUT", DEFAULT_SMTP_TIMEOUT)
        relay.install(timeout, environ.get("GMAIL_SMTP_CA_FILE") or None)
    elif not on_app_engine(environ):
        install_outbox(Path(environ.get("GMAIL_OUTBOX", root / "outbox")))


def delivery_mode() -> str:
    """Say where send() goes now, for the health page and the start-up line."""
    if smtp_mode():
        return "smtp"
    stub = apiproxy_stub_map.apiproxy.GetStub("mail")
    if isinstance(stub, MaildirOutbox):
        return "outbox"
    if on_app_engine():
        return "mail-api"
    return "stub" if stub else "none"
