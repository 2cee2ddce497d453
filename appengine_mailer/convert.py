"""RFC 2822 message -> the Mail API's EmailMessage: what is kept, and what is refused.

Addresses are checked and rendered as ASCII, text bodies decoded with their
charset, every other part becomes an attachment (nothing is silently dropped),
and only the headers the Mail API accepts are passed on.  Anything the email
package cannot make sense of is the client's 400, never a 500.
"""

from __future__ import annotations

import codecs
import email.utils
import mimetypes
import re
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from typing import Iterable, Optional, Union, cast

from .delivery import RenderedEmailMessage
from .errors import BadRequest, HTTPError
from .fastparse import decode_payload, simple_addresses
from .sdk import mail

_ADDR_SPEC = re.compile(r"[!-~]+@[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?\.?")
_TEXT_CHARSETS_TRIED = ("utf-8", "latin-1")
_UTF8_NAMES = (None, "us-ascii", "ascii", "utf-8", "utf8")  # charsets whose text is read as UTF-8 first
_TEXT_SLICE = 8192
# Blank, only commas, or an empty group such as "undisclosed-recipients:;".
_EMPTY_ADDRESS_LIST = re.compile(r"[\s,]*(?:[^:;<>@\"]*:\s*;[\s,]*)?")
_ALLOWED_HEADERS = {name.lower(): name for name in mail.HEADER_WHITELIST}
_BODY_FIELDS = {"text/plain": "body", "text/html": "html"}


def header_text(value) -> str:
    """Return a header value as text on one line, raw 8-bit bytes read as UTF-8 (else latin-1).

    The parser keeps undecodable 8-bit header bytes as surrogates; RFC 6532 mail
    carries UTF-8 there, older mail often latin-1.
    """
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    return " ".join(text.split())


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words in a display name, subject or file name."""
    text = header_text(text)
    if "=?" not in text:
        return text
    try:
        return header_text(make_header(decode_header(text)))
    except (LookupError, UnicodeError, ValueError, HeaderParseError):
        return text  # malformed encoded words are shown as they came


def _format_address(name: str, spec: str, header: str) -> str:
    """Render one address as ASCII, the display name RFC 2047 encoded if needed."""
    if not _ADDR_SPEC.fullmatch(spec) or spec.count("@") != 1:
        raise BadRequest(f"{header} address {header_text(spec)!r} is not a valid email address")
    return email.utils.formataddr((decode_words(name), spec), charset="utf-8")


def _addresses(message: Message, header: str) -> list[str]:
    """Return every address in every `header` line, formatted for the Mail API."""
    found: list[str] = []
    for value in message.get_all(header, []):
        value = str(value)
        pairs = simple_addresses(value) or email.utils.getaddresses([value])
        if not any(spec for _, spec in pairs) and not _EMPTY_ADDRESS_LIST.fullmatch(value):
            raise BadRequest(f"{header} header {header_text(value)!r} holds no valid address")
        found.extend(_format_address(name, spec, header) for name, spec in pairs if spec or name.strip())
    return found


def _decode_text(part: Message, data: bytes) -> str:
    """Decode a text part with its declared charset (8-bit bytes with none: UTF-8, else latin-1)."""
    charset = part.get_content_charset()
    if charset and charset not in ("us-ascii", "ascii"):
        try:
            return data.decode(charset, "replace")
        except LookupError:
            raise BadRequest(f"unknown charset {charset!r} in a {part.get_content_type()} part") from None
    for name in _TEXT_CHARSETS_TRIED:
        try:
            return data.decode(name)
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _is_utf8(data: bytes) -> bool:
    """Whether `data` is valid UTF-8, decoded a slice at a time so no str of its size is built."""
    if data.isascii():
        return True
    view = memoryview(data)
    at = 0
    try:
        while at < len(view):
            stop = at + _TEXT_SLICE
            at += codecs.utf_8_decode(view[at:stop], "strict", stop >= len(view))[1]  # a split character waits
    except UnicodeDecodeError:
        return False
    return True


def text_body(part: Message) -> Union[bytes, str]:
    """A text part as the Mail API stores it: _decode_text()'s text, as UTF-8 bytes.

    Most mail is UTF-8 (or ASCII) already: then its bytes are what encoding the
    decoded text would give, and they are passed on as they came, without a
    str of their size (up to four bytes a character).  Text that UTF-8 cannot
    encode (lone surrogates, which a few codecs produce) stays str, so sending
    refuses it as it always did.
    """
    data = decode_payload(part)
    if part.get_content_charset() in _UTF8_NAMES and _is_utf8(data):
        return data
    text = _decode_text(part, data)
    del data
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text


def _attachment_name(part: Message, name: Optional[str], index: int) -> str:
    """The part's file name, RFC 2047 decoded, else one made from its content type."""
    if name:
        name = decode_words(name).strip()
    if not name:
        extension = mimetypes.guess_extension(part.get_content_type()) or ".bin"
        name = "attachment" + extension if index == 0 else f"attachment-{index}{extension}"
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    if extension in mail.EXTENSION_BLACKLIST:
        raise BadRequest(f"attachments of type .{extension} are forbidden by the Mail API ({name!r})")
    return name


def _leaf_parts(message: Message) -> Iterable[Message]:
    """Yield the parts to deliver, depth first; attached messages stay whole."""
    if message.is_multipart() and message.get_content_type() != "message/rfc822":
        for sub in cast("list[Message]", message.get_payload()):
            yield from _leaf_parts(sub)
    else:
        yield message


def _bodies_and_attachments(message: Message) -> tuple[dict, list]:
    bodies: dict[str, Union[bytes, str]] = {}
    attachments: list = []
    for part in _leaf_parts(message):
        kind = part.get_content_type()
        filename = part.get_filename()
        body_field = _BODY_FIELDS.get(kind)
        is_attachment = bool(filename) or part.get_content_disposition() == "attachment"
        if body_field and body_field not in bodies and not is_attachment and "Content-ID" not in part:
            bodies[body_field] = text_body(part)
            continue
        if kind == "message/rfc822" or kind.startswith("multipart/"):
            payload = part.get_payload()
            if isinstance(payload, list):  # an attached message: its parts as they came
                data = b"".join(cast(Message, sub).as_bytes() for sub in payload)
            else:
                data = part.as_bytes()
        else:
            data = decode_payload(part)
        name = _attachment_name(part, filename, len(attachments))
        content_id = header_text(part.get("Content-ID", ""))
        if content_id:
            if not content_id.isascii():
                raise BadRequest(f"Content-ID {content_id!r} is not ASCII")
            if not content_id.startswith("<"):
                content_id = f"<{content_id}>"
        attachments.append(mail.Attachment(name, data, content_id=content_id or None))
    if not bodies:
        bodies["body"] = b""
    return bodies, attachments


class Outgoing:
    """What the Mail API will be asked to send, built from a parsed message."""

    def __init__(self, message: Message, max_recipients: int):
        try:
            senders = _addresses(message, "From")
            self.sender: Optional[str] = senders[0] if senders else None
            reply_to = _addresses(message, "Reply-To")
            self.reply_to = reply_to[0] if reply_to else None
            self.recipients = {h: _addresses(message, h) for h in ("To", "Cc", "Bcc")}
            subject = message.get("Subject")
            self.subject = decode_words(subject) if subject is not None else ""
            self.headers: dict[str, str] = {}
            for name, value in message.items():
                allowed = _ALLOWED_HEADERS.get(name.lower())
                if allowed and allowed not in self.headers:  # the first of each, as message[name] gives
                    self.headers[allowed] = header_text(value)
            self.bodies, self.attachments = _bodies_and_attachments(message)
        except HTTPError:
            raise
        except (ValueError, TypeError, LookupError, IndexError, AttributeError) as exc:
            # Hostile structure the email package could not make sense of.
            raise BadRequest(f"msg could not be read as an email message ({type(exc).__name__})") from None
        count = self.recipient_count
        if count == 0:
            raise BadRequest("message has no recipients in To, Cc or Bcc")
        if count > max_recipients:
            raise BadRequest(f"message has {count} recipients, more than the limit of {max_recipients}")

    @property
    def recipient_count(self) -> int:
        return sum(len(v) for v in self.recipients.values())

    def to_email_message(self, sender: str, reply_to: Optional[str]) -> RenderedEmailMessage:
        fields: dict = {"sender": sender, "subject": self.subject, **self.bodies}
        fields.update({h.lower(): v for h, v in self.recipients.items() if v})
        if reply_to:
            fields["reply_to"] = reply_to
        if self.headers:
            fields["headers"] = self.headers
        if self.attachments:
            fields["attachments"] = self.attachments
        return RenderedEmailMessage(**fields)
