"""Conversion to the Mail API's message: hostile headers, names and structure are 4xx or 204, never 5xx."""

from __future__ import annotations

import pytest
import webtest

import mailer
from conftest import KEY, form

HEAD = b"From: Sender <s@example.com>\r\nTo: r@example.com\r\n"


@pytest.fixture
def app(mail_stub):
    return webtest.TestApp(mailer.make_app([KEY], default_sender="default@example.com"), lint=True)


def send(app, raw: bytes, status="*"):
    return app.post("/", form(raw), content_type="application/x-www-form-urlencoded", status=status)


def with_attachment(disposition: bytes, content_type: bytes = b"application/octet-stream") -> bytes:
    return (
        HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--B\r\nContent-Type: " + content_type + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n"
        b"data\r\n--B--\r\n"
    )


# --------------------------------------------------------------------------- encoded words with no real charset


def test_encoded_word_with_garbage_charset_in_subject_is_shown_as_it_came(app, mail_stub):
    send(app, HEAD + b"Subject: =?\xc3\xa9?q?x?=\r\n\r\nhi\r\n", status=204)
    assert mail_stub.sent[0].Subject == "=?é?q?x?="


def test_encoded_word_with_garbage_charset_in_display_name(app, mail_stub):
    send(
        app, b"From: =?\xc3\xa9?q?x?= <s@example.com>\r\nTo: =?nope?b?eA==?= <r@example.com>\r\n\r\nhi\r\n", status=204
    )
    assert mail_stub.sent[0].Sender.endswith("<s@example.com>")


def test_encoded_word_with_garbage_charset_in_file_name_is_read_as_clients_read_it(app, mail_stub):
    send(app, with_attachment(b'attachment; filename="=?\xc3\xa9?q?x.pdf?="'), status=204)
    [attachment] = mail_stub.sent[0].Attachment
    assert attachment.FileName == "x.pdf"


# --------------------------------------------------------------------------- attachment names


@pytest.mark.parametrize(
    "disposition, reason",
    [
        (b"attachment; filename*=utf-8''evil.exe%00.txt", "control characters"),
        (b'attachment; filename="evil.exe."', ".exe"),
        (b'attachment; filename="evil.exe "', ".exe"),
        (b'attachment; filename="evil.exe . ."', ".exe"),
        (b"attachment; filename*=utf-8''evil.bat%2E%20", ".bat"),
        (b"attachment; filename*0*=utf-8''evil; filename*1*=.e; filename*2=xe", ".exe"),
        (b'attachment; filename="=?utf-8?q?evil.scr?="', ".scr"),
        (b'attachment; filename="=?utf-8?q?evil.exe=00.txt?="', "control characters"),
        (b"attachment; filename*=utf-8''evil%E2%80%AEtxt.exe", "control characters"),
        (b'attachment; filename="tab\x01.pdf"', "control characters"),
        (b'attachment; filename="=?x-bogus?q?evil.exe?="', ".exe"),
        (b'attachment; filename="=?utf-8*en?q?evil.exe?="', ".exe"),
        (b'attachment; filename="=?utf-8*en?b?ZXZpbC5leGU=?="', ".exe"),
        (b'attachment; filename="=?utf-8?q?evil.exe?= =?x-bogus?q??="', ".exe"),
    ],
)
def test_attachment_names_are_judged_as_the_recipient_sees_them(app, mail_stub, disposition, reason):
    res = send(app, with_attachment(disposition), status=400)
    assert reason in res.text
    assert mail_stub.sent == []


def test_trailing_dots_and_spaces_are_dropped_from_a_harmless_name(app, mail_stub):
    send(app, with_attachment(b'attachment; filename="report.pdf. "'), status=204)
    assert [a.FileName for a in mail_stub.sent[0].Attachment] == ["report.pdf"]


def test_folded_rfc2231_name_is_joined(app, mail_stub):
    send(app, with_attachment(b"attachment;\r\n filename*0*=utf-8''R%C3%A9sum;\r\n filename*1=e.pdf"), status=204)
    assert [a.FileName for a in mail_stub.sent[0].Attachment] == ["Résume.pdf"]


# --------------------------------------------------------------------------- structure and bytes


def nested(depth: int) -> bytes:
    inner = b"From: a@example.com\r\nTo: b@example.com\r\n\r\nbottom\r\n"
    for _ in range(depth):
        inner = HEAD + b"Content-Type: message/rfc822\r\n\r\n" + inner
    return inner


def test_deep_nesting_is_refused_with_its_limit(app, mail_stub):
    assert "nests MIME parts more than 32 deep" in send(app, nested(250), status=400).text
    assert "nests MIME parts more than 32 deep" in send(app, nested(1000), status=400).text
    send(app, nested(20), status=204)


def test_nul_after_the_first_4kb_is_refused(app, mail_stub):
    raw = HEAD + b"Subject: s\r\n\r\n" + b"line\r\n" * 1000 + b"a\x00b\r\n"
    res = send(app, raw, status=400)
    assert "NUL byte at offset" in res.text
    assert mail_stub.sent == []


def test_empty_html_only_message_is_sent_with_an_empty_body(app, mail_stub):
    send(app, HEAD + b"Content-Type: text/html\r\n\r\n", status=204)
    [sent] = mail_stub.sent
    assert sent.TextBody == "" and not sent.HasField("HtmlBody")


def test_an_attached_message_holding_an_executable_is_refused(app, mail_stub):
    inner = (
        b"From: a@example.com\r\nTo: b@example.com\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=I\r\n\r\n--I\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b'--I\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="evil.exe"'
        b"\r\n\r\nMZ\r\n--I--\r\n"
    )
    res = send(app, with_attachment(b"attachment", b"message/rfc822").replace(b"data", inner), status=400)
    assert ".exe" in res.text and mail_stub.sent == []


@pytest.mark.parametrize(
    "raw, reason",
    [
        (HEAD + b"Subject: =?utf-8?q?a=00b?=\r\n\r\nhi\r\n", "the Subject holds control characters"),
        (HEAD + b"Subject: =?utf-8?q?a=1B[31mred?=\r\n\r\nhi\r\n", "the Subject holds control characters"),
        (b"From: =?utf-8?q?x=00y?= <s@example.com>\r\nTo: r@example.com\r\n\r\nhi\r\n", "display name holds"),
        (HEAD + b"Content-Transfer-Encoding: quoted-printable\r\n\r\nhi=00there\r\n", "NUL character"),
        (
            HEAD + b"Content-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\naGkAdGhlcmU=\r\n",
            "NUL character",
        ),
        (HEAD + b"Auto-Submitted: \x01\x7f\r\n\r\nhi\r\n", "header Auto-Submitted holds control characters"),
    ],
)
def test_nul_and_control_characters_after_decoding_never_reach_the_mail(app, mail_stub, raw, reason):
    assert reason in send(app, raw, status=400).text
    assert mail_stub.sent == []
