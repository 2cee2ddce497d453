"""HTTP errors, and the one table that turns a failure into the status a client gets.

Every refusal is an HTTPError carrying its status, a reason the client can act
on and any extra headers; Mailer answers them all the same way.  A 4xx means
"do not send this again as it is", a 503 "retry later": clients and their spools
rely on that split, so it is decided here and nowhere else.
"""

from __future__ import annotations

from typing import Iterable

from .sdk import apiproxy_errors, mail_errors

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
    if isinstance(exc, mail_errors.InvalidSenderError):
        if str(exc).startswith("SMTP authentication failed"):
            return ServiceUnavailable("the SMTP server refused the proxy's credentials")
        return BadRequest(f"unauthorized sender: {exc}".rstrip(": "))
    if isinstance(exc, CLIENT_MAIL_ERRORS):
        return BadRequest(f"the mail service refused the message: {type(exc).__name__}: {exc}")
    if isinstance(exc, UnicodeError):
        return BadRequest("the message holds text that cannot be encoded for sending")
    if isinstance(exc, (mail_errors.Error, apiproxy_errors.Error, OSError)):
        return ServiceUnavailable("the mail service is unavailable, retry later")
    raise exc
