"""Property tests: no input, however hostile, makes the server answer 5xx or crash."""

from __future__ import annotations

import webtest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mailer
from conftest import KEY, RecordingMailStub, form

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

HEADER_NAMES = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Content-ID",
        "MIME-Version",
        "References",
        "List-Id",
        "X-Junk",
    ]
)
HEADER_VALUES = st.one_of(
    st.binary(max_size=60),
    st.sampled_from(
        [
            b"a@b.com",
            b"<>",
            b"a@",
            b"@b",
            b"=?utf-8?q?=C3?= <x@y.z>",
            b"multipart/mixed; boundary=x",
            b"multipart/alternative",
            b"text/plain; charset=bogus",
            b"base64",
            b"quoted-printable",
            b'attachment; filename="a.exe"',
            b"attachment; filename*=utf-8''%ff",
            b"g:;",
            b'"unterminated',
            b"text/html",
            b"message/rfc822",
            b"image/png; name=x.png",
        ]
    ),
)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x\r\nContent-Type: application/pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64\r\n--x--\r\n",
            b"--x\r\n\r\n--x--",
            b"=ZZ=\r\n",
            b"\xff\xfe\x00",
        ]
    ),
)


@st.composite
def hostile_messages(draw) -> bytes:
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=10))
    lines = [name.encode() + b": " + value for name, value in headers]
    if draw(st.booleans()):
        lines.insert(0, b"To: r@example.com")
    if draw(st.booleans()):
        lines.insert(0, b"From: s@example.com")
    return b"\r\n".join(lines) + b"\r\n\r\n" + draw(BODIES)


def _app():
    return webtest.TestApp(mailer.make_app([KEY], default_sender="d@example.com"), lint=True)


@FUZZ
@given(body=st.binary(max_size=400))
def test_random_form_bodies_never_5xx(mail_stub, body):
    res = _app().post("/", body, content_type="application/x-www-form-urlencoded", status="*")
    assert res.status_int in (204, 400), res.text


@FUZZ
@given(raw=hostile_messages(), fix_sender=st.sampled_from([{}, {"fix_sender": "true"}]))
def test_signed_hostile_messages_never_5xx(mail_stub: RecordingMailStub, raw, fix_sender):
    assert_never_5xx(mail_stub, raw, **fix_sender)


# --------------------------------------------------------------------------- what found 500s before

CHARSET_NAMES = st.one_of(
    st.binary(min_size=1, max_size=12).filter(lambda b: b"?" not in b and b"\r" not in b and b"\n" not in b),
    st.sampled_from([b"utf-8", b"\xc3\xa9", b"x-unknown", b"utf-8*en", b"", b"us-ascii", b"utf-16", b"idna"]),
)
ENCODINGS = st.sampled_from([b"q", b"Q", b"b", b"B", b"x"])


@st.composite
def encoded_words(draw) -> bytes:
    """An RFC 2047 encoded word with any charset name, well-formed or not."""
    payload = draw(st.binary(max_size=12).filter(lambda b: b"?" not in b and b"\r" not in b and b"\n" not in b))
    return b"=?" + draw(CHARSET_NAMES) + b"?" + draw(ENCODINGS) + b"?" + payload + b"?="


@st.composite
def rfc2231_filename(draw) -> bytes:
    """filename*=charset'lang'value, or split into filename*0*= / filename*1= continuations."""
    charset = draw(CHARSET_NAMES).replace(b"'", b"").replace(b";", b"")
    pieces = draw(
        st.lists(
            st.sampled_from([b"evil", b".exe", b"%00", b"%ff", b".txt", b"%e9", b" ", b".", b"%"]),
            min_size=1,
            max_size=4,
        )
    )
    if len(pieces) == 1 or draw(st.booleans()):
        return b"attachment; filename*=" + charset + b"''" + b"".join(pieces)
    params = [b"filename*0*=" + charset + b"''" + pieces[0]]
    params += [b"filename*%d*=" % n + piece for n, piece in enumerate(pieces[1:], 1)]
    return b"attachment; " + b"; ".join(params)


@st.composite
def decoded_headers_message(draw) -> bytes:
    """Encoded words in every header the proxy decodes: subject, display names, file names."""
    word = encoded_words()
    subject = draw(word)
    name = draw(word)
    filename = draw(st.one_of(word.map(lambda w: b'attachment; filename="' + w + b'"'), rfc2231_filename()))
    type_name = draw(word)
    return (
        b"From: " + name + b" <s@example.com>\r\nTo: " + draw(word) + b" <r@example.com>\r\n"
        b"Cc: " + draw(word) + b" <c@example.com>\r\nReply-To: " + draw(word) + b" <re@example.com>\r\n"
        b"Subject: " + subject + b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b'--B\r\nContent-Type: application/octet-stream; name="' + type_name + b'"\r\n'
        b"Content-Disposition: " + filename + b"\r\n\r\ndata\r\n--B--\r\n"
    )


@st.composite
def deeply_nested(draw) -> bytes:
    """Attached messages and multiparts inside each other, up to 1,000 deep."""
    depth = draw(st.integers(min_value=1, max_value=1000))
    kinds = draw(st.lists(st.sampled_from(["rfc822", "multipart"]), min_size=1, max_size=3))
    inner = b"From: a@example.com\r\nTo: b@example.com\r\n\r\nbottom\r\n"
    for level in range(depth):
        if kinds[level % len(kinds)] == "rfc822":
            inner = b"Content-Type: message/rfc822\r\n\r\n" + inner
        else:
            boundary = b"b%d" % level
            inner = (
                b"Content-Type: multipart/mixed; boundary="
                + boundary
                + b"\r\n\r\n--"
                + boundary
                + b"\r\n"
                + inner
                + b"\r\n--"
                + boundary
                + b"--\r\n"
            )
    return b"From: s@example.com\r\nTo: r@example.com\r\nSubject: nested\r\n" + inner


@st.composite
def with_control_bytes(draw) -> bytes:
    """A plain or MIME message with NUL and other control bytes put anywhere, beyond the first 4 KB too."""
    base = draw(
        st.sampled_from(
            [
                b"From: s@example.com\r\nTo: r@example.com\r\nSubject: s\r\n\r\n" + b"body line\r\n" * 600,
                b"From: s@example.com\r\nTo: r@example.com\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
                + b"x"
                * 5000
                + b"\r\n--B\r\nContent-Type: application/pdf\r\n"
                b'Content-Disposition: attachment; filename="a.pdf"\r\n\r\npdf\r\n--B--\r\n',
            ]
        )
    )
    data = bytearray(base)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        data[at:at] = bytes([draw(st.sampled_from([0, 1, 8, 11, 12, 27, 127, 0x85, 0x9B]))])
    return bytes(data)


def assert_never_5xx(mail_stub, raw: bytes, **extra) -> None:
    before = len(mail_stub.sent)
    res = _app().post("/", form(raw, **extra), content_type="application/x-www-form-urlencoded", status="*")
    assert res.status_int in (204, 400), res.text
    assert len(mail_stub.sent) - before == (1 if res.status_int == 204 else 0)
    if res.status_int == 400:
        assert res.text.strip()
    for sent in mail_stub.sent[before:]:
        for attachment in sent.Attachment:
            assert not any(ord(c) < 32 or c == "\x7f" for c in attachment.FileName)
            assert attachment.FileName.rpartition(".")[2].lower() not in ("exe", "bat", "scr", "com")


@FUZZ
@given(raw=decoded_headers_message())
def test_encoded_words_with_any_charset_never_5xx(mail_stub, raw):
    assert_never_5xx(mail_stub, raw)


@settings(FUZZ, max_examples=60)
@given(raw=deeply_nested())
def test_nesting_up_to_a_thousand_deep_never_5xx(mail_stub, raw):
    assert_never_5xx(mail_stub, raw)


@FUZZ
@given(raw=with_control_bytes())
def test_control_bytes_anywhere_never_5xx_and_nul_never_sent(mail_stub, raw):
    before = len(mail_stub.sent)
    assert_never_5xx(mail_stub, raw)
    for sent in mail_stub.sent[before:]:
        assert "\x00" not in sent.TextBody and all(b"\x00" not in a.Data for a in sent.Attachment)
