"""Differential tests: each fast path of the parse gives exactly what the stdlib path gives."""

from __future__ import annotations

import base64
import os
import re
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.image import MIMEImage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import getaddresses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appengine_mailer.convert import Outgoing, _decode_text, text_body
from appengine_mailer.errors import BadRequest
from appengine_mailer.fastparse import decode_payload, parse_message, simple_addresses, stdlib_parse

# --------------------------------------------------------------------------- MIME parsing


def structure(message):
    """What the parser decided, payloads aside: headers, types, preambles, epilogues, defects."""
    return [
        (part._headers, part.get_content_type(), part.preamble, part.epilogue, [type(d).__name__ for d in part.defects])
        for part in message.walk()
    ]


def payloads(message):
    """Each leaf's payload text and decoded bytes (reading them builds a cut part's text)."""
    return [(part._payload, part.get_payload(decode=True)) for part in message.walk() if not part.is_multipart()]


def assert_same_parse(raw: bytes):
    slow = stdlib_parse(raw)
    fast = parse_message(raw)
    assert structure(fast) == structure(slow)
    # Read through the shortcuts first: reading a part's text builds it, after which they are not taken.
    slow_leaves = [part for part in slow.walk() if not part.is_multipart()]
    fast_leaves = [part for part in fast.walk() if not part.is_multipart()]
    assert [decode_payload(part) for part in fast_leaves] == [p.get_payload(decode=True) or b"" for p in slow_leaves]
    assert [outcome(text_body, part) for part in fast_leaves] == [
        outcome(reference_text_body, part) for part in slow_leaves
    ]
    assert payloads(fast) == payloads(slow)
    try:
        expected = Outgoing(slow, 1000)
    except BadRequest as refusal:
        with pytest.raises(BadRequest, match=re.escape(refusal.reason)):
            Outgoing(parse_message(raw), 1000)
        return
    got = Outgoing(parse_message(raw), 1000)
    assert (got.bodies, got.attachments, got.recipients, got.subject) == (
        expected.bodies,
        expected.attachments,
        expected.recipients,
        expected.subject,
    )


def reference_text_body(part):
    """What text_body() must give: the part decoded to text the stdlib way, as UTF-8 (str if it cannot be)."""
    text = _decode_text(part, part.get_payload(decode=True) or b"")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text


def outcome(function, part):
    """function(part), or the reason of the 400 it raised."""
    try:
        return function(part)
    except BadRequest as refusal:
        return ("refused", refusal.reason)


def cut_was_taken(raw: bytes) -> bool:
    return any(part.pending_body() is not None for part in parse_message(raw).walk())


def b64_lines(data: bytes, width: int = 76, newline: bytes = b"\n") -> bytes:
    encoded = base64.b64encode(data)
    return newline.join(encoded[i : i + width] for i in range(0, len(encoded), width)) + newline


TEXT_LINES = [
    b"Hello, the quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln, ½ € ✓".encode(),
    "Grüße aus Köln".encode("latin-1"),
    "日本語のテキスト".encode(),
    b"-- ",  # a signature separator: a line starting "--" that is no boundary
    b"--not-a-boundary",
    b"-",
    b"",
    b".",
    b"soft break=",
    b"=3D=C3=BC=E2=82=AC escapes and a bad one =ZZ",
    b"QUFBQUFB",
    b"AppengineMailerCut",
    b"x" * 300,
]


NO_DASH_LINES = [line for line in TEXT_LINES if not line.startswith(b"-")]


@st.composite
def text_bodies(draw, nl: bytes) -> bytes:
    """A text body of 0-40 KB: 8-bit UTF-8 and latin-1, quoted-printable, lines that start with '-', lone CRs."""
    segments = []
    for _ in range(draw(st.integers(1, 3))):
        pool = TEXT_LINES if draw(st.booleans()) else NO_DASH_LINES
        lines = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=8))
        endings = draw(st.lists(st.sampled_from([nl, nl, nl, b"\r"]), min_size=len(lines), max_size=len(lines)))
        block = b"".join(line + ending for line, ending in zip(lines, endings))
        segments.append(block * draw(st.sampled_from([1, 2, 60, 400])))
    separators = [draw(st.sampled_from([b"-- " + nl + nl, b"--not-a-boundary" + nl, nl, b""])) for _ in segments]
    body = segments[0] + b"".join(separator + segment for separator, segment in zip(separators, segments[1:]))
    return body if draw(st.booleans()) else body.rstrip(b"\r\n")


@st.composite
def text_leaves(draw, nl: bytes) -> bytes:
    subtype = draw(st.sampled_from([b"plain", b"html"]))
    charset = draw(
        st.sampled_from(
            [
                b"",
                b"; charset=utf-8",
                b"; charset=iso-8859-1",
                b"; charset=us-ascii",
                b"; charset=utf-7",
                b"; charset=x-unknown",
                b"; charset=iso-8859-15",
            ]
        )
    )
    cte = draw(
        st.sampled_from(
            [None, b"8bit", b"7bit", b"binary", b"quoted-printable", b"QUOTED-PRINTABLE", b"base64", b"x-uuencode"]
        )
    )
    head = b"Content-Type: text/" + subtype + charset + nl
    if cte is not None:
        head += b"Content-Transfer-Encoding: " + cte + nl
    return head + nl + draw(text_bodies(nl))


@st.composite
def leaves(draw, nl: bytes):
    kind = draw(st.sampled_from(["text", "b64", "b64text", "qp", "big text"]))
    if kind == "big text":
        return draw(text_leaves(nl))
    if kind == "text":
        return (
            b"Content-Type: text/plain; charset=utf-8"
            + nl
            + nl
            + draw(st.sampled_from([b"hello" + nl, b"--not a boundary" + nl + b"x" + nl, b"", b"AAAA" * 3000 + nl]))
        )
    size = draw(st.sampled_from([0, 10, 700, 7000, 12_000, 30_000]))
    data = os.urandom(size)
    body = b64_lines(data, draw(st.sampled_from([76, 64, 4, 1000])), nl)
    mutation = draw(st.sampled_from(["none", "none", "bang", "midpad", "trim", "blank", "nonl", "dash"]))
    if mutation == "bang" and body:
        body = body[: len(body) // 2] + b"!" + body[len(body) // 2 :]
    elif mutation == "midpad" and body:
        body = body[: len(body) // 2] + b"=" + body[len(body) // 2 :]
    elif mutation == "trim" and len(body) > 3:
        body = body[: -len(nl) - 1] + nl
    elif mutation == "blank" and body:
        body = body[: len(body) // 2] + nl + nl + body[len(body) // 2 :]
    elif mutation == "nonl":
        body = body.rstrip(b"\r\n")
    elif mutation == "dash" and body:
        body = body[: len(body) // 2] + nl + b"--x" + nl + body[len(body) // 2 :]
    cte = draw(st.sampled_from([b"base64", b"BASE64", b"base64 ", b"7bit"]))
    ctype = b"text/plain" if kind == "b64text" else b'application/pdf; name="f.pdf"'
    extra = b'Content-Disposition: attachment; filename="f.pdf"' + nl if kind == "b64" else b""
    return b"Content-Type: " + ctype + nl + b"Content-Transfer-Encoding: " + cte + nl + extra + nl + body


@st.composite
def mime_trees(draw, nl: bytes, depth: int = 0):
    if depth >= 2 or draw(st.booleans()):
        return draw(leaves(nl))
    boundary = draw(st.sampled_from([b"b" + str(depth).encode(), b"==XyZ" + str(depth).encode() + b"==", b"b"]))
    children = draw(st.lists(mime_trees(nl, depth + 1), min_size=0, max_size=3))
    preamble = draw(st.sampled_from([b"", b"This is a MIME message." + nl, b"QUFB" * 3000 + nl]))
    close = draw(
        st.sampled_from(
            [
                b"--" + boundary + b"--" + nl,
                b"--" + boundary + b"--",
                b"",
                b"--" + boundary + b"--  " + nl + b"epilogue" + nl,
            ]
        )
    )
    out = b'Content-Type: multipart/mixed; boundary="' + boundary + b'"' + nl + nl + preamble
    for child in children:
        out += b"--" + boundary + nl + child + nl
    return out + close


@st.composite
def messages(draw):
    nl = draw(st.sampled_from([b"\n", b"\r\n"]))
    head = b"From: a@example.com" + nl + b"To: b@example.com" + nl + b"Subject: s" + nl + b"MIME-Version: 1.0" + nl
    return head + draw(mime_trees(nl))


@st.composite
def text_messages(draw):
    """A message that is one text part (the usual plain mail), or text parts in an alternative."""
    nl = draw(st.sampled_from([b"\n", b"\r\n"]))
    head = b"From: a@example.com" + nl + b"To: b@example.com" + nl + b"Subject: s" + nl + b"MIME-Version: 1.0" + nl
    if draw(st.booleans()):
        return head + draw(text_leaves(nl))
    boundary = draw(st.sampled_from([b"alt", b"--dashes--", b"=_x"]))
    out = head + b'Content-Type: multipart/alternative; boundary="' + boundary + b'"' + nl + nl
    for _ in range(draw(st.integers(1, 3))):
        out += b"--" + boundary + nl + draw(text_leaves(nl)) + nl
    return out + b"--" + boundary + b"--" + nl


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages())
def test_fast_parse_matches_stdlib_on_generated_mime(raw):
    assert_same_parse(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text_messages())
def test_fast_parse_matches_stdlib_on_generated_text_mail(raw):
    assert_same_parse(raw)


def corpus() -> dict[str, bytes]:
    """Real-world shapes, as the common mail clients and libraries write them."""
    pdf, png = os.urandom(50_000), b"\x89PNG\r\n\x1a\n" + os.urandom(8_000)
    shapes = {}

    gmail = EmailMessage()
    gmail["From"], gmail["To"], gmail["Subject"] = "A <a@example.com>", "b@example.com", "report"
    gmail.set_content("text\n")
    gmail.add_alternative("<p>html</p>", subtype="html")
    gmail.add_attachment(pdf, "application", "pdf", filename="r.pdf")
    shapes["gmail-mixed-alternative"] = gmail.as_bytes()
    shapes["gmail-crlf"] = gmail.as_bytes(policy=gmail.policy.clone(linesep="\r\n"))

    outlook = MIMEMultipart("related")
    outlook["From"], outlook["To"], outlook["Subject"] = "a@example.com", "b@example.com", "inline"
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText("plain", "plain", "utf-8"))
    alternative.attach(MIMEText("<img src=cid:x>", "html", "utf-8"))
    outlook.attach(alternative)
    image = MIMEImage(png, "png")
    image.add_header("Content-ID", "<x>")
    outlook.attach(image)
    shapes["outlook-related"] = outlook.as_bytes()

    single = MIMEApplication(pdf, "pdf")
    single["From"], single["To"] = "a@example.com", "b@example.com"
    shapes["single-part-base64"] = single.as_bytes()

    forwarded = EmailMessage()
    forwarded["From"], forwarded["To"], forwarded["Subject"] = "a@example.com", "b@example.com", "Fwd"
    forwarded.set_content("see below\n")
    forwarded.add_attachment(gmail)
    shapes["forwarded-rfc822-with-base64-inside"] = forwarded.as_bytes()

    utf8 = EmailMessage()
    utf8["From"], utf8["To"], utf8["Subject"] = "Jürgen <j@example.com>", "b@example.com", "Grüße"
    utf8.set_content("Grüße " * 3000 + "\n", cte="base64")
    shapes["utf8-text-in-base64"] = utf8.as_bytes()
    return shapes


@pytest.mark.parametrize("name, raw", list(corpus().items()))
def test_fast_parse_matches_stdlib_on_real_world_shapes(name, raw):
    assert cut_was_taken(raw)  # the fast path ran
    assert_same_parse(raw)
    assert_same_parse(raw.replace(b"\n--", b"\n--", 1).rstrip(b"\r\n"))  # no final newline


# --------------------------------------------------------------------------- addresses


ADDRESS_PIECES = st.sampled_from(
    [
        "a@b.com",
        "x.y@mail.example.org",
        "First",
        "Last",
        "J.",
        "<",
        ">",
        "<a@b.com>",
        ",",
        " ",
        "  ",
        "\t",
        '"Q"',
        "(c)",
        "@",
        ".",
        "=?utf-8?q?J=C3=BCrgen?=",
        "first+tag@x.io",
        "o'neil@x.ie",
        "-",
        "_",
        "a@",
        "@b",
        "x@[1.2.3.4]",
        "g:",
        ";",
        "\\",
        "É",
        "a@b..c",
        "a..b@c.d",
    ]
)


def stdlib_addresses(value: str) -> list:
    return getaddresses([value])


@settings(max_examples=3000)
@given(st.lists(ADDRESS_PIECES, max_size=8).map("".join))
def test_simple_addresses_agree_with_getaddresses(value):
    fast = simple_addresses(value)
    if fast is not None:
        assert fast == stdlib_addresses(value)


@pytest.mark.parametrize(
    "value",
    ["a@b.com", "First <a@b.com>", "First  Last <a@b.com>, c@d.org", "<a@b.com>", "=?utf-8?q?J=C3=BCrgen?= <j@x.com>"],
)
def test_simple_addresses_take_the_common_shapes(value):
    assert simple_addresses(value) == stdlib_addresses(value)
