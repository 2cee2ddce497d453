"""Where send() goes: the Mail API, the SDK's SMTP mode, or a Maildir outbox.

The SDK renders mail itself only in SMTP mode, and renders it worse than the
Mail API does; render_mime() fixes that, so what arrives looks the same on
every delivery path.  render() writes the same message straight to bytes,
each large body encoded into the output once, instead of through the email
package's generator (a str per line) and smtplib (three copies of the whole
message): SMTP mode and the outbox send what render() writes.
"""

from __future__ import annotations

import binascii
import email.encoders
import email.utils
import io
import logging
import mailbox
import os
import re
import secrets
import smtplib
import sys
import threading
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Mapping, MutableMapping, Optional, Union

from . import relay
from .sdk import apiproxy_errors, apiproxy_stub_map, mail, mail_errors
from .settings import DEFAULT_SMTP_TIMEOUT, EX_CONFIG, number_setting, on_app_engine, smtp_mode

log = logging.getLogger("appengine_mailer")

Text = Union[bytes, str]  # a body: UTF-8 bytes, or text


def render_mime(proto) -> Message:
    """Render a MailMessage proto as the SDK does, minus the SDK's SMTP-mode traps.

    The SDK leaves attachment bytes without a transfer encoding (line endings are
    rewritten on the wire), writes an empty Reply-To, and adds no Date or
    Message-ID; the Mail API does all three right, so this does too.  render()
    must give what this gives (tests/test_delivery.py).
    """
    mime = mail.mail_message_to_mime_message(proto)
    if not proto.ReplyTo:
        del mime["Reply-To"]
    for part in mime.get_payload()[1:]:
        email.encoders.encode_base64(part)
    for part in mime.get_payload()[0].walk():  # the bodies: a text part, or an alternative of them
        if part["Content-Transfer-Encoding"] == "7bit" and _LONG_LINE.search(part.get_payload().encode("ascii")):
            del part["Content-Transfer-Encoding"]
            email.encoders.encode_base64(part)
    mime["Date"] = email.utils.formatdate(localtime=False)
    mime["Message-ID"] = email.utils.make_msgid(domain="appengine-mailer.invalid")
    return mime


@dataclass
class Fields:
    """What a MailMessage proto carries, with bodies as UTF-8 bytes where they are bytes already."""

    sender: str
    subject: str
    to: list = field(default_factory=list)
    cc: list = field(default_factory=list)
    bcc: list = field(default_factory=list)
    reply_to: str = ""
    headers: list = field(default_factory=list)  # (name, value)
    text: Optional[Text] = None
    amp_html: Optional[Text] = None
    html: Optional[Text] = None
    attachments: list = field(default_factory=list)  # (file name, bytes, content id or None)

    @classmethod
    def from_proto(cls, proto) -> Fields:
        def body(name: str) -> Optional[str]:
            return getattr(proto, name) if proto.HasField(name) else None

        return cls(
            sender=proto.Sender,
            subject=proto.Subject,
            to=list(proto.To),
            cc=list(proto.Cc),
            bcc=list(proto.Bcc),
            reply_to=proto.ReplyTo,
            headers=[(header.name, header.value) for header in proto.Header],
            text=body("TextBody"),
            amp_html=body("AmpHtmlBody"),
            html=body("HtmlBody"),
            attachments=[
                (a.FileName, a.Data, a.ContentID if a.HasField("ContentID") else None) for a in proto.Attachment
            ],
        )

    @classmethod
    def from_email_message(cls, message: mail.EmailMessage) -> Fields:
        """The fields ToProto() would fill, without copying the bodies into a proto."""
        message.check_initialized()  # as ToProto() does: refuses what it refuses

        def addresses(name: str) -> list:
            return list(mail._email_sequence(getattr(message, name))) if hasattr(message, name) else []

        return cls(
            sender=message.sender,
            subject=getattr(message, "subject", ""),
            to=addresses("to"),
            cc=addresses("cc"),
            bcc=addresses("bcc"),
            reply_to=getattr(message, "reply_to", ""),
            headers=list(getattr(message, "headers", {}).items()),
            text=getattr(message, "body", None),
            amp_html=getattr(message, "amp_html", None),
            html=getattr(message, "html", None),
            attachments=[
                (a.filename, a.payload, a.content_id)
                for a in mail._attachment_sequence(getattr(message, "attachments", []))
            ],
        )


def render(fields: Fields, *, linesep: str = "\n", mangle_from: bool = False, envelope_to: bool = False) -> bytes:
    """The message render_mime() builds, flattened as BytesGenerator would flatten it; bodies encoded once.

    The MIME skeleton (every header, every part) is built and flattened by the
    email package as before, with a token where each body goes; each token is
    then replaced by the body, encoded exactly as the generator would have
    written it.  mangle_from is what smtplib's flattening does ('>From ' at
    the start of a 7bit text line); envelope_to adds the outbox's X-Envelope-To.
    """
    prefix = "AppengineMailerBody" + secrets.token_hex(8)
    bodies: dict[str, tuple[str, bytes]] = {}  # token -> (how it is written, bytes)

    def token(kind: str, data: bytes) -> str:
        name = f"{prefix}x{len(bodies)}"
        bodies[name] = (kind, data)
        return name

    def text_part(text: Text, subtype: str) -> MIMEText:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ascii_text = data.isascii()
        part = MIMEText("", subtype, "us-ascii" if ascii_text else "utf-8")  # the SDK's _GuessCharset
        seven_bit = ascii_text and not _LONG_LINE.search(data)
        if ascii_text and not seven_bit:  # as render_mime() does: base64 instead
            del part["Content-Transfer-Encoding"]
            part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(token("7bit" if seven_bit else "base64", data))
        return part

    parts = [
        text_part(text, subtype)
        for text, subtype in ((fields.text, "plain"), (fields.amp_html, "x-amp-html"), (fields.html, "html"))
        if text is not None
    ]
    mime = MIMEMultipart(_subparts=parts if len(parts) == 1 else [MIMEMultipart("alternative", _subparts=parts)])
    for file_name, data, content_id in fields.attachments:
        maintype, subtype = mail._GetMimeType(file_name).split("/")
        part = MIMEBase(maintype, subtype)
        part.add_header("Content-Disposition", "attachment", filename=file_name)
        part.set_payload(token("base64", data if isinstance(data, bytes) else data.encode("utf-8")))
        if content_id:
            part["content-id"] = content_id
        part["Content-Transfer-Encoding"] = "base64"  # render_mime()'s encode_base64, after the SDK's headers
        mime.attach(part)
    # The outbox is what recipients get, so no Bcc line; its X-Envelope-To names every recipient instead.
    shown = (
        (("To", fields.to), ("Cc", fields.cc))
        if envelope_to
        else (("To", fields.to), ("Cc", fields.cc), ("Bcc", fields.bcc))
    )
    for name, values in shown:
        if values:
            mime[name] = mail._I18nHeader(", ".join(values))
    mime["From"] = mail._I18nHeader(fields.sender)
    if fields.reply_to:
        mime["Reply-To"] = mail._I18nHeader(fields.reply_to)
    mime["Subject"] = mail._I18nHeader(fields.subject)
    for name, value in fields.headers:
        mime[name] = mail._I18nHeader(value)
    mime["Date"] = email.utils.formatdate(localtime=False)
    mime["Message-ID"] = email.utils.make_msgid(domain="appengine-mailer.invalid")
    if envelope_to:
        mime["X-Envelope-To"] = ", ".join(fields.to + fields.cc + fields.bcc)
    return _flatten(mime, bodies, prefix, linesep.encode("ascii"), mangle_from)


def _flatten(mime: Message, bodies: dict, prefix: str, linesep: bytes, mangle_from: bool) -> bytes:
    skeleton = io.BytesIO()
    BytesGenerator(skeleton, mangle_from_=mangle_from).flatten(mime, linesep=linesep.decode("ascii"))
    flat = skeleton.getvalue()
    out = io.BytesIO()
    done = 0
    for match in re.finditer(re.escape(prefix.encode("ascii")) + rb"x\d+", flat):
        out.write(flat[done : match.start()])
        kind, data = bodies[match.group().decode("ascii")]
        if kind == "7bit":
            if mangle_from:
                data = _FROM_LINE.sub(b">From ", data)
            out.write(_LINE_END.sub(linesep, data))
        else:
            _write_base64(out, data, linesep)
        done = match.end()
    out.write(flat[done:])
    return out.getvalue()


# SMTP allows 998 characters a line (RFC 5321): a text body with a longer line is sent base64-encoded.
_LONG_LINE = re.compile(rb"[^\r\n]{999}")
_FROM_LINE = re.compile(rb"^From ", re.MULTILINE)  # the generator's mangling, on the text before line ends change
_LINE_END = re.compile(rb"\r\n|\r|\n")
_BASE64_BLOCK = 57 * 1024  # encodes to 1024 lines of 76 characters


def _write_base64(out: io.BytesIO, data: bytes, linesep: bytes) -> None:
    """Write data as base64 in lines of 76 characters, each ended, as email's encoders do."""
    view = memoryview(data)
    for at in range(0, len(view), _BASE64_BLOCK):
        block = binascii.b2a_base64(view[at : at + _BASE64_BLOCK], newline=False)
        if at:
            out.write(linesep)
        out.write(linesep.join(block[i : i + 76] for i in range(0, len(block), 76)))
    if view:
        out.write(linesep)


class RenderedEmailMessage(mail.EmailMessage):
    """The SDK's EmailMessage, rendered by render() when it is delivered here rather than by the Mail API."""

    def to_mime_message(self):
        return render_mime(self.ToProto())

    def send(self, make_sync_call=apiproxy_stub_map.MakeSyncCall):
        if smtp_mode():
            send_smtp(self)
            return
        outbox = apiproxy_stub_map.apiproxy.GetStub("mail")
        if isinstance(outbox, MaildirOutbox):
            outbox.file(render(Fields.from_email_message(self), envelope_to=True))
            return
        super().send(make_sync_call)


def send_smtp(message: mail.EmailMessage, environ: Optional[Mapping[str, str]] = None) -> None:
    """Send as the SDK's SMTP mode does (same settings, same errors), the rendered bytes streamed.

    The SDK's session, word for word: APPENGINE_SMTP_HOST/PORT/USER/PASSWORD/
    USE_TLS, STARTTLS and login when asked, a refused login is
    InvalidSenderError, any other SMTP or network failure mail_errors.Error.
    """
    environ = os.environ if environ is None else environ
    fields = Fields.from_email_message(message)
    recipients = fields.to + fields.cc + fields.bcc
    if not recipients:
        raise mail_errors.MissingRecipientsError()
    fields.bcc = []  # never shown (the SDK deletes the header too)
    data = render(fields, linesep="\r\n", mangle_from=True)
    try:
        host = environ["APPENGINE_SMTP_HOST"]
        port = int(environ.get("APPENGINE_SMTP_PORT", 587))
        user = environ.get("APPENGINE_SMTP_USER")
        password = environ.get("APPENGINE_SMTP_PASSWORD")
        use_tls = environ.get("APPENGINE_SMTP_USE_TLS", "true").lower() == "true"
        with relay.RelaySMTP(host, port) as server:
            if use_tls:
                server.starttls()
            if user and password:
                server.login(user, password)
            server.sendmail(fields.sender, recipients, data)
    except smtplib.SMTPAuthenticationError as e:
        raise mail_errors.InvalidSenderError(f"SMTP authentication failed: {e.smtp_error!r}") from e
    except (smtplib.SMTPException, OSError) as e:
        raise mail_errors.Error(f"Failed to send email via SMTP: {e}") from e
    except KeyError as e:
        raise mail_errors.Error(f"Missing required SMTP environment variable: {e}") from e


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
        self.file(render(Fields.from_proto(request), envelope_to=True))

    def file(self, rendered: bytes) -> None:
        """File a message rendered with its X-Envelope-To header (every recipient, Bcc too)."""
        with self._lock:
            for folder in ("tmp", "new", "cur"):  # also when GMAIL_OUTBOX names an empty folder
                os.makedirs(self.path / folder, mode=0o700, exist_ok=True)
            mailbox.Maildir(self.path, create=False).add(rendered)


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
