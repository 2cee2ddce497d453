"""RFC 2822 message -> the Mail API's EmailMessage: what is kept, and what is refused.

Addresses are checked and rendered as ASCII, text bodies decoded with their
charset, every other part becomes an attachment (nothing is silently dropped),
and only the headers the Mail API accepts are passed on.  Anything the email
package cannot make sense of is the client's 400, never a 500.
"""

from __future__ import annotations

import binascii
import codecs
import email.utils
import mimetypes
import re
import unicodedata
from email.errors import MessageError
from email.header import decode_header, make_header
from email.message import Message
from functools import partial
from typing import Callable, Iterable, Optional, TypeVar, Union, cast

import gmail

from .delivery import RenderedEmailMessage
from .errors import BadRequest, HTTPError
from .fastparse import decode_payload, simple_addresses
from .sdk import mail

_ADDR_SPEC = re.compile(r"[!-~]+@[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?\.?")
_UTF8_NAMES = (None, "us-ascii", "ascii", "utf-8", "utf8")  # charsets whose text is read as UTF-8 first
_TEXT_SLICE = 8192
# Blank, only commas, or an empty group such as "undisclosed-recipients:;".
_EMPTY_ADDRESS_LIST = re.compile(r"[\s,]*(?:[^:;<>@\"]*:\s*;[\s,]*)?")
_ALLOWED_HEADERS = {name.lower(): name for name in mail.HEADER_WHITELIST}
_BODY_FIELDS = {"text/plain": "body", "text/html": "html"}
# Headers the conversion reads itself: they shape what is sent rather than being passed on.
_READ_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "mime-version", "content-type", "content-transfer-encoding"}
)
T = TypeVar("T")


def _read_8bit(value) -> str:
    """Return a header value as text, raw 8-bit bytes read as UTF-8 (else latin-1), nothing else changed.

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
    return text


def header_text(value) -> str:
    """Return a header value as text on one line (see _read_8bit), runs of whitespace made one space."""
    return " ".join(_read_8bit(value).split())


_SURROGATE = re.compile("[\ud800-\udfff]")


def without_surrogates(text: str) -> str:
    """`text` with lone surrogates (which some codecs, utf-7 among them, let through) made U+FFFD.

    Such text cannot be encoded for sending, nor printed, nor read back from JSON everywhere.
    """
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _decoded_words(text: str) -> str:
    """Decode the RFC 2047 encoded words in `text`, leaving everything else as it is."""
    if "=?" not in text:
        return text
    try:
        return without_surrogates(str(make_header(decode_header(text))))
    except (LookupError, UnicodeError, ValueError, MessageError):
        # A malformed encoded word, or one naming a charset that does not exist
        # (CharsetError): shown as it came, as mail clients do.
        return text


_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t]+(?==\?)")


def _leniently_decoded_words(text: str) -> str:
    """Decode encoded words as lenient mail clients do: an unknown charset read as latin-1, "*lang" ignored.

    The stdlib's strict decoding gives up on such words and leaves them as they
    came, but the recipient's client may still show "=?x-bogus?q?evil.exe?=" as
    "evil.exe"; a file name is judged by what the recipient will see.
    """

    def decode(word: re.Match) -> str:
        charset, encoding, payload = word[1].partition("*")[0], word[2].upper(), word[3]
        try:
            if encoding == "Q":
                data = binascii.a2b_qp(payload.replace("_", " ").encode("latin-1", "replace"), header=True)
            else:
                data = binascii.a2b_base64(payload.encode("latin-1", "replace") + b"==")
        except (binascii.Error, ValueError):
            return word[0]
        try:
            return without_surrogates(data.decode(charset or "latin-1", "replace"))
        except LookupError:
            return data.decode("latin-1")

    return _ENCODED_WORD.sub(decode, _BETWEEN_WORDS.sub("", text))


def decode_words(text: str, what: str = "a header") -> str:
    """Decode RFC 2047 encoded words in a display name or subject, on one line; refuse control characters."""
    decoded = _decoded_words(header_text(text))
    if not decoded.isprintable() and any(_is_control(c) for c in decoded):
        raise BadRequest(f"{what} holds control characters: {decoded!r}"[:300])
    return header_text(decoded)


def _format_address(name: str, spec: str, header: str) -> str:
    """Render one address as ASCII, the display name RFC 2047 encoded if needed."""
    if not _ADDR_SPEC.fullmatch(spec) or spec.count("@") != 1:
        raise BadRequest(f"{header} address {header_text(spec)!r} is not a valid email address")
    return email.utils.formataddr((decode_words(name, f"a {header} display name"), spec), charset="utf-8")


def _addresses(message: Message, header: str, problems: Optional[list[str]] = None) -> list[str]:
    """Return every address in every `header` line, formatted for the Mail API.

    The first bad address is raised; given `problems`, each bad one is noted
    there instead and the good ones are still returned (a dry run's report).
    """
    found: list[str] = []
    for value in message.get_all(header, []):
        value = str(value)
        pairs = simple_addresses(value) or email.utils.getaddresses([value])
        if not any(spec for _, spec in pairs) and not _EMPTY_ADDRESS_LIST.fullmatch(value):
            raise BadRequest(f"{header} header {header_text(value)!r} holds no valid address")
        for name, spec in pairs:
            if not (spec or name.strip()):
                continue
            try:
                found.append(_format_address(name, spec, header))
            except BadRequest as refusal:
                if problems is None:
                    raise
                problems.append(refusal.reason)
    return found


def _decode_text(part: Message, data: bytes) -> str:
    """Decode a text part with its declared charset (8-bit bytes with none: UTF-8, else latin-1)."""
    charset = part.get_content_charset()
    if charset and charset not in ("us-ascii", "ascii"):
        try:
            text = without_surrogates(data.decode(charset, "replace"))
        except LookupError:
            raise BadRequest(f"unknown charset {charset!r} in a {part.get_content_type()} part") from None
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")  # decodes any bytes
    if "\x00" in text:
        raise _nul_in(part)
    return text


def _nul_in(part: Message) -> BadRequest:
    """The refusal of a text part holding a NUL, where an SMTP server may cut the message."""
    return BadRequest(f"a {part.get_content_type()} part holds a NUL character; send binary data as an attachment")


# Invisible characters that reorder what a reader sees ("evil\u202etxt.exe" shows as "evilexe.txt").
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _is_control(char: str) -> bool:
    """A character no file name should hold: C0/C1 controls (a tab from folding aside) and bidi controls."""
    return char in _BIDI_CONTROLS or (char != "\t" and unicodedata.category(char) == "Cc")


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
        if b"\x00" in data:
            raise _nul_in(part)
        return data
    text = _decode_text(part, data)
    del data
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text


def _attachment_name(part: Message, name: Optional[str], index: int) -> str:
    """The part's file name as the recipient's system will see it, else one made from its content type.

    get_filename() has already joined and decoded the RFC 2231 form; RFC 2047
    words are decoded here, leniently where the stdlib gives up, as clients do.
    A name with control characters is refused (a NUL ends the name early on many
    systems, so "evil.exe\0.txt" is "evil.exe"); trailing dots and spaces are
    dropped, as Windows drops them, before the extension is checked.
    """
    if name:
        shown = _decoded_words(_read_8bit(name).replace("\r", "").replace("\n", ""))  # unfolded, then decoded
        if _ENCODED_WORD.search(shown):
            shown = _leniently_decoded_words(shown)
        if not shown.isprintable() and any(_is_control(c) for c in shown):
            raise BadRequest(f"attachment name {shown[:200]!r} holds control characters")
        name = " ".join(shown.split()).rstrip(". ")
    if not name:
        extension = mimetypes.guess_extension(part.get_content_type()) or ".bin"
        name = "attachment" + extension if index == 0 else f"attachment-{index}{extension}"
    extension = name.rpartition(".")[2].lower() if "." in name else ""
    if extension in mail.EXTENSION_BLACKLIST:
        raise BadRequest(f"attachments of type .{extension} are forbidden by the Mail API ({name[:200]!r})")
    return name


def _check_names_inside(attached: Message) -> None:
    """Refuse an attached message holding a forbidden attachment: it is one click away for the recipient."""
    for inner in attached.walk():
        filename = inner.get_filename() if inner is not attached else None
        if filename:
            _attachment_name(inner, filename, 0)


def _leaf_parts(message: Message) -> Iterable[Message]:
    """Yield the parts to deliver, depth first; attached messages stay whole."""
    if message.is_multipart() and message.get_content_type() != "message/rfc822":
        for sub in cast("list[Message]", message.get_payload()):
            yield from _leaf_parts(sub)
    else:
        yield message


def _add_part(part: Message, bodies: dict[str, Union[bytes, str]], attachments: list) -> None:
    """Add one leaf part: the first plain and HTML bodies are the message's; everything else is attached."""
    kind = part.get_content_type()
    filename = part.get_filename()
    body_field = _BODY_FIELDS.get(kind)
    is_attachment = bool(filename) or part.get_content_disposition() == "attachment"
    if body_field and body_field not in bodies and not is_attachment and "Content-ID" not in part:
        bodies[body_field] = text_body(part)
        return
    if kind == "message/rfc822" or kind.startswith("multipart/"):
        _check_names_inside(part)
        payload = part.get_payload()
        if isinstance(payload, list):  # an attached message: its parts as they came
            data = b"".join(cast(Message, sub).as_bytes() for sub in payload)
        else:
            data = part.as_bytes()
    else:
        data = decode_payload(part)
    try:
        name = _attachment_name(part, filename, len(attachments))
    except BadRequest:
        refused = mail.Attachment(header_text(filename or ""), data)
        refused.declared_type, refused.refused = kind, True  # for a dry run's report; a send stops here
        attachments.append(refused)
        raise
    content_id = header_text(part.get("Content-ID", ""))
    if content_id:
        if not content_id.isascii():
            raise BadRequest(f"Content-ID {content_id!r} is not ASCII")
        if not content_id.startswith("<"):
            content_id = f"<{content_id}>"
    attachment = mail.Attachment(name, data, content_id=content_id or None)
    attachment.declared_type = kind  # what the sender called it; the Mail API labels it by its extension
    attachments.append(attachment)


def _passed_headers(message: Message) -> tuple[dict[str, str], list[str]]:
    """The headers passed on to the Mail API (the first of each it accepts), and the names of the others."""
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in message.items():
        allowed = _ALLOWED_HEADERS.get(name.lower())
        if allowed and allowed not in kept:
            text = _read_8bit(value)
            if not text.isprintable() and any(_is_control(c) for c in text.replace("\r", "").replace("\n", "")):
                raise BadRequest(f"header {allowed} holds control characters")
            kept[allowed] = header_text(value)
        elif (allowed or name.lower() not in _READ_HEADERS) and header_text(name) not in dropped:
            dropped.append(header_text(name))
    return kept, dropped


class Outgoing:
    """What the Mail API will be asked to send, built from a parsed message.

    A send stops at the first refusal.  Given a `problems` list, the
    conversion instead adds each refusal to it and goes on, so a dry run can
    report every refusal a send would get.
    """

    def __init__(self, message: Message, max_recipients: int, problems: Optional[list[str]] = None):
        self._problems = problems
        senders = self._addresses(message, "From")
        self.sender: Optional[str] = senders[0] if senders else None
        reply_to = self._addresses(message, "Reply-To")
        self.reply_to = reply_to[0] if reply_to else None
        self.recipients = {header: self._addresses(message, header) for header in ("To", "Cc", "Bcc")}
        subject = message.get("Subject")
        self.subject = self._try(lambda: decode_words(subject, "the Subject"), "") if subject is not None else ""
        no_headers: tuple[dict[str, str], list[str]] = ({}, [])
        self.headers, self.headers_dropped = self._try(lambda: _passed_headers(message), no_headers)
        self.bodies: dict[str, Union[bytes, str]] = {}
        self.attachments: list = []
        no_parts: list[Message] = []
        for part in self._try(lambda: list(_leaf_parts(message)), no_parts):
            self._try(partial(_add_part, part, self.bodies, self.attachments), None)
        if not self.bodies:
            self.bodies["body"] = b""
        count = self.recipient_count
        if count == 0:
            self._refuse(BadRequest("message has no recipients in To, Cc or Bcc"))
        if count > max_recipients:
            self._refuse(BadRequest(f"message has {count} recipients, more than the limit of {max_recipients}"))

    def _addresses(self, message: Message, header: str) -> list[str]:
        none: list[str] = []
        return self._try(lambda: _addresses(message, header, self._problems), none)

    def _try(self, step: Callable[[], T], fallback: T) -> T:
        """Run one step of the conversion; a refusal is raised, or noted and `fallback` used."""
        try:
            return step()
        except HTTPError as refusal:
            self._refuse(refusal)
        except (ValueError, TypeError, LookupError, IndexError, AttributeError) as exc:
            # Hostile structure the email package could not make sense of.
            self._refuse(BadRequest(f"msg could not be read as an email message ({type(exc).__name__})"))
        return fallback

    def _refuse(self, refusal: HTTPError) -> None:
        if self._problems is None:
            raise refusal
        self._problems.append(refusal.reason)

    def identities(self, sender: str) -> list[str]:
        """Every address the message would be sent as: the sender, and any Resent-From or On-Behalf-Of."""
        claimed = [address_of(sender)]
        for header in ("Resent-From", "On-Behalf-Of"):
            if header in self.headers:
                claimed += [spec for _, spec in email.utils.getaddresses([self.headers[header]]) if spec]
        return claimed

    @property
    def recipient_count(self) -> int:
        return sum(len(v) for v in self.recipients.values())

    def to_email_message(self, sender: str, reply_to: Optional[str]) -> RenderedEmailMessage:
        # The SDK refuses an empty HTML body (ValueError); a blank text body it takes.
        bodies = {field: text for field, text in self.bodies.items() if text or field == "body"} or {"body": b""}
        fields: dict = {"sender": sender, "subject": self.subject, **bodies}
        fields.update({h.lower(): v for h, v in self.recipients.items() if v})
        if reply_to:
            fields["reply_to"] = reply_to
        if self.headers:
            fields["headers"] = self.headers
        if self.attachments:
            fields["attachments"] = self.attachments
        return RenderedEmailMessage(**fields)


def choose_sender(outgoing: Outgoing, fix_sender: bool, default_sender: Optional[str]) -> str:
    """The message's From; without one, the default sender if the client asked for fix_sender."""
    if outgoing.sender is not None:
        return outgoing.sender
    if not fix_sender:
        raise BadRequest("message has no From address (send with fix_sender to use the default sender)")
    return default_sender_or_refuse(default_sender, "message has no From address")


def default_sender_or_refuse(default_sender: Optional[str], why: str) -> str:
    """The default sender; without one, a 400 marked as the proxy's setup (clients keep such mail for later)."""
    if not default_sender:
        raise BadRequest(
            f"{why} and the proxy has no default sender (GMAIL_DEFAULT_SENDER)",
            [(gmail.ERROR_HEADER, gmail.NO_DEFAULT_SENDER)],
        )
    return default_sender


def address_of(mailbox: str) -> str:
    """The bare address of "Name <a@b.c>", as formataddr() wrote it (the display name encoded, so no '<' in it)."""
    if mailbox.endswith(">") and "<" in mailbox:
        return mailbox[mailbox.rindex("<") + 1 : -1]
    return mailbox.strip()
