"""appengine-mailer server: send signed RFC 2822 messages through App Engine's Mail API.

Clients POST ``msg`` (the raw message) and ``signature`` (base64 HMAC-SHA1 of the
message under a shared secret) as an urlencoded form to ``/``.  The server checks
the signature against every configured key, converts the message with the stdlib
``email`` package into ``google.appengine.api.mail.EmailMessage`` and calls its
``send()``.  Answers: 204 sent, 400 the client's fault (the body says why),
413/415/405 for requests outside the interface, 503 with Retry-After when the
mail service is in trouble.

``send()`` goes wherever the SDK sends: the Mail API on App Engine, a real SMTP
server with the SDK's SMTP mode (``APPENGINE_USE_SMTP_MAIL_SERVICE=true``), or,
by default elsewhere, an outbox stub that writes each message into a Maildir.

Run locally with ``python mailer.py --host 127.0.0.1 --port 8080``.
"""

from __future__ import annotations

import argparse
import binascii
import email.encoders
import email.utils
import hashlib
import hmac
import json
import logging
import mailbox
import mimetypes
import os
import re
import secrets
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections import OrderedDict
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import unquote_to_bytes
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from google.appengine.api import apiproxy_stub_map, mail, mail_errors
from google.appengine.runtime import apiproxy_errors

import gmail

__version__ = gmail.__version__

log = logging.getLogger("appengine_mailer")

HERE = Path(__file__).resolve().parent
MAX_BODY_BYTES = 32 * 1024 * 1024  # App Engine's own request size cap.
MAX_FORM_FIELDS = 16
MAX_HEADERS = 5000  # in the whole message, all parts together (a part has about 4)
MAX_PARTS = 500
DEFAULT_MAX_RECIPIENTS = 100
DEFAULT_SMTP_TIMEOUT = 30.0
MIN_KEY_LENGTH = 16
RETRY_AFTER_SECONDS = 60
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


# ---------------------------------------------------------------------------
# HTTP errors: the one place where a failure becomes a status code.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _setting(name: str, environ: dict, search: Iterable[Path]) -> tuple[Optional[str], Optional[Path]]:
    """Return a setting and the file it came from: the environment first, then the first file found."""
    if environ.get(name):
        return environ[name], None
    for folder in search:
        path = folder / name
        if path.is_file():
            return path.read_text(encoding="utf-8"), path
    return None, None


def parse_keys(text: Optional[str]) -> list[bytes]:
    """Split a key file into keys: one per line, blank lines and outer whitespace ignored."""
    if not text:
        return []
    return [line.strip().encode("utf-8") for line in text.splitlines() if line.strip()]


def key_fingerprint(key: bytes) -> str:
    """A short name for a key that reveals nothing of it, for listings and logs."""
    return hashlib.sha256(key).hexdigest()[:12]


def keys_from_environment(environ: Optional[dict] = None, root: Path = HERE) -> list[bytes]:
    """Read the secret keys: env GMAIL_SECRET_KEY, else keys/, else the original's file names.

    Warns (never failing) about a key file others can read and about short keys.
    """
    environ = os.environ if environ is None else environ
    text, path = _setting("GMAIL_SECRET_KEY", environ, [root / "keys", root])
    if not parse_keys(text):
        text, path = _setting("GMAIL_SECRET_KEYS", {}, [root])
    keys = parse_keys(text)
    if path is not None and path.stat().st_mode & 0o077:
        log.warning("key file %s is readable by other users: run chmod 600 %s", path, path)
    for key in keys:
        if len(key) < MIN_KEY_LENGTH:
            log.warning("key %s is only %d characters long: replace it with `python mailer.py keys new`",
                        key_fingerprint(key), len(key))
    return keys


def default_sender_from_environment(environ: Optional[dict] = None, root: Path = HERE) -> Optional[str]:
    """Read the optional default sender the same way as the keys."""
    environ = os.environ if environ is None else environ
    value, _ = _setting("GMAIL_DEFAULT_SENDER", environ, [root / "keys", root])
    return value.strip() or None if value else None


def smtp_mode(environ: Optional[dict] = None) -> bool:
    """Whether the SDK will deliver through SMTP instead of the Mail API."""
    environ = os.environ if environ is None else environ
    return environ.get("APPENGINE_USE_SMTP_MAIL_SERVICE") == "true"


def on_app_engine(environ: Optional[dict] = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("GAE_ENV", "").startswith("standard")


# ---------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------

_PRINTABLE_ASCII = bytes(range(0x21, 0x7F))  # what any urlencoder emits
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# One pass for both: '+' is a space, and '%XX' becomes the quoted-printable '=XX'.
_FORM_TO_QP = bytes.maketrans(b"+%", b" =")


def _unquote_exactly(raw: bytes, name: str) -> bytes:
    """The reference decoding: refuse a malformed escape, else the stdlib's unquote_to_bytes."""
    if raw.translate(None, _PRINTABLE_ASCII):
        raise BadRequest(f"field {name!r} holds characters that urlencoding never produces")
    if _BAD_ESCAPE.search(raw):
        raise BadRequest(f"field {name!r} has a malformed percent-escape")
    return unquote_to_bytes(raw.replace(b"+", b" "))


def parse_form(body: bytes) -> dict[str, bytes]:
    """Parse an application/x-www-form-urlencoded body into raw bytes, by hand.

    The stdlib decodes values to str; the signature is over the client's exact
    bytes, 8-bit and non-UTF-8 included, so each value is decoded to bytes here.

    Fast path: with '+' written as a space and '%' as '=', percent-escapes are
    quoted-printable escapes, which binascii decodes in C, reading each value
    through a memoryview of one translated copy of the body.  Each valid escape
    shrinks three bytes to one and a malformed one shrinks less, so the length
    alone proves every escape was valid.  A value with a literal '=' (no
    urlencoder writes one, but a lenient client might) or a bad length goes
    through _unquote_exactly.  Both give the same bytes (tests/test_fastpaths.py).
    """
    spans, at = [], 0
    while at <= len(body):
        end = body.find(b"&", at)
        end = len(body) if end == -1 else end
        if end > at:
            spans.append((at, end))
        at = end + 1
    if len(spans) > MAX_FORM_FIELDS:
        raise BadRequest(f"too many form fields (at most {MAX_FORM_FIELDS})")
    printable = not body.translate(None, _PRINTABLE_ASCII)
    translated = memoryview(body.translate(_FORM_TO_QP)) if printable else None
    form: dict[str, bytes] = {}
    for start, end in spans:
        equals = body.find(b"=", start, end)
        split = end if equals == -1 else equals
        try:
            name = _unquote_exactly(body[start:split], "name").decode("ascii")
        except (BadRequest, UnicodeDecodeError):
            raise BadRequest("a form field name is not valid urlencoded ASCII") from None
        if name in form:
            raise BadRequest(f"form field {name!r} given more than once")
        value_start = min(split + 1, end)
        value = None
        if printable and body.find(b"=", value_start, end) == -1:
            value = binascii.a2b_qp(translated[value_start:end])
            if len(value) != end - value_start - 2 * body.count(b"%", value_start, end):
                value = None
        form[name] = value if value is not None else _unquote_exactly(body[value_start:end], name)
    return form


def _flag(form: dict[str, bytes], name: str) -> bool:
    word = form.get(name, b"").strip().lower().decode("ascii", "replace")
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadRequest(f"field {name!r} must be true or false, not {word!r}")


def read_body(environ: dict, limit: int) -> bytes:
    """Read the request body, refusing it from Content-Length before reading anything."""
    length = environ.get("CONTENT_LENGTH", "")
    if not length:
        raise LengthRequired("a POST needs a Content-Length header")
    if not (length.isascii() and length.isdigit()):
        raise BadRequest(f"Content-Length {length!r} is not a number")
    size = int(length)
    if size > limit:
        raise PayloadTooLarge(f"request body of {size} bytes is over the {limit}-byte limit")
    stream = environ["wsgi.input"]
    body = stream.read(size) if size else b""
    if len(body) == size:  # the usual case: no second copy of the body
        return body
    chunks, remaining = [body], size - len(body)
    while remaining:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            raise BadRequest("request body is shorter than its Content-Length")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------


def check_signature(keys: list[bytes], msg: bytes, signature: bytes) -> None:
    """Accept a v1 request if its signature matches any configured key."""
    _match_any(keys, lambda key: gmail.sign_v1(key, msg), signature.strip())


def _match_any(keys: list[bytes], expected_for: Callable[[bytes], str], given: bytes) -> None:
    matched = False
    for key in keys:
        # Every key is tried, so the time taken does not tell which one matched.
        matched |= hmac.compare_digest(expected_for(key).encode("ascii"), given)
    if not matched:
        raise BadRequest("signature does not match the message under any configured key")


def check_signature_v2(keys: list[bytes], form: dict[str, bytes], fix_sender: bool, now: float,
                       window: int) -> str:
    """Accept a v2 request: signature over tag, timestamp, fix_sender and msg, within the window.

    Returns the signature, which names this exact request for the replay store.
    """
    raw_stamp = form.get("timestamp", b"")
    if not (raw_stamp.isascii() and raw_stamp.isdigit() and len(raw_stamp) <= 12):
        raise BadRequest(f"timestamp {raw_stamp.decode('ascii', 'replace')!r} is not a whole number of "
                         f"seconds since 1970 (signature_v2 needs one)")
    stamp = raw_stamp.decode("ascii")
    signature = form["signature_v2"].strip().lower()
    _match_any(keys, lambda key: gmail.sign_v2(key, stamp, fix_sender, form["msg"]), signature)
    age = now - int(stamp)
    if age > window:
        raise BadRequest(f"request expired: signed at {stamp}, server time is {int(now)} "
                         f"(requests are valid for {window} s)")
    if age < -window:
        raise BadRequest(f"request is from the future: signed at {stamp}, server time is {int(now)}; "
                         f"check the client's clock")
    return signature.decode("ascii")


# ---------------------------------------------------------------------------
# Replay store: each sent v2 request is remembered for its window
# ---------------------------------------------------------------------------

SENT, PENDING = "sent", "pending"


class InProcessReplayStore:
    """Remember requests in this process, at most `max_entries` of them, oldest forgotten first.

    For a single-process server; every entry expires with its request's window.
    """

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self._clock = clock
        self._entries: "OrderedDict[str, tuple[str, float]]" = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, key: str, ttl: float) -> Optional[str]:
        """Mark `key` pending and return None, or return its state if it is already known."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] > now:
                return entry[0]
            self._entries.pop(key, None)
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            self._entries[key] = (PENDING, now + ttl)
        return None

    def mark_sent(self, key: str, ttl: float) -> None:
        with self._lock:
            self._entries[key] = (SENT, self._clock() + ttl)

    def release(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class MemcacheReplayStore:
    """Remember requests in App Engine's bundled memcache, shared by every instance."""

    NAMESPACE = "appengine-mailer-replay"

    def __init__(self):
        from google.appengine.api import memcache

        self._memcache = memcache

    def claim(self, key: str, ttl: float) -> Optional[str]:
        if self._memcache.add(key, PENDING, time=max(1, int(ttl)), namespace=self.NAMESPACE):
            return None
        state = self._memcache.get(key, namespace=self.NAMESPACE)
        if state is None:
            # Memcache is unavailable or just evicted it: send rather than refuse mail.
            log.warning("replay store unavailable; sending without the duplicate check")
        return state

    def mark_sent(self, key: str, ttl: float) -> None:
        self._memcache.set(key, SENT, time=max(1, int(ttl)), namespace=self.NAMESPACE)

    def release(self, key: str) -> None:
        self._memcache.delete(key, namespace=self.NAMESPACE)


# ---------------------------------------------------------------------------
# Message conversion: RFC 2822 bytes -> mail.EmailMessage
# ---------------------------------------------------------------------------

_ADDR_SPEC = re.compile(r"[!-~]+@[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?\.?")
_TEXT_CHARSETS_TRIED = ("utf-8", "latin-1")
# Blank, only commas, or an empty group such as "undisclosed-recipients:;".
_EMPTY_ADDRESS_LIST = re.compile(r"[\s,]*(?:[^:;<>@\"]*:\s*;[\s,]*)?")


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


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_ADDRESS = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:(?P<name>(?:{_ATEXT}|[ \t])*?)[ \t]*<(?P<bracketed>{_DOT_ATOM_ADDRESS})>"
    rf"|(?P<bare>{_DOT_ATOM_ADDRESS}))[ \t]*")


def simple_addresses(value: str) -> Optional[list[tuple[str, str]]]:
    """getaddresses() for the common plain shapes ("Name <a@b.c>", "a@b.c", comma-separated); else None.

    No quotes, comments, groups, domain literals, folding or empty list items
    (3.13 treats some as errors): those go to the stdlib, which this must agree
    with exactly (tests/test_fastpaths.py).
    """
    if any(c in value for c in '"()\\:;[]\r\n'):
        return None
    pairs = []
    for item in value.split(","):
        match = _SIMPLE_ADDRESS.fullmatch(item)  # an empty item (",,") too goes to the stdlib
        if match is None:
            return None
        pairs.append((" ".join((match["name"] or "").split()), match["bracketed"] or match["bare"]))
    return pairs or None


def _addresses(message: Message, header: str) -> list[str]:
    """Return every address in every `header` line, formatted for the Mail API."""
    found = []
    for value in message.get_all(header, []):
        value = str(value)
        pairs = simple_addresses(value) or email.utils.getaddresses([value])
        if not any(spec for _, spec in pairs) and not _EMPTY_ADDRESS_LIST.fullmatch(value):
            raise BadRequest(f"{header} header {header_text(value)!r} holds no valid address")
        found.extend(_format_address(name, spec, header) for name, spec in pairs if spec or name.strip())
    return found


def _decode_text(part: Message) -> str:
    """Decode a text part with its declared charset (8-bit bytes with none: UTF-8, else latin-1)."""
    data = decode_payload(part)
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
        for sub in message.get_payload():
            yield from _leaf_parts(sub)
    else:
        yield message


_BODY_FIELDS = {"text/plain": "body", "text/html": "html"}


def _bodies_and_attachments(message: Message) -> tuple[dict, list[mail.Attachment]]:
    bodies: dict[str, str] = {}
    attachments: list[mail.Attachment] = []
    for part in _leaf_parts(message):
        kind = part.get_content_type()
        filename = part.get_filename()
        body_field = _BODY_FIELDS.get(kind)
        is_attachment = bool(filename) or part.get_content_disposition() == "attachment"
        if body_field and body_field not in bodies and not is_attachment and "Content-ID" not in part:
            bodies[body_field] = _decode_text(part)
            continue
        if kind == "message/rfc822" or kind.startswith("multipart/"):
            payload = part.get_payload()
            data = b"".join(sub.as_bytes() for sub in payload) if isinstance(payload, list) else part.as_bytes()
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
        bodies["body"] = ""
    return bodies, attachments


# Bodies made only of base64 lines are cut out before parsing and put back after:
# the stdlib still parses every header and the whole structure, but is spared
# walking a multi-megabyte attachment line by line.
BASE64_LINE_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
MIN_CUT_BYTES = 8 * 1024  # below this, cutting costs more than the parse it saves
MAX_HEADER_BLOCK = 64 * 1024


def _body_start(raw: bytes, start: int) -> int:
    """Offset just after the first blank line at or after `start` (a header block's end), or -1."""
    limit = start + MAX_HEADER_BLOCK
    found = [at + len(blank) for blank in (b"\n\n", b"\n\r\n") if (at := raw.find(blank, start, limit)) != -1]
    return min(found) if found else -1


def cut_base64_bodies(raw: bytes) -> tuple[bytes, dict[str, tuple[bytes, bytes]]]:
    """Replace each large all-base64 body (up to the next line starting "-") with a token line.

    Base64 has no '-', so a body ends at the first one at the latest: found with
    one memchr instead of a line-by-line walk.  Returns the skeleton and, per
    token, the body without its last line ending and that line ending.
    """
    if len(raw) < MIN_CUT_BYTES:
        return raw, {}
    prefix = b"AppengineMailerCut" + secrets.token_hex(8).encode("ascii") + b"x"
    pieces, cuts, done, pos = [], {}, 0, 0
    while (body_start := _body_start(raw, pos)) != -1:
        dash = raw.find(b"-", body_start)
        if dash == -1:
            end = pos = len(raw)
        else:
            end = raw.rfind(b"\n", body_start - 1, dash) + 1  # start of the line holding the '-'
            pos = end if end > body_start else dash + 1
        if end - body_start < MIN_CUT_BYTES or (dash != -1 and raw[end:end + 1] != b"-"):
            continue
        ending = raw[end - 2:end] if raw.endswith(b"\r\n", 0, end) else raw[end - 1:end]
        if ending not in (b"\r\n", b"\r", b"\n"):
            ending = b""
        body = raw[body_start:end - len(ending)]
        if body.translate(None, BASE64_LINE_BYTES):
            continue
        token = prefix + str(len(cuts)).encode("ascii")
        cuts[token.decode("ascii")] = (body, ending)
        pieces += [raw[done:body_start], token + ending]
        done = end
    if not cuts or prefix in raw:
        return raw, {}
    pieces.append(raw[done:])
    return b"".join(pieces), cuts


def restore_cut_bodies(message: Message, cuts: dict[str, tuple[bytes, bytes]]) -> bool:
    """Put each cut body back into the part holding its token; False if any is not exactly there.

    Such a part is marked `cut_base64` for decode_payload().
    """
    restored = 0
    for part in message.walk():
        payload = part._payload
        if not isinstance(payload, str) or payload.rstrip("\r\n") not in cuts:
            continue
        token = payload.rstrip("\r\n")
        body, ending = cuts[token]
        rest = payload[len(token):]
        if rest not in ("", ending.decode("ascii")):
            return False
        part.set_payload(body.decode("ascii") + rest)
        part.cut_base64 = True
        restored += 1
    return restored == len(cuts)


def decode_payload(part: Message) -> bytes:
    """Return part.get_payload(decode=True), decoding a cut base64 body in one C call.

    Taken only where the stdlib gives the same bytes: the part says base64, its
    body is base64 lines with at most two '=' and only at the end, and binascii
    decodes it without error (it refuses what the stdlib would have to repair).
    """
    if getattr(part, "cut_base64", False) and str(part.get("content-transfer-encoding", "")).lower() == "base64":
        body = part._payload
        first_pad = body.find("=")
        if first_pad == -1 or (not body[first_pad:].strip("=\r\n") and body.count("=", first_pad) <= 2):
            try:
                return binascii.a2b_base64(body)
            except binascii.Error:
                pass
    return part.get_payload(decode=True) or b""


class RawHeaderPolicy(policy.Compat32):
    """compat32, but headers come back exactly as received.

    compat32 replaces raw 8-bit header bytes with U+FFFD when fetched; kept raw,
    header_text() can read them as UTF-8 (RFC 6532) or latin-1.
    """

    def header_fetch_parse(self, name, value):
        return value


RAW_HEADERS = RawHeaderPolicy()


def stdlib_parse(raw: bytes) -> Message:
    """The reference parse: what every fast path must reproduce exactly."""
    return BytesParser(policy=RAW_HEADERS).parsebytes(raw)


def parse_message(raw: bytes) -> Message:
    """Parse the message bytes as the stdlib does (faster for big base64 bodies); refuse non-email."""
    if b"\x00" in raw[:4096]:
        raise BadRequest("msg is binary data, not an RFC 2822 message")
    try:
        skeleton, cuts = cut_base64_bodies(raw)
        message = stdlib_parse(skeleton)
        if cuts and not restore_cut_bodies(message, cuts):
            message = stdlib_parse(raw)
    except Exception as exc:  # the parser has no error type of its own
        raise BadRequest(f"msg is not a parseable email message ({type(exc).__name__})") from None
    if not message.keys():
        raise BadRequest("msg has no headers: it is not an RFC 2822 message")
    parts = headers = 0
    for part in message.walk():
        parts += 1
        headers += len(part)
        if parts > MAX_PARTS or headers > MAX_HEADERS:
            raise BadRequest(f"message has more than {MAX_PARTS} MIME parts or {MAX_HEADERS} header lines")
    return message


_ALLOWED_HEADERS = {name.lower(): name for name in mail.HEADER_WHITELIST}


class Outgoing:
    """What the Mail API will be asked to send, built from a parsed message."""

    def __init__(self, message: Message, max_recipients: int):
        try:
            self.sender = (_addresses(message, "From") or [None])[0]
            reply_to = _addresses(message, "Reply-To")
            self.reply_to = reply_to[0] if reply_to else None
            self.recipients = {h: _addresses(message, h) for h in ("To", "Cc", "Bcc")}
            subject = message.get("Subject")
            self.subject = decode_words(subject) if subject is not None else ""
            self.headers = {}
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
        count = sum(len(v) for v in self.recipients.values())
        if count == 0:
            raise BadRequest("message has no recipients in To, Cc or Bcc")
        if count > max_recipients:
            raise BadRequest(f"message has {count} recipients, more than the limit of {max_recipients}")

    def to_email_message(self, sender: str, reply_to: Optional[str]) -> "RenderedEmailMessage":
        fields = {"sender": sender, "subject": self.subject, **self.bodies}
        fields.update({h.lower(): v for h, v in self.recipients.items() if v})
        if reply_to:
            fields["reply_to"] = reply_to
        if self.headers:
            fields["headers"] = self.headers
        if self.attachments:
            fields["attachments"] = self.attachments
        return RenderedEmailMessage(**fields)


# ---------------------------------------------------------------------------
# Rendering: what the recipient gets outside App Engine (SMTP mode, outbox)
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# The WSGI application
# ---------------------------------------------------------------------------


class Mailer:
    """The WSGI callable: POST / sends, GET / reports health."""

    def __init__(self, keys: list[bytes], default_sender: Optional[str] = None, *,
                 max_body: int = MAX_BODY_BYTES, max_recipients: int = DEFAULT_MAX_RECIPIENTS,
                 require_signature_v2: bool = False, replay_window: int = gmail.REPLAY_WINDOW_SECONDS,
                 replay_store=None, clock: Callable[[], float] = time.time):
        self.keys = [k if isinstance(k, bytes) else k.encode("utf-8") for k in keys]
        self.default_sender = default_sender
        self.max_body = max_body
        self.max_recipients = max_recipients
        self.require_signature_v2 = require_signature_v2
        self.replay_window = replay_window
        self.replay_store = replay_store if replay_store is not None else InProcessReplayStore()
        self.clock = clock

    def __call__(self, environ: dict, start_response: Callable):
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if environ.get("PATH_INFO", "/") not in ("", "/"):
                raise NotFound("not found: the proxy serves only /")
            if method in ("GET", "HEAD"):
                return self._respond(start_response, "200 OK", self.health(), "application/json", method)
            if method != "POST":
                raise MethodNotAllowed(f"method {method} is not allowed: POST a message to /")
            self.handle_post(environ)
        except HTTPError as err:
            return self._respond(start_response, err.status, err.reason + "\n", "text/plain; charset=utf-8",
                                 method, err.headers)
        except Exception as exc:  # a bug: answer without a traceback, whose text could quote the message
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("internal error: %s at %s:%d", type(exc).__name__, Path(frame.filename).name, frame.lineno)
            return self._respond(start_response, "500 Internal Server Error", "internal error\n",
                                 "text/plain; charset=utf-8", method)
        start_response("204 No Content", [])
        return []

    @staticmethod
    def _respond(start_response, status, text, content_type, method, headers=()):
        body = text.encode("utf-8")
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        return [] if method == "HEAD" else [body]

    def health(self) -> str:
        return json.dumps({
            "service": "appengine-mailer",
            "version": __version__,
            "keys": len(self.keys),
            "default_sender": bool(self.default_sender),
            "delivery": delivery_mode(),
            "signature_v2_required": self.require_signature_v2,
            "replay_window_seconds": self.replay_window,
        }) + "\n"

    def handle_post(self, environ: dict) -> None:
        content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(
                f"content type {content_type or 'missing'!r}: send application/x-www-form-urlencoded")
        try:
            self.send(parse_form(read_body(environ, self.max_body)))
        except HTTPError as err:
            log.info("refused: %s (%s) Content-Length=%r", err.status, err.reason, environ.get("CONTENT_LENGTH"))
            raise

    def send(self, form: dict[str, bytes]) -> None:
        """Check, convert and send one message; raise HTTPError for any refusal."""
        fix_sender = _flag(form, "fix_sender")
        replay_key = self.authenticate(form, fix_sender)
        if replay_key is None:
            self._send_message(form["msg"], fix_sender)
            return
        ttl = int(form["timestamp"]) + self.replay_window - self.clock() + 1
        state = self.replay_store.claim(replay_key, ttl)
        if state == SENT:
            log.info("duplicate: already sent within its window, not sent again")
            return
        if state == PENDING:
            raise ServiceUnavailable("the same request is being sent right now; retry shortly", retry_after=1)
        try:
            self._send_message(form["msg"], fix_sender)
        except BaseException:
            self.replay_store.release(replay_key)  # not sent: a retry must send it
            raise
        self.replay_store.mark_sent(replay_key, ttl)

    def authenticate(self, form: dict[str, bytes], fix_sender: bool) -> Optional[str]:
        """Check the request's signature (v2 when present, else v1); return the v2 replay key."""
        if not form.get("msg"):
            raise BadRequest("missing or empty field 'msg'")
        if not self.keys:
            raise ServiceUnavailable("the proxy has no secret key configured (set GMAIL_SECRET_KEY)")
        if form.get("signature_v2"):
            return check_signature_v2(self.keys, form, fix_sender, self.clock(), self.replay_window)
        if not form.get("signature"):
            raise BadRequest("missing or empty field 'signature'")
        if self.require_signature_v2:
            raise BadRequest("this proxy requires signature_v2 (with timestamp); "
                             "upgrade the client or turn it on")
        check_signature(self.keys, form["msg"], form["signature"])
        return None

    def _send_message(self, msg: bytes, fix_sender: bool) -> None:
        outgoing = Outgoing(parse_message(msg), self.max_recipients)
        sender, reply_to = outgoing.sender, outgoing.reply_to
        if sender is None:
            if not fix_sender:
                raise BadRequest("message has no From address (send with fix_sender to use the default sender)")
            sender = self._default_sender_or_refuse("message has no From address")
        try:
            self._deliver(outgoing, sender, reply_to)
        except mail_errors.InvalidSenderError as exc:
            refusal = http_error_for_send_failure(exc)
            if not fix_sender or not isinstance(refusal, BadRequest):  # only a refused sender falls back
                raise refusal from None
            fallback = self._default_sender_or_refuse(f"sender {sender!r} is not authorized")
            self._deliver(outgoing, fallback, reply_to or sender)
        log.info("sent: size=%d recipients=%d attachments=%d",
                 len(msg), sum(map(len, outgoing.recipients.values())), len(outgoing.attachments))

    def _default_sender_or_refuse(self, why: str) -> str:
        if not self.default_sender:
            raise BadRequest(f"{why} and the proxy has no default sender (GMAIL_DEFAULT_SENDER)")
        return self.default_sender

    def _deliver(self, outgoing: Outgoing, sender: str, reply_to: Optional[str]) -> None:
        try:
            message = outgoing.to_email_message(sender, reply_to)
            message.send()
        except mail_errors.InvalidSenderError:
            raise
        except Exception as exc:
            raise http_error_for_send_failure(exc) from None


def make_app(keys: Iterable, default_sender: Optional[str] = None, **limits) -> Mailer:
    """Build the WSGI app from explicit settings, for embedding and tests.

    The app sends through whatever `mail` stub is registered in apiproxy_stub_map.
    """
    return Mailer(list(keys), default_sender, **limits)


def _number_setting(environ: dict, name: str, default: float) -> float:
    """A positive number from the environment; a bad one stops the server with a line saying so."""
    text = environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = 0
    if value <= 0:
        print(f"mailer.py: {name} must be a positive number, not {text!r}", file=sys.stderr)
        raise SystemExit(78)
    return value


def app_from_environment(environ: Optional[dict] = None, root: Path = HERE) -> Mailer:
    """Build the app from the environment and key files, setting up local delivery.

    Outside App Engine and SMTP mode this registers the Maildir outbox (never
    replacing a registered stub).  In SMTP mode it bounds how long a hung SMTP
    server can hold a request, since the SDK opens its connection with no timeout.
    """
    environ = os.environ if environ is None else environ
    if smtp_mode(environ):
        if socket.getdefaulttimeout() is None:
            socket.setdefaulttimeout(_number_setting(environ, "GMAIL_SMTP_TIMEOUT", DEFAULT_SMTP_TIMEOUT))
    elif not on_app_engine(environ):
        install_outbox(Path(environ.get("GMAIL_OUTBOX", root / "outbox")))
    options = {
        "require_signature_v2": environ.get("GMAIL_REQUIRE_SIGNATURE_V2", "").strip().lower() in TRUE_WORDS,
        # On App Engine many instances serve one proxy: only memcache is shared by all.
        "replay_store": MemcacheReplayStore() if on_app_engine(environ) else InProcessReplayStore(),
    }
    options["max_recipients"] = int(_number_setting(environ, "GMAIL_MAX_RECIPIENTS", DEFAULT_MAX_RECIPIENTS))
    return make_app(keys_from_environment(environ, root), default_sender_from_environment(environ, root), **options)


def _module_app():
    """The app gunicorn and `python mailer.py` serve, wrapped for the bundled services on App Engine."""
    application = app_from_environment()
    if on_app_engine():
        from google.appengine.api import wrap_wsgi_app

        return wrap_wsgi_app(application)
    return application


app = _module_app()


# ---------------------------------------------------------------------------
# Local server
# ---------------------------------------------------------------------------


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


DEFAULT_KEY_FILE = HERE / "keys" / "GMAIL_SECRET_KEY"


def new_key() -> bytes:
    """A strong random key: 256 bits, URL-safe so it pastes anywhere."""
    return secrets.token_urlsafe(32).encode("ascii")


def write_key_file(path: Path, keys: list[bytes]) -> None:
    """Replace the key file atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(b"".join(key + b"\n" for key in keys))
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def keys_command(action: str, path: Path, fingerprint: Optional[str] = None) -> int:
    """`keys new|list|retire`: manage the key file so keys rotate without refusing a message."""
    keys = parse_keys(path.read_text(encoding="utf-8")) if path.is_file() else []
    if action == "new":
        key = new_key()
        write_key_file(path, keys + [key])
        print(f"added key {key_fingerprint(key)} to {path} ({len(keys) + 1} valid); give it to clients:\n"
              f"{key.decode()}")
    elif action == "list":
        if not keys:
            print(f"no keys in {path}", file=sys.stderr)
            return 66
        for number, key in enumerate(keys, 1):
            print(f"{key_fingerprint(key)}  {len(key):3d} characters{'  (newest)' if number == len(keys) else ''}")
    elif action == "retire":
        matches = [k for k in keys if key_fingerprint(k).startswith((fingerprint or "").lower())]
        if not fingerprint or len(fingerprint) < 6 or len(matches) != 1:
            print(f"mailer.py: {fingerprint!r} names {len(matches) if fingerprint else 0} keys; give at least 6 "
                  f"characters of one fingerprint from `keys list`", file=sys.stderr)
            return 65
        if len(keys) == 1:
            print("mailer.py: refusing to retire the only key: add a new one first (`keys new`)", file=sys.stderr)
            return 65
        write_key_file(path, [k for k in keys if k is not matches[0]])
        print(f"retired key {key_fingerprint(matches[0])}; {len(keys) - 1} valid key(s) left in {path}")
    return 0


def _print_try_it(host: str, port: int) -> None:
    url = f"http://{host}:{port}/"
    key_file = DEFAULT_KEY_FILE
    print(f"Send a test message (it lands in {HERE / 'outbox'} with the default delivery):\n"
          f"  echo 'Hello from appengine-mailer' | {sys.executable} {HERE / 'gmail.py'} "
          f"--url {url} --key-file {key_file} -s 'Test message' -r sender@example.com you@example.com",
          flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve the appengine-mailer proxy with a threaded stdlib WSGI server.",
        epilog="Keys come from env GMAIL_SECRET_KEY (one per line) or keys/GMAIL_SECRET_KEY; "
               "GMAIL_DEFAULT_SENDER is optional. Set APPENGINE_USE_SMTP_MAIL_SERVICE=true and "
               "APPENGINE_SMTP_HOST/PORT/USER/PASSWORD/USE_TLS to deliver through SMTP; otherwise "
               "messages land in the Maildir outbox/ (GMAIL_OUTBOX).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--create-dev-key", action="store_true",
                        help="if no key is configured, create a random one in keys/GMAIL_SECRET_KEY")
    commands = parser.add_subparsers(dest="command", metavar="{keys}")
    keys = commands.add_parser("keys", help="manage the secret keys (new, list, retire)",
                               description="Rotate keys without downtime: `keys new`, deploy, switch the "
                                           "clients, `keys retire OLD`, deploy.")
    keys.add_argument("action", choices=["new", "list", "retire"])
    keys.add_argument("fingerprint", nargs="?", help="with retire: the fingerprint shown by `keys list`")
    keys.add_argument("--file", type=Path, default=DEFAULT_KEY_FILE, help=f"key file (default {DEFAULT_KEY_FILE})")
    args = parser.parse_args(argv)
    if args.command == "keys":
        return keys_command(args.action, args.file, args.fingerprint)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    application = app
    if not application.keys and args.create_dev_key:
        write_key_file(DEFAULT_KEY_FILE, [new_key()])
        application = app_from_environment()
    if not application.keys:
        print("mailer.py: no secret key configured: set GMAIL_SECRET_KEY (one key per line) "
              "or write keys/GMAIL_SECRET_KEY", file=sys.stderr)
        return 78
    try:
        server = make_server(args.host, args.port, application,
                             server_class=ThreadingWSGIServer, handler_class=WSGIRequestHandler)
    except OSError as exc:
        print(f"mailer.py: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 71
    print(f"appengine-mailer {__version__} on http://{args.host}:{server.server_port}/ "
          f"({len(application.keys)} key(s), delivery: {delivery_mode()})", flush=True)
    if args.create_dev_key:
        _print_try_it(args.host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
