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
    before = len(mail_stub.sent)
    res = _app().post("/", form(raw, **fix_sender), content_type="application/x-www-form-urlencoded", status="*")
    assert res.status_int in (204, 400), res.text
    assert len(mail_stub.sent) - before == (1 if res.status_int == 204 else 0)
    if res.status_int == 400:
        assert res.text.strip()
