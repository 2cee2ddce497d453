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

from appengine_mailer.convert import Outgoing
from appengine_mailer.errors import BadRequest
from appengine_mailer.fastparse import decode_payload, parse_message, simple_addresses, stdlib_parse

# --------------------------------------------------------------------------- MIME parsing


def snapshot(message):
    """Everything the parser decided: headers, structure, payloads, defects, decoded bytes."""
    parts = []
    for part in message.walk():
        leaf = not part.is_multipart()
        parts.append(
            (
                part._headers,
                part.get_content_type(),
                part.preamble,
                part.epilogue,
                [type(d).__name__ for d in part.defects],
                part._payload if leaf else None,
                decode_payload(part) if leaf else None,
                part.get_payload(decode=True) if leaf else None,
            )
        )
    return parts


def assert_same_parse(raw: bytes):
    fast = parse_message(raw)
    slow = stdlib_parse(raw)
    assert snapshot(fast) == snapshot(slow)
    for part in fast.walk():
        if not part.is_multipart():
            assert decode_payload(part) == (part.get_payload(decode=True) or b"")
    try:
        expected = Outgoing(slow, 1000)
    except BadRequest as refusal:
        with pytest.raises(BadRequest, match=re.escape(refusal.reason)):
            Outgoing(fast, 1000)
        return
    got = Outgoing(fast, 1000)
    assert (got.bodies, got.attachments, got.recipients, got.subject) == (
        expected.bodies,
        expected.attachments,
        expected.recipients,
        expected.subject,
    )


def b64_lines(data: bytes, width: int = 76, newline: bytes = b"\n") -> bytes:
    encoded = base64.b64encode(data)
    return newline.join(encoded[i : i + width] for i in range(0, len(encoded), width)) + newline


@st.composite
def leaves(draw, nl: bytes):
    kind = draw(st.sampled_from(["text", "b64", "b64text", "qp"]))
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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages())
def test_fast_parse_matches_stdlib_on_generated_mime(raw):
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
    assert any(getattr(part, "cut_base64", False) for part in parse_message(raw).walk())  # the fast path ran
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
