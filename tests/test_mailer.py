"""The WSGI app through WebTest (lint on) with a recording `mail` stub."""

from __future__ import annotations

import base64
import json
import logging
from email.message import EmailMessage
from urllib.parse import quote_from_bytes

import pytest
import webtest
from google.appengine.api import mail_service_pb2
from google.appengine.runtime import apiproxy_errors

import mailer
from conftest import KEY, OTHER_KEY, form, sign


def make_message(**overrides) -> EmailMessage:
    """A plain message; keyword arguments set headers (Reply_To for Reply-To)."""
    msg = EmailMessage()
    msg["From"] = overrides.pop("From", "Sender <sender@example.com>")
    msg["To"] = overrides.pop("To", "Rcpt <rcpt@example.com>")
    msg["Subject"] = overrides.pop("Subject", "Hello")
    for name, value in overrides.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Plain body\n")
    return msg


@pytest.fixture
def app(mail_stub):
    return webtest.TestApp(mailer.make_app([KEY, OTHER_KEY], default_sender="default@example.com"), lint=True)


def post(app, body: bytes, status="*", content_type="application/x-www-form-urlencoded"):
    return app.post("/", body, content_type=content_type, status=status)


def send(app, msg, status="*", key=KEY, **extra):
    raw = msg if isinstance(msg, bytes) else msg.as_bytes()
    return post(app, form(raw, key, **extra), status=status)


# --------------------------------------------------------------------------- success


def test_health_reports_counts_not_secrets(app):
    res = app.get("/", status=200)
    data = json.loads(res.text)
    assert data["keys"] == 2 and data["default_sender"] is True and data["delivery"] == "stub"
    assert KEY.decode() not in res.text


def test_plain_message_is_sent(app, mail_stub):
    res = send(app, make_message(), status=204)
    assert res.body == b""
    [sent] = mail_stub.sent
    assert sent.Sender == "Sender <sender@example.com>"
    assert list(sent.To) == ["Rcpt <rcpt@example.com>"]
    assert sent.Subject == "Hello"
    assert sent.TextBody == "Plain body\n"


def test_either_key_signs(app, mail_stub):
    send(app, make_message(), key=OTHER_KEY, status=204)
    assert len(mail_stub.sent) == 1


def test_all_recipient_headers_reply_to_and_allowed_headers(app, mail_stub):
    msg = make_message(
        Cc="c1@example.com, C Two <c2@example.com>",
        Bcc="hidden@example.com",
        Reply_To="replies@example.com",
        In_Reply_To="<a@b>",
        References="<a@b> <c@d>",
        List_Id="<list.example.com>",
        X_Custom="dropped",
        Auto_Submitted="auto-generated",
    )
    send(app, msg, status=204)
    [sent] = mail_stub.sent
    assert list(sent.Cc) == ["c1@example.com", "C Two <c2@example.com>"]
    assert list(sent.Bcc) == ["hidden@example.com"]
    assert sent.ReplyTo == "replies@example.com"
    headers = {h.name: h.value for h in sent.Header}
    assert headers == {
        "In-Reply-To": "<a@b>",
        "References": "<a@b> <c@d>",
        "List-Id": "<list.example.com>",
        "Auto-Submitted": "auto-generated",
    }


def test_unicode_subject_and_display_name(app, mail_stub):
    msg = make_message(From="Jürgen Groß <j@example.com>", Subject="Grüße — ☃")
    send(app, msg, status=204)
    [sent] = mail_stub.sent
    assert sent.Subject == "Grüße — ☃"
    assert sent.Sender.startswith("=?utf-8?") and sent.Sender.endswith("<j@example.com>")
    from email.header import decode_header, make_header

    assert str(make_header(decode_header(sent.Sender))) == "Jürgen Groß <j@example.com>"


def test_empty_subject_is_allowed(app, mail_stub):
    send(app, make_message(Subject=""), status=204)
    assert mail_stub.sent[0].Subject == ""


def test_latin1_8bit_body(app, mail_stub):
    raw = (
        b"From: s@example.com\r\nTo: r@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Caf\xe9 cr\xe8me\r\n"
    )
    send(app, raw, status=204)
    assert mail_stub.sent[0].TextBody.rstrip() == "Café crème"


def test_html_alternative_attachments_and_inline(app, mail_stub):
    msg = make_message()
    msg.add_alternative("<p>Hi <img src='cid:logo'></p>", subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG\r\n\x00data", "image", "png", cid="<logo>")
    pdf = bytes(range(256)) * 10
    msg.add_attachment(pdf, "application", "pdf", filename="report.pdf")
    msg.add_attachment(b"\x00\x01\r\n", "application", "octet-stream")
    send(app, msg, status=204)
    [sent] = mail_stub.sent
    assert sent.TextBody == "Plain body\n"
    assert "<p>Hi" in sent.HtmlBody
    files = {a.FileName: a for a in sent.Attachment}
    assert files["report.pdf"].Data == pdf
    assert files["attachment.png"].ContentID == "<logo>"
    assert files["attachment.png"].Data == b"\x89PNG\r\n\x00data"
    unnamed = [name for name in files if name.startswith("attachment-")]
    assert len(unnamed) == 1 and files[unnamed[0]].Data == b"\x00\x01\r\n"


def test_html_only_message(app, mail_stub):
    msg = EmailMessage()
    msg["From"], msg["To"] = "s@example.com", "r@example.com"
    msg.set_content("<b>only html</b>", subtype="html")
    send(app, msg, status=204)
    [sent] = mail_stub.sent
    assert sent.HtmlBody == "<b>only html</b>\n" and not sent.HasField("TextBody")


def test_hundred_recipients_are_allowed(app, mail_stub):
    to = ", ".join(f"r{i}@example.com" for i in range(100))
    send(app, make_message(To=to), status=204)
    assert len(mail_stub.sent[0].To) == 100


def test_non_utf8_message_bytes_are_signed_exactly(app, mail_stub):
    raw = b"From: s@example.com\nTo: r@example.com\nSubject: \xff\xfe\n\nbody \xff\n"
    body = b"msg=" + quote_from_bytes(raw).encode() + b"&signature=" + quote_from_bytes(sign(raw).encode()).encode()
    post(app, body, status=204)
    assert len(mail_stub.sent) == 1


def test_plus_decodes_to_space_in_signed_bytes(app, mail_stub):
    raw = b"From: s@example.com\nTo: r@example.com\nSubject: a b\n\nx y\n"
    body = b"msg=" + raw.replace(b" ", b"+").replace(b"\n", b"%0A").replace(b":", b"%3A").replace(b"@", b"%40")
    body += b"&signature=" + quote_from_bytes(sign(raw).encode(), safe=b"").encode()
    post(app, body, status=204)
    assert mail_stub.sent[0].Subject == "a b"


# --------------------------------------------------------------------------- fix_sender


def test_fix_sender_without_from_uses_default(app, mail_stub):
    msg = make_message()
    del msg["From"]
    send(app, msg, status=204, fix_sender="true")
    assert mail_stub.sent[0].Sender == "default@example.com"


def test_fix_sender_after_unauthorized_sender(app, mail_stub):
    def refuse_non_default(request):
        if request.Sender != "default@example.com":
            return apiproxy_errors.ApplicationError(mail_service_pb2.MailServiceError.UNAUTHORIZED_SENDER, "no")

    mail_stub.fail_with = refuse_non_default
    send(app, make_message(), status=204, fix_sender="true")
    [sent] = mail_stub.sent
    assert sent.Sender == "default@example.com"
    assert sent.ReplyTo == "Sender <sender@example.com>"


def test_unauthorized_sender_without_fix_sender_is_400(app, mail_stub):
    mail_stub.fail_with = apiproxy_errors.ApplicationError(
        mail_service_pb2.MailServiceError.UNAUTHORIZED_SENDER, "Unauthorized sender"
    )
    res = send(app, make_message(), status=400)
    assert "unauthorized sender" in res.text


# --------------------------------------------------------------------------- refusals


def _without_from():
    msg = make_message()
    del msg["From"]
    return msg.as_bytes()


def _with_exe():
    msg = make_message()
    msg.add_attachment(b"MZ", "application", "octet-stream", filename="setup.exe")
    return msg.as_bytes()


def _with_parts(count: int) -> bytes:
    msg = make_message()
    for i in range(count):
        msg.add_attachment(b"x", "application", "octet-stream", filename=f"f{i}.bin")
    return msg.as_bytes()


BAD_REQUESTS = [
    ("missing msg", b"signature=abc", "'msg'"),
    ("empty msg", b"msg=&signature=abc", "'msg'"),
    ("missing signature", b"msg=From%3A+a%40b.c", "'signature'"),
    ("empty body", b"", "'msg'"),
    ("wrong signature", form(make_message().as_bytes(), b"wrong-key"), "signature does not match"),
    ("malformed escape", b"msg=%zz&signature=a", "malformed percent-escape"),
    ("truncated escape", b"msg=abc%4&signature=a", "malformed percent-escape"),
    ("binary junk", b"\x00\xff\xfe=\x80", "urlencoded"),
    ("duplicate field", b"msg=a&msg=b&signature=c", "more than once"),
    ("bad fix_sender", form(b"x", fix_sender="perhaps"), "fix_sender"),
    ("not an email", form(b"\x00\x01\x02 binary"), "not an RFC 2822 message"),
    ("no headers", form(b"just some text without any header"), "no headers"),
    ("no recipients", form(make_message(To="").as_bytes()), "no recipients"),
    ("bad recipient", form(make_message(To="not an address").as_bytes()), "not a valid email address"),
    ("no sender", form(_without_from()), "no From address"),
    ("forbidden attachment", form(_with_exe()), ".exe"),
    ("too many headers", form(b"From: a@b.com\nTo: c@d.com\n" + b"X-A: b\n" * 5000 + b"\nx"), "header lines"),
    ("too many parts", form(_with_parts(500)), "MIME parts"),
    (
        "too many recipients",
        form(make_message(To=", ".join(f"r{i}@x.com" for i in range(101))).as_bytes()),
        "more than the limit of 100",
    ),
]


@pytest.mark.parametrize("body, reason", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_400_with_reason_and_send_nothing(app, mail_stub, body, reason):
    res = post(app, body, status=400)
    assert reason in res.text
    assert res.content_type == "text/plain"
    assert mail_stub.sent == []


def test_other_methods_get_405_with_allow(app):
    res = app.put("/", b"x", status=405)
    assert res.headers["Allow"] == "GET, HEAD, POST"


def test_other_content_type_gets_415(app, mail_stub):
    res = post(app, b'{"msg": "x"}', status=415, content_type="application/json")
    assert "application/x-www-form-urlencoded" in res.text


def test_other_path_gets_404(app):
    app.get("/admin", status=404)


def test_body_over_limit_is_refused_before_reading(mail_stub):
    class Unreadable:
        def read(self, *args):
            raise AssertionError("the body was read")

    app = mailer.make_app([KEY], max_body=1000)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": "1001",
        "wsgi.input": Unreadable(),
    }
    seen = []
    body = b"".join(app(environ, lambda status, headers: seen.append(status)))
    assert seen == ["413 Payload Too Large"] and b"1000-byte limit" in body


@pytest.mark.parametrize("length", ["+12", "abc", "1e3", " 12", "-1"])
def test_bad_content_length_is_400(mail_stub, length):
    app = mailer.make_app([KEY])
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": length,
        "wsgi.input": None,
    }
    seen = []
    body = b"".join(app(environ, lambda status, headers: seen.append(status)))
    assert seen == ["400 Bad Request"] and b"is not a number" in body


def test_no_keys_configured_is_503(mail_stub):
    app = webtest.TestApp(mailer.make_app([]), lint=True)
    res = send(app, make_message(), status=503)
    assert "GMAIL_SECRET_KEY" in res.text


# --------------------------------------------------------------------------- server-side trouble


@pytest.mark.parametrize(
    "error",
    [
        apiproxy_errors.OverQuotaError("quota"),
        apiproxy_errors.DeadlineExceededError("slow"),
        apiproxy_errors.ApplicationError(mail_service_pb2.MailServiceError.INTERNAL_ERROR, "boom"),
        ConnectionRefusedError(111, "refused"),
    ],
    ids=["over-quota", "deadline", "internal", "connection"],
)
def test_service_trouble_is_503_with_retry_after(app, mail_stub, error):
    mail_stub.fail_with = error
    res = send(app, make_message(), status=503)
    assert res.headers["Retry-After"].isdigit()
    assert "retry" in res.text


def test_logs_never_hold_key_or_body(app, mail_stub, caplog):
    caplog.set_level(logging.DEBUG)
    msg = make_message()
    msg.set_content("TOP-SECRET-BODY\n")
    send(app, msg, status=204)
    send(app, msg, key=b"wrong", status=400)
    text = caplog.text
    assert "sent:" in text and "refused:" in text
    assert "TOP-SECRET-BODY" not in text and KEY.decode() not in text
    assert base64.b64encode(b"TOP-SECRET-BODY").decode() not in text


def test_raw_utf8_and_latin1_header_bytes_are_read_as_text(app, mail_stub):
    raw = ('From: "Jürgen Groß" <j@example.com>\nTo: r@example.com\nSubject: Grüße\n\nx\n').encode()
    send(app, raw, status=204)
    raw = b'From: "Caf\xe9" <c@example.com>\nTo: r@example.com\nSubject: Cr\xe8me\n\nx\n'
    send(app, raw, status=204)
    from email.header import decode_header, make_header

    first, second = mail_stub.sent
    assert str(make_header(decode_header(first.Sender))) == "Jürgen Groß <j@example.com>"
    assert first.Subject == "Grüße"
    assert str(make_header(decode_header(second.Sender))) == "Café <c@example.com>"
    assert second.Subject == "Crème"


def test_attached_message_stays_whole(app, mail_stub):
    inner = make_message(Subject="Forwarded")
    msg = make_message()
    msg.add_attachment(inner)
    send(app, msg, status=204)
    [sent] = mail_stub.sent
    [attachment] = sent.Attachment
    assert attachment.FileName == "attachment.eml"
    assert b"Subject: Forwarded" in attachment.Data and b"Plain body" in attachment.Data


def test_text_the_sdk_cannot_encode_is_400(app, mail_stub):
    mail_stub.fail_with = UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed")
    res = send(app, make_message(), status=400)
    assert "cannot be encoded" in res.text


def test_many_parts_and_headers_under_the_caps_are_fine(app, mail_stub):
    send(app, _with_parts(400), status=204)
    assert len(mail_stub.sent[0].Attachment) == 400


def test_a_bug_answers_500_without_leaking_the_message(app, mail_stub, caplog):
    mail_stub.fail_with = RuntimeError("TOP-SECRET-BODY in an exception message")
    res = send(app, make_message(), status=500)
    assert res.text == "internal error\n"
    assert "internal error: RuntimeError at" in caplog.text and "TOP-SECRET-BODY" not in caplog.text


def test_importing_mailer_keeps_a_registered_mail_stub(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    code = (
        "from google.appengine.api import apiproxy_stub_map\n"
        "class Mine:\n    def MakeSyncCall(self, *args): pass\n"
        "mine = Mine()\n"
        "apiproxy_stub_map.apiproxy.RegisterStub('mail', mine)\n"
        "import mailer\n"
        "assert apiproxy_stub_map.apiproxy.GetStub('mail') is mine\n"
        "print(mailer.delivery_mode())\n"
    )
    env = {"PATH": "/usr/bin:/bin", "GMAIL_SECRET_KEY": "k" * 20, "GMAIL_OUTBOX": str(tmp_path / "outbox")}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stub" and not (tmp_path / "outbox").exists()


def test_smtp_credentials_refused_is_503_even_with_fix_sender(app, mail_stub):
    from google.appengine.api import mail_errors

    calls = []

    def refuse(request):
        calls.append(request.Sender)
        return mail_errors.InvalidSenderError("SMTP authentication failed: 535 bad credentials")

    mail_stub.fail_with = refuse
    res = send(app, make_message(), status=503, fix_sender="true")
    assert "credentials" in res.text and res.headers["Retry-After"]
    assert calls == ["Sender <sender@example.com>"]  # no second try from the default sender
