"""The request body: read within a bound, then parsed by hand into raw bytes.

The stdlib's form parsers decode values to str; the signature covers the
client's exact bytes (8-bit and non-UTF-8 included), so values stay bytes here.
"""

from __future__ import annotations

import binascii
import io
import re
from typing import Mapping, Optional
from urllib.parse import unquote_to_bytes

import gmail

from .errors import BadRequest, LengthRequired, PayloadTooLarge
from .settings import FALSE_WORDS, TRUE_WORDS

MAX_BODY_BYTES = gmail.MAX_REQUEST_BYTES  # App Engine's own request size cap, which clients check too
MAX_FORM_FIELDS = 16
FORM_SLICE = 16 * 1024  # decoded a slice at a time: a few of these are the only copies besides the value

_PRINTABLE_ASCII = bytes(range(0x21, 0x7F))  # what any urlencoder emits
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# One pass for both: '+' is a space, and '%XX' becomes the quoted-printable '=XX'.
_FORM_TO_QP = bytes.maketrans(b"+%", b" =")


def body_size(environ: Mapping, limit: int) -> int:
    """The request body's size from Content-Length, refused (411, 400, 413) before anything is read."""
    length = environ.get("CONTENT_LENGTH", "")
    if not length:
        raise LengthRequired("a POST needs a Content-Length header")
    if not (length.isascii() and length.isdigit()):
        raise BadRequest(f"Content-Length {length!r} is not a number")
    size = int(length)
    if size > limit:
        raise PayloadTooLarge(f"request body of {size} bytes is over the {limit}-byte limit")
    return size


def read_body(environ: Mapping, limit: int) -> bytes:
    """Read the request body, refusing it from Content-Length before reading anything.

    Servers that buffer the body (waitress: in memory, or a temporary file
    past 512 KB) usually hand it over in one read.
    """
    size = body_size(environ, limit)
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


def _unquote_exactly(raw: bytes, name: str) -> bytes:
    """The reference decoding: refuse a malformed escape, else the stdlib's unquote_to_bytes."""
    if raw.translate(None, _PRINTABLE_ASCII):
        raise BadRequest(f"field {name!r} holds characters that urlencoding never produces")
    if _BAD_ESCAPE.search(raw):
        raise BadRequest(f"field {name!r} has a malformed percent-escape")
    return unquote_to_bytes(raw.replace(b"+", b" "))


def parse_form(body: bytes, *, slice_bytes: int = FORM_SLICE) -> dict[str, bytes]:
    """Parse an application/x-www-form-urlencoded body into raw bytes, by hand.

    Fast path: with '+' written as a space and '%' as '=', percent-escapes are
    quoted-printable escapes, which binascii decodes in C.  Each valid escape
    shrinks three bytes to one and a malformed one shrinks less, so the length
    alone proves every escape was valid.  A value is decoded a slice at a time
    (never splitting an escape) into one buffer, so no copy of the whole body
    is made besides the value itself.  A value with a literal '=' (no urlencoder
    writes one, but a lenient client might) or a bad length goes through
    _unquote_exactly.  Both give the same bytes (tests/test_form.py).
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
        if body.find(b"=", value_start, end) == -1:
            value = _decode_in_slices(body, value_start, end, slice_bytes)
        form[name] = value if value is not None else _unquote_exactly(body[value_start:end], name)
    return form


def _decode_in_slices(body: bytes, start: int, end: int, slice_bytes: int) -> Optional[bytes]:
    """The fast path for body[start:end]: its bytes, or None where _unquote_exactly must decide.

    Every slice must shrink by exactly two bytes per '%' it holds, so every
    escape is whole and valid inside its slice, and the slices' decodings
    joined are the decoding of the whole.
    """
    out = None
    at = start
    while at < end:
        stop = min(end, at + max(slice_bytes, 3))
        if stop < end:  # an escape starting in the last two bytes goes to the next slice
            split = body.find(b"%", stop - 2, stop)
            stop = split if split > at else stop
        piece = body[at:stop]
        if piece.translate(None, _PRINTABLE_ASCII):
            return None
        decoded = binascii.a2b_qp(piece.translate(_FORM_TO_QP))
        if len(decoded) != len(piece) - 2 * piece.count(b"%"):
            return None
        if stop == end and out is None:  # the value fits in one slice
            return decoded
        out = out or io.BytesIO()
        out.write(decoded)
        at = stop
    return out.getvalue() if out is not None else b""


def flag(form: Mapping[str, bytes], name: str) -> bool:
    """A true/false form field (absent is false); any other word is the client's 400."""
    word = form.get(name, b"").strip().lower().decode("ascii", "replace")
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadRequest(f"field {name!r} must be true or false, not {word!r}")
