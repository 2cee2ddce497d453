"""The SDK's SMTP mode made a first-class delivery path: checked settings, a bounded, verified connection.

Google calls the Mail API legacy and recommends an SMTP relay (SendGrid,
Mailgun, Mailjet, Workspace).  The SDK's SMTP mode sends through one, but it
opens the connection with no timeout, runs STARTTLS without checking the
relay's certificate, drops the list of recipients a relay refused, and turns a
missing setting into a failure at the first message.  Its send() still does
the sending; it only gets, through the `smtplib` name it looks up, an SMTP
class that fixes those, and the settings are checked once, at start-up.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import types
from pathlib import Path
from typing import Mapping, MutableMapping, Optional

from .sdk import mail
from .settings import DEFAULT_SMTP_TIMEOUT, smtp_mode

log = logging.getLogger("appengine_mailer")

DEFAULT_PORT = 587  # the SDK's default: submission, with STARTTLS
SETTINGS = (
    "APPENGINE_USE_SMTP_MAIL_SERVICE",
    "APPENGINE_SMTP_HOST",
    "APPENGINE_SMTP_PORT",
    "APPENGINE_SMTP_USER",
    "APPENGINE_SMTP_PASSWORD",
    "APPENGINE_SMTP_USE_TLS",
)
_refused = threading.local()


class RelaySMTP(smtplib.SMTP):
    """smtplib.SMTP with a timeout, a verified STARTTLS, the refusals kept, and DATA streamed.

    smtplib's data() copies the whole message three times (line ends, dot
    stuffing, encoding); here it goes out a slice of whole lines at a time,
    dot-stuffed as it goes.
    """

    timeout_seconds = DEFAULT_SMTP_TIMEOUT
    ca_file: Optional[str] = None
    SLICE = 1 << 20

    def __init__(self, host: str = "", port: int = 0, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeout_seconds)
        super().__init__(host, port, *args, **kwargs)

    def starttls(self, *args, **kwargs):
        """STARTTLS that checks the relay's certificate and host name (smtplib's default checks neither)."""
        kwargs.setdefault("context", ssl.create_default_context(cafile=self.ca_file))
        return super().starttls(*args, **kwargs)

    def sendmail(self, *args, **kwargs):
        refused = super().sendmail(*args, **kwargs)  # send_message() comes here too
        _refused.recipients = dict(refused)
        return refused

    def data(self, msg):
        if not isinstance(msg, bytes):  # text, as the SDK's send_message() path may give: smtplib's own way
            return super().data(msg)
        self.putcmd("data")
        code, reply = self.getreply()
        if code != 354:
            raise smtplib.SMTPDataError(code, reply)
        view = memoryview(msg)
        at = 0
        while at < len(msg):  # slices of whole lines, so '^' in _DOT_LINE is a line start
            stop = msg.rfind(b"\n", at, at + self.SLICE) + 1 if at + self.SLICE < len(msg) else len(msg)
            if stop <= at:  # a line longer than a slice
                stop = msg.find(b"\n", at + self.SLICE) + 1 or len(msg)
            self.send(_DOT_LINE.sub(b"..", view[at:stop]))
            at = stop
        self.send(b".\r\n" if msg.endswith(b"\r\n") else b"\r\n.\r\n")
        return self.getreply()


_DOT_LINE = re.compile(rb"^\.", re.MULTILINE)  # smtplib's _quote_periods


def take_refused() -> dict:
    """The recipients the relay refused while accepting the last message sent on this thread."""
    refused = getattr(_refused, "recipients", {})
    _refused.recipients = {}
    return refused


def log_refused_recipients(total: int) -> int:
    """Log how many recipients of the message just sent the relay refused (their replies, not who); return it."""
    refused = take_refused()
    if refused:
        replies = sorted({" ".join(f"{code} {_text(reply)}".split()) for code, reply in refused.values()})
        deferred = sum(1 for code, _ in refused.values() if code < 500)
        log.warning(
            "the SMTP relay refused %d of %d recipients (%s); sent to the others%s",
            len(refused),
            total,
            "; ".join(replies)[:300],
            f"; {deferred} of the refusals were temporary (4xx), and nobody retries them" if deferred else "",
        )
    return len(refused)


def _text(reply) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def install(timeout: float, ca_file: Optional[str] = None) -> None:
    """Make the SDK's send() open its SMTP connections with RelaySMTP."""
    RelaySMTP.timeout_seconds = timeout
    RelaySMTP.ca_file = ca_file
    module = types.ModuleType("smtplib", smtplib.__doc__)
    module.__dict__.update(smtplib.__dict__)  # the SDK also reads smtplib's exception classes here
    module.SMTP = RelaySMTP  # type: ignore[attr-defined]
    mail.smtplib = module


def load_from_files(environ: MutableMapping[str, str], root: Path) -> None:
    """Fill in SMTP settings missing from the environment from files of their names in keys/.

    The SDK reads only the environment, but a relay password in app.yaml's
    env_variables sits in a file that gets committed; keys/ is uploaded and
    never enters git.
    """
    for name in SETTINGS:
        path = root / "keys" / name
        if not environ.get(name) and path.is_file():
            environ[name] = path.read_text(encoding="utf-8").strip()


def address(environ: Mapping[str, str]) -> str:
    """HOST:PORT of the relay, for messages that must say which server answered."""
    return f"{environ.get('APPENGINE_SMTP_HOST', '?')}:{environ.get('APPENGINE_SMTP_PORT') or DEFAULT_PORT}"


def check_settings(environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Return (errors, warnings) about the SMTP settings: what is missing, malformed or contradictory.

    The SDK reads these only when the first message is sent, and treats any
    value but the exact word 'true' as false; a mistake would make every send
    fail, or silently send in the clear.
    """
    errors: list[str] = []
    warnings: list[str] = []
    switch = environ.get("APPENGINE_USE_SMTP_MAIL_SERVICE", "")
    if switch not in ("", "true", "false"):
        errors.append(
            f"APPENGINE_USE_SMTP_MAIL_SERVICE must be true or false, not {switch!r} "
            f"(the SDK turns SMTP mode on only for the exact word 'true')"
        )
    if not smtp_mode(environ):
        if environ.get("APPENGINE_SMTP_HOST") and not errors:
            warnings.append(
                "APPENGINE_SMTP_HOST is set but APPENGINE_USE_SMTP_MAIL_SERVICE is not true: "
                "mail does not go through the relay"
            )
        return errors, warnings
    if not environ.get("APPENGINE_SMTP_HOST", "").strip():
        errors.append("APPENGINE_USE_SMTP_MAIL_SERVICE=true needs APPENGINE_SMTP_HOST (the relay's host name)")
    port = environ.get("APPENGINE_SMTP_PORT")
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        errors.append(f"APPENGINE_SMTP_PORT must be a port number, not {port!r}")
    elif port == "465":
        warnings.append(
            "APPENGINE_SMTP_PORT=465 is for TLS from the first byte, which the SDK does not speak: "
            "use the relay's port 587 (STARTTLS)"
        )
    # The SDK compares the lower-cased value with 'true', spaces included: " true" would mean false.
    tls = environ.get("APPENGINE_SMTP_USE_TLS", "true").lower()
    if tls not in ("true", "false"):
        errors.append(f"APPENGINE_SMTP_USE_TLS must be true or false, not {tls!r}")
    user, password = environ.get("APPENGINE_SMTP_USER"), environ.get("APPENGINE_SMTP_PASSWORD")
    if bool(user) != bool(password):
        given, missing = (
            ("APPENGINE_SMTP_USER", "APPENGINE_SMTP_PASSWORD")
            if user
            else ("APPENGINE_SMTP_PASSWORD", "APPENGINE_SMTP_USER")
        )
        errors.append(f"{given} is set but {missing} is not: the proxy would send without logging in")
    if user and password and tls == "false":
        warnings.append(
            "APPENGINE_SMTP_USE_TLS=false with a user and password: the credentials cross the network unencrypted"
        )
    ca_file = environ.get("GMAIL_SMTP_CA_FILE")
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            errors.append(f"GMAIL_SMTP_CA_FILE {ca_file!r} is not a readable PEM file of certificates ({exc})")
    return errors, warnings
