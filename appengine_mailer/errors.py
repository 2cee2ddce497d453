"""HTTP errors, and the one table that turns a failure into the status a client gets.

Every refusal is an HTTPError carrying its status, a reason the client can act
on and any extra headers; Mailer answers them all the same way.  A 4xx means
"do not send this again as it is", a 503 "retry later": clients and their spools
rely on that split, so it is decided here and nowhere else.
"""

from __future__ import annotations

import os
import re
import smtplib
import ssl
from typing import Iterable, Optional

from . import relay
from .sdk import apiproxy_errors, mail_errors
from .settings import smtp_mode

RETRY_AFTER_SECONDS = 60


class HTTPError(Exception):
    """A request ends with this status and a plain-text reason for the client."""

    status = "500 Internal Server Error"

    def __init__(self, reason: str, headers: Iterable[tuple[str, str]] = ()):
        super().__init__(reason)
        self.reason = reason
        self.headers = list(headers)


class BadRequest(HTTPError):
    status = "400 Bad Request"


class Forbidden(HTTPError):
    status = "403 Forbidden"


class NotFound(HTTPError):
    status = "404 Not Found"


class MethodNotAllowed(HTTPError):
    status = "405 Method Not Allowed"

    def __init__(self, reason: str):
        super().__init__(reason, [("Allow", "GET, HEAD, POST")])


class LengthRequired(HTTPError):
    status = "411 Length Required"


class PayloadTooLarge(HTTPError):
    status = "413 Payload Too Large"


class UnsupportedMediaType(HTTPError):
    status = "415 Unsupported Media Type"


class UnauthorizedSender(BadRequest):
    """The mail service will not send from this sender; with fix_sender the default sender is tried."""


class ServiceUnavailable(HTTPError):
    status = "503 Service Unavailable"

    def __init__(self, reason: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(reason, [("Retry-After", str(retry_after))])


# The SDK's refusals that are the client's fault; any other mail error is ours.
CLIENT_MAIL_ERRORS = (
    mail_errors.BadRequestError,
    mail_errors.InvalidAttachmentTypeError,
    mail_errors.InvalidEmailError,
    mail_errors.InvalidHeaderNameError,
    mail_errors.MissingRecipientsError,
    mail_errors.MissingSenderError,
    mail_errors.PayloadEncodingError,
    mail_errors.UnknownCharsetError,
    mail_errors.UnknownEncodingError,
)


def http_error_for_send_failure(exc: Exception) -> HTTPError:
    """Map an exception raised while sending to the answer the client gets."""
    if isinstance(exc, HTTPError):
        return exc
    smtp_failure = _smtp_failure(exc.__context__)
    if smtp_failure is not None:
        return smtp_failure
    if isinstance(exc, mail_errors.InvalidSenderError):
        if str(exc).startswith("SMTP authentication failed"):
            return ServiceUnavailable("the SMTP server refused the proxy's credentials")
        return UnauthorizedSender(f"unauthorized sender: {exc}".rstrip(": "))
    if isinstance(exc, CLIENT_MAIL_ERRORS):
        return BadRequest(f"the mail service refused the message: {type(exc).__name__}: {exc}")
    if isinstance(exc, UnicodeError):
        return BadRequest("the message holds text that cannot be encoded for sending")
    if isinstance(exc, (mail_errors.Error, apiproxy_errors.Error, OSError)):
        return ServiceUnavailable("the mail service is unavailable, retry later")
    raise exc


# ---------------------------------------------------------------------------
# SMTP mode: the SDK raises mail.Error from inside its `except smtplib...:`
# block, so the relay's own exception is the context of the one we catch.
# ---------------------------------------------------------------------------


def _reply(code: int, text) -> str:
    """An SMTP reply as one short line: "550 5.1.1 no such user"."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(f"{code} {text}".split())[:300]


def _smtp_failure(cause: Optional[BaseException]) -> Optional[HTTPError]:
    """The answer for a failure of the SMTP relay, naming it and quoting its reply; None if not one."""
    if not (smtp_mode() and isinstance(cause, OSError)):  # smtplib's errors are OSErrors too
        return None
    at = relay.address(os.environ)
    refusals = _refusals(cause)
    if refusals and any(_wants_login(code, text) for code, text in refusals):
        return ServiceUnavailable(
            f"the SMTP relay at {at} wants the proxy to log in or is not letting it relay "
            f"({'; '.join(sorted({_reply(code, text) for code, text in refusals}))}): set APPENGINE_SMTP_USER "
            f"and APPENGINE_SMTP_PASSWORD, or allow the proxy in the relay's settings"
        )
    if isinstance(cause, smtplib.SMTPRecipientsRefused):
        replies = [_reply(code, text) for code, text in cause.recipients.values()]
        if all(code >= 500 for code, _ in cause.recipients.values()):
            return BadRequest(f"the SMTP relay at {at} refused every recipient: {'; '.join(sorted(set(replies)))}")
        return ServiceUnavailable(
            f"the SMTP relay at {at} deferred the recipients: {'; '.join(sorted(set(replies)))}; retry later"
        )
    if isinstance(cause, smtplib.SMTPSenderRefused) and cause.smtp_code == 552:
        return BadRequest(
            f"the SMTP relay at {at} refused the message's size: {_reply(cause.smtp_code, cause.smtp_error)}"
        )
    if isinstance(cause, smtplib.SMTPSenderRefused) and cause.smtp_code >= 500:
        return UnauthorizedSender(
            f"the SMTP relay at {at} refused the sender {cause.sender!r}: {_reply(cause.smtp_code, cause.smtp_error)}"
        )
    if isinstance(cause, smtplib.SMTPDataError) and cause.smtp_code >= 500:
        return BadRequest(f"the SMTP relay at {at} refused the message: {_reply(cause.smtp_code, cause.smtp_error)}")
    if isinstance(cause, smtplib.SMTPAuthenticationError):
        return ServiceUnavailable(
            f"the SMTP relay at {at} refused the proxy's credentials (APPENGINE_SMTP_USER, "
            f"APPENGINE_SMTP_PASSWORD): {_reply(cause.smtp_code, cause.smtp_error)}"
        )
    if isinstance(cause, smtplib.SMTPNotSupportedError) and "STARTTLS" in str(cause).upper():
        return ServiceUnavailable(f"the SMTP server at {at} does not offer STARTTLS; set APPENGINE_SMTP_USE_TLS=false")
    if isinstance(cause, smtplib.SMTPNotSupportedError) and "AUTH" in str(cause).upper():
        return ServiceUnavailable(
            f"the SMTP relay at {at} does not offer AUTH: unset APPENGINE_SMTP_USER and APPENGINE_SMTP_PASSWORD, "
            f"or keep APPENGINE_SMTP_USE_TLS=true (many relays offer AUTH only after STARTTLS)"
        )
    if isinstance(cause, smtplib.SMTPResponseException):
        return ServiceUnavailable(
            f"the SMTP relay at {at} answered {_reply(cause.smtp_code, cause.smtp_error)}; retry later"
        )
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ServiceUnavailable(
            f"the certificate of the SMTP relay at {at} could not be verified "
            f"({cause.verify_message}); trust its CA with GMAIL_SMTP_CA_FILE"
        )
    if isinstance(cause, TimeoutError):
        return ServiceUnavailable(
            f"the SMTP relay at {at} did not answer within {relay.RelaySMTP.timeout_seconds:g} s; retry later"
        )
    if isinstance(cause, smtplib.SMTPServerDisconnected) and "timed out" in str(cause):
        return ServiceUnavailable(
            f"the SMTP relay at {at} did not answer within {relay.RelaySMTP.timeout_seconds:g} s; retry later"
        )
    if isinstance(cause, smtplib.SMTPServerDisconnected):
        return ServiceUnavailable(f"the SMTP relay at {at} closed the connection ({cause}); retry later")
    if isinstance(cause, OSError):
        return ServiceUnavailable(f"cannot reach the SMTP relay at {at}: {cause.strerror or cause}; retry later")
    return ServiceUnavailable(f"the SMTP relay at {at} failed: {type(cause).__name__}: {cause}")


_LOGIN_OR_RELAY = re.compile(r"auth|relay(ing)? (access )?denied|not (permitted|allowed) to relay", re.IGNORECASE)


def _refusals(cause: BaseException) -> list[tuple[int, object]]:
    """The relay's (code, reply) refusals of the sender or the recipients, if that is what failed."""
    if isinstance(cause, smtplib.SMTPRecipientsRefused):
        return list(cause.recipients.values())
    if isinstance(cause, smtplib.SMTPSenderRefused):
        return [(cause.smtp_code, cause.smtp_error)]
    return []


def _wants_login(code: int, reply) -> bool:
    """A refusal that says the proxy must log in or may not relay: its configuration, not the message."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return code == 530 or (code >= 500 and bool(_LOGIN_OR_RELAY.search(text)))
