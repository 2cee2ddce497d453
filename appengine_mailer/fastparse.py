"""Parsing a message as the stdlib does, only faster; each fast path proven equal to the stdlib's.

The stdlib email package parses every header and the whole structure.  What is
skipped is only work whose result is known: walking a multi-megabyte base64
body line by line, decoding it in Python, and getaddresses() on plain address
lists.  tests/test_fastparse.py checks each shortcut against stdlib_parse().
"""

from __future__ import annotations

import binascii
import re
import secrets
from email import policy
from email.message import Message
from email.parser import BytesParser
from typing import Optional

from .errors import BadRequest

MAX_HEADERS = 5000  # in the whole message, all parts together (a part has about 4)
MAX_PARTS = 500
MAX_DEPTH = 32  # multiparts and attached messages inside each other; real mail rarely passes 10

# Bodies made only of base64 lines are cut out before parsing and put back after:
# the stdlib still parses every header and the whole structure, but is spared
# walking a multi-megabyte attachment line by line.
BASE64_LINE_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
MIN_CUT_BYTES = 8 * 1024  # below this, cutting costs more than the parse it saves
MAX_HEADER_BLOCK = 64 * 1024


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
    """Parse the message bytes as the stdlib does (faster for big base64 bodies); refuse non-email.

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
        skeleton, cuts = cut_base64_bodies(raw)
        message = stdlib_parse(skeleton)
        if cuts and not restore_cut_bodies(message, cuts):
            message = stdlib_parse(raw)
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
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend((sub, depth + 1) for sub in payload if isinstance(sub, Message))


# ---------------------------------------------------------------------------
# The skeleton parse: large base64 bodies cut out, then put back exactly
# ---------------------------------------------------------------------------


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
    pieces: list[bytes] = []
    cuts: dict[str, tuple[bytes, bytes]] = {}
    done = pos = 0
    while (body_start := _body_start(raw, pos)) != -1:
        dash = raw.find(b"-", body_start)
        if dash == -1:
            end = pos = len(raw)
        else:
            end = raw.rfind(b"\n", body_start - 1, dash) + 1  # start of the line holding the '-'
            pos = end if end > body_start else dash + 1
        if end - body_start < MIN_CUT_BYTES or (dash != -1 and raw[end : end + 1] != b"-"):
            continue
        ending = raw[end - 2 : end] if raw.endswith(b"\r\n", 0, end) else raw[end - 1 : end]
        if ending not in (b"\r\n", b"\r", b"\n"):
            ending = b""
        body = raw[body_start : end - len(ending)]
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
        payload = part._payload  # type: ignore[attr-defined]
        if not isinstance(payload, str) or payload.rstrip("\r\n") not in cuts:
            continue
        token = payload.rstrip("\r\n")
        body, ending = cuts[token]
        rest = payload[len(token) :]
        if rest not in ("", ending.decode("ascii")):
            return False
        part.set_payload(body.decode("ascii") + rest)
        part.cut_base64 = True  # type: ignore[attr-defined]
        restored += 1
    return restored == len(cuts)


def decode_payload(part: Message) -> bytes:
    """Return part.get_payload(decode=True), decoding a cut base64 body in one C call.

    Taken only where the stdlib gives the same bytes: the part says base64, its
    body is base64 lines with at most two '=' and only at the end, and binascii
    decodes it without error (it refuses what the stdlib would have to repair).
    """
    if getattr(part, "cut_base64", False) and str(part.get("content-transfer-encoding", "")).lower() == "base64":
        body = part._payload  # type: ignore[attr-defined]
        first_pad = body.find("=")
        if first_pad == -1 or (not body[first_pad:].strip("=\r\n") and body.count("=", first_pad) <= 2):
            try:
                return binascii.a2b_base64(body)
            except binascii.Error:
                pass
    payload = part.get_payload(decode=True)  # bytes, or None for an empty or multipart payload
    return payload if isinstance(payload, bytes) else b""


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
