"""Parsing a message as the stdlib does, only faster and in less memory; each shortcut proven equal.

The stdlib email package parses every header and the whole structure.  What is
skipped is only work whose result is known: walking a multi-megabyte body line
by line, holding it as text (a str of 8-bit mail takes two bytes per byte),
decoding it in Python, and getaddresses() on plain address lists.
tests/test_fastparse.py checks each shortcut against stdlib_parse().
"""

from __future__ import annotations

import binascii
import re
import secrets
from email import policy
from email.feedparser import FeedParser
from email.message import Message
from email.parser import BytesParser
from typing import Iterator, Optional, cast

from .errors import BadRequest

MAX_HEADERS = 5000  # in the whole message, all parts together (a part has about 4)
MAX_PARTS = 500
MAX_DEPTH = 32  # multiparts and attached messages inside each other; real mail rarely passes 10

# Bodies are cut out before parsing and put back after: the stdlib still parses
# every header and the whole structure, but never sees a large body.
MIN_CUT_BYTES = 8 * 1024  # below this, cutting costs more than the parse it saves
MAX_HEADER_BLOCK = 64 * 1024
PARSER_CHUNK = 8192  # what email.parser.Parser reads and feeds at a time
_BASE64_LINE_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
_CHECK_SLICE = 64 * 1024
_NOT_PADDING = re.compile(rb"[^=\r\n]")
_UUENCODE = ("x-uuencode", "uuencode", "uue", "x-uue")


class RawHeaderPolicy(policy.Compat32):
    """compat32, but headers come back exactly as received.

    compat32 replaces raw 8-bit header bytes with U+FFFD when fetched; kept raw,
    convert.header_text() can read them as UTF-8 (RFC 6532) or latin-1.
    """

    def header_fetch_parse(self, name, value):
        return value


RAW_HEADERS = RawHeaderPolicy()


def stdlib_parse(raw: bytes) -> Message:
    """The reference parse: what every fast path must reproduce exactly."""
    return BytesParser(policy=RAW_HEADERS).parsebytes(raw)


def parse_message(raw: bytes) -> Message:
    """Parse the message bytes as the stdlib does (faster for big bodies); refuse non-email.

    RFC 5322 forbids NUL anywhere in a message, and an SMTP server may cut the
    message at one, so a NUL is refused wherever it is.  Parts, header lines and
    nesting are bounded, so no later step can run out of time or stack.
    """
    nul = raw.find(b"\x00")
    if nul != -1:
        if nul < 4096:
            raise BadRequest("msg is binary data, not an RFC 2822 message")
        raise BadRequest(f"msg holds a NUL byte at offset {nul}; send binary data as a base64 attachment")
    try:
        skeleton, cuts = cut_bodies(raw)
        message = feed_parse(skeleton, keeps_bodies=bool(cuts))
        if cuts and not restore_cut_bodies(message, raw, cuts):
            message = feed_parse(raw)
    except RecursionError:
        raise BadRequest(f"message nests MIME parts more than {MAX_DEPTH} deep") from None
    except Exception as exc:  # the parser has no error type of its own
        raise BadRequest(f"msg is not a parseable email message ({type(exc).__name__})") from None
    if not message.keys():
        raise BadRequest("msg has no headers: it is not an RFC 2822 message")
    _check_size(message)
    return message


def _check_size(message: Message) -> None:
    """Refuse a message over the part, header or depth bounds, walking it without recursion."""
    parts = headers = 0
    stack = [(message, 1)]
    while stack:
        part, depth = stack.pop()
        parts += 1
        headers += len(part)
        if parts > MAX_PARTS or headers > MAX_HEADERS:
            raise BadRequest(f"message has more than {MAX_PARTS} MIME parts or {MAX_HEADERS} header lines")
        if depth > MAX_DEPTH:
            raise BadRequest(f"message nests MIME parts more than {MAX_DEPTH} deep")
        if part.is_multipart():  # never get_payload() of a leaf: that would read a cut body now
            stack.extend((sub, depth + 1) for sub in part.get_payload() if isinstance(sub, Message))


def feed_parse(raw: bytes, keeps_bodies: bool = False) -> Message:
    """stdlib_parse() making the same calls, without its copies of the whole message.

    BytesParser decodes all of `raw` to one str (ASCII, undecodable bytes as
    surrogates: one character per byte) and reads it through a StringIO, which
    holds four bytes per character, 8192 characters at a time.  Decoding each
    8192-byte slice gives exactly those 8192 characters, so the FeedParser gets
    the very same feed() calls.  With keeps_bodies the parts are Parts, ready
    to keep cut bodies (plain Messages are a little faster to walk).
    """
    parser = FeedParser(policy=_RAW_HEADERS_PARTS if keeps_bodies else RAW_HEADERS)
    for at in range(0, len(raw), PARSER_CHUNK):
        parser.feed(raw[at : at + PARSER_CHUNK].decode("ascii", "surrogateescape"))
    return parser.close()


# ---------------------------------------------------------------------------
# The skeleton parse: large bodies cut out, then put back exactly
# ---------------------------------------------------------------------------


class Cut:
    """A body cut out of the raw message: raw[start:end], its last line ending excluded."""

    __slots__ = ("end", "raw", "start")

    def __init__(self, raw: bytes, start: int, end: int):
        self.raw, self.start, self.end = raw, start, end


class Pending:
    """A part's payload while its large bodies are still only in the raw message.

    `skeleton` is the payload the stdlib parsed, in which each cut body is its
    token; the real payload is that text with every token replaced by its body.
    """

    __slots__ = ("cuts", "skeleton")

    def __init__(self, skeleton: str, cuts: list[tuple[int, int, Cut]]):
        self.skeleton = skeleton
        self.cuts = cuts  # (offset of the token in skeleton, length of the token, the body), in order

    def _pieces(self):
        """The payload as alternating skeleton text and cut bodies (memoryviews of the raw bytes)."""
        at = 0
        for offset, length, cut in self.cuts:
            yield self.skeleton[at:offset]
            yield memoryview(cut.raw)[cut.start : cut.end]
            at = offset + length
        yield self.skeleton[at:]

    def text(self) -> str:
        """The payload text the stdlib parse of the whole message holds."""
        return "".join(
            piece if isinstance(piece, str) else str(piece, "ascii", "surrogateescape") for piece in self._pieces()
        )

    def data(self) -> tuple[bytes, int, int]:
        """The payload's bytes as (buffer, start, stop): the stretch of the raw bytes it came from, not a copy.

        The skeleton is the raw bytes with bodies replaced by tokens, so the
        text around the tokens is found in the raw bytes just around the cuts;
        that is checked, and a join of the pieces is the answer if it ever fails.
        """
        raw = self.cuts[0][2].raw
        start = at = -1
        skeleton_at = 0
        for offset, length, cut in self.cuts:
            before = self.skeleton[skeleton_at:offset].encode("ascii", "surrogateescape")
            if start == -1:
                start = at = cut.start - len(before)
            if at < 0 or at + len(before) != cut.start or not raw.startswith(before, at):
                return self._joined()
            at, skeleton_at = cut.end, offset + length
        after = self.skeleton[skeleton_at:].encode("ascii", "surrogateescape")
        if not raw.startswith(after, at):
            return self._joined()
        return raw, start, at + len(after)

    def _joined(self) -> tuple[bytes, int, int]:
        joined = b"".join(
            piece.encode("ascii", "surrogateescape") if isinstance(piece, str) else piece for piece in self._pieces()
        )
        return joined, 0, len(joined)


class Part(Message):
    """The parse's Message: a part may keep its large bodies in the raw bytes until its text is read.

    Such a part has no `_payload` attribute but a `pending` one; the first read
    of `_payload` (get_payload(), the generators, anything) builds the exact
    text and stores it, as the stdlib parse would have.  decode_payload() reads
    the bytes instead while the text is not built.
    """

    pending: Optional[Pending] = None

    def __getattr__(self, name: str):  # only called for what the instance lacks
        pending = self.__dict__.get("pending")
        if name != "_payload" or pending is None:
            raise AttributeError(name)
        self.__dict__["_payload"] = text = pending.text()
        return text

    def keep_pending(self, pending: Pending) -> None:
        """Hold `pending` instead of the skeleton's payload text."""
        self.pending = pending
        del self.__dict__["_payload"]

    def pending_body(self) -> Optional[Pending]:
        """The Pending payload, if its text has not been built (or replaced) since."""
        return None if "_payload" in self.__dict__ else self.pending

    def is_multipart(self) -> bool:
        return isinstance(self.__dict__.get("_payload"), list)  # a pending payload is text


def _body_start(raw: bytes, start: int) -> int:
    """Offset just after the first blank line at or after `start` (a header block's end), or -1."""
    limit = start + MAX_HEADER_BLOCK
    lf = raw.find(b"\n\n", start, limit)
    crlf = raw.find(b"\n\r\n", start, limit if lf == -1 else lf + 2)  # only where it would come first
    found = [at + length for at, length in ((lf, 2), (crlf, 3)) if at != -1]
    return min(found) if found else -1


def _next_dashes_line(raw: bytes, start: int) -> int:
    """Offset of the first line at or after `start` that begins with "--" (where a boundary can be), or len(raw).

    Each '-' is found by memchr and looked at; base64 has none, and prose few.
    """
    at = start
    while (dash := raw.find(b"-", at)) != -1:
        if raw.startswith(b"-", dash + 1) and (dash == start or raw[dash - 1] in b"\r\n"):
            return dash
        at = dash + 1
    return len(raw)


def cut_bodies(raw: bytes) -> tuple[bytes, dict[str, Cut]]:
    """Replace each large body (whole lines up to the next line starting "--") with a token line.

    A MIME boundary line starts with "--", so none can be inside what is cut:
    the stdlib walks the token line exactly as it would have walked the body's
    lines.  Returns the skeleton and the cuts by token.
    """
    if len(raw) < MIN_CUT_BYTES:
        return raw, {}
    prefix = b"AppengineMailerCut" + secrets.token_hex(8).encode("ascii") + b"x"
    pieces: list[bytes] = []
    cuts: dict[str, Cut] = {}
    done = pos = 0
    while pos < len(raw):
        body_start = _body_start(raw, pos)
        if body_start == -1:  # no header block ends near: look again where the next part could start
            pos = _next_dashes_line(raw, pos + MAX_HEADER_BLOCK)
            continue
        end = _next_dashes_line(raw, body_start)
        pos = max(end, body_start + 1)
        ending = raw[end - 2 : end] if raw.endswith(b"\r\n", 0, end) else raw[end - 1 : end]
        if ending not in (b"\r\n", b"\r", b"\n"):
            ending = b""
        if end - len(ending) - body_start < MIN_CUT_BYTES:
            continue
        token = prefix + str(len(cuts)).encode("ascii")
        cuts[token.decode("ascii")] = Cut(raw, body_start, end - len(ending))
        pieces += [raw[done:body_start], token + ending]
        done = end
    if not cuts or prefix in raw:
        return raw, {}
    pieces.append(raw[done:])
    return b"".join(pieces), cuts


_TOKEN_DIGITS = re.compile(r"\d+")


def _walk_with_container(message: Message) -> Iterator[tuple[Message, bool]]:
    """Every part, and whether it lies directly in an attached message; without recursion."""
    stack = [(message, False)]
    while stack:
        part, in_message = stack.pop()
        yield part, in_message
        if part.is_multipart():  # never get_payload() of a leaf: that would read a cut body now
            inside = part.get_content_maintype() == "message"
            parts = cast("list[Message]", part.get_payload())
            stack.extend((sub, inside) for sub in reversed(parts) if isinstance(sub, Message))


def restore_cut_bodies(message: Message, raw: bytes, cuts: dict[str, Cut]) -> bool:
    """Give each part holding tokens its Pending payload; False unless every cut lies in a part's payload.

    Also False when a cut lies in an attached message (message/rfc822, or a
    digest's part): the stdlib parses what is cut there into parts, which a
    token cannot stand for.  The caller then parses the original.
    """
    if not cuts:
        return True
    prefix = next(iter(cuts))[:-1]  # the tokens differ only in their number
    restored = 0
    for part, in_message in _walk_with_container(message):
        payload = part._payload  # type: ignore[attr-defined]
        if not isinstance(payload, str) or prefix not in payload:
            continue
        if in_message or part.get_content_maintype() == "message":
            return False
        found = []
        at = payload.find(prefix)
        while at != -1:
            digits = _TOKEN_DIGITS.match(payload, at + len(prefix))
            token = payload[at : digits.end()] if digits else ""
            if token not in cuts:
                return False
            found.append((at, len(token), cuts[token]))
            at = payload.find(prefix, at + len(token))
        cast(Part, part).keep_pending(Pending(payload, found))
        restored += len(found)
    return restored == len(cuts)


def decode_payload(part: Message) -> bytes:
    """Return part.get_payload(decode=True) (b"" for None), from the raw bytes when the body was cut.

    The stdlib decodes the payload's bytes by Content-Transfer-Encoding:
    quoted-printable with binascii.a2b_qp, base64 with its own lenient
    decoder, uuencode in Python; anything else is the bytes as they are.  For
    a cut body the first and last are done on the raw bytes directly, and
    base64 by one a2b_base64 call where it provably gives the same bytes
    (only base64 lines, at most two '=' and only at the end: binascii refuses
    what the stdlib would have to repair).  Everything else builds the text
    and asks the stdlib.
    """
    pending = part.pending_body() if isinstance(part, Part) else None
    if pending is not None:
        cte = str(part.get("content-transfer-encoding", "")).lower()
        data, start, stop = pending.data()
        if cte == "quoted-printable":
            return binascii.a2b_qp(memoryview(data)[start:stop])
        if cte == "base64":
            decoded = _plain_base64(data, start, stop)
            if decoded is not None:
                return decoded
        elif cte not in _UUENCODE:
            return data[start:stop]
    payload = part.get_payload(decode=True)  # bytes, or None for an empty or multipart payload
    return payload if isinstance(payload, bytes) else b""


def _plain_base64(data: bytes, start: int, stop: int) -> Optional[bytes]:
    """a2b_base64 of data[start:stop] when that is what the stdlib's decoder gives, else None."""
    for at in range(start, stop, _CHECK_SLICE):  # only base64 lines: checked a slice at a time, in C
        if data[at : min(stop, at + _CHECK_SLICE)].translate(None, _BASE64_LINE_BYTES):
            return None
    first_pad = data.find(b"=", start, stop)
    if first_pad != -1 and (_NOT_PADDING.search(data, first_pad, stop) or data.count(b"=", first_pad, stop) > 2):
        return None
    try:
        return binascii.a2b_base64(memoryview(data)[start:stop])
    except binascii.Error:
        return None


_RAW_HEADERS_PARTS = RAW_HEADERS.clone(message_factory=Part)


# ---------------------------------------------------------------------------
# Plain address lists without getaddresses()
# ---------------------------------------------------------------------------

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM_ADDRESS = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:(?P<name>(?:{_ATEXT}|[ \t])*?)[ \t]*<(?P<bracketed>{_DOT_ATOM_ADDRESS})>"
    rf"|(?P<bare>{_DOT_ATOM_ADDRESS}))[ \t]*"
)


def simple_addresses(value: str) -> Optional[list[tuple[str, str]]]:
    """getaddresses() for the common plain shapes ("Name <a@b.c>", "a@b.c", comma-separated); else None.

    No quotes, comments, groups, domain literals, folding or empty list items
    (3.13 treats some as errors): those go to the stdlib, which this must agree
    with exactly.
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
