"""POST /check: the dry run reports what a send would do, and never sends."""

from __future__ import annotations

import io
import json
import zipfile
from email.message import EmailMessage

import pytest
import webtest

import mailer
from appengine_mailer.settings import Key
from conftest import KEY, OTHER_KEY, form, server_env
from test_mailer import make_message
from test_mailer_e2e import post

SCOPED_KEY = b"scoped-key-0123456789abcdefgh"


@pytest.fixture
def app(mail_stub):
    keys = [KEY, Key(SCOPED_KEY, ["app@example.com", "@apps.example.org"])]
    return webtest.TestApp(mailer.make_app(keys, default_sender="default@example.com"), lint=True)


def check(app, msg, status=200, key=KEY, **extra):
    raw = msg if isinstance(msg, bytes) else msg.as_bytes()
    return app.post("/check", form(raw, key, **extra), content_type="application/x-www-form-urlencoded", status=status)


def rich_message() -> EmailMessage:
    msg = make_message(
        From="Sender <sender@example.com>",
        To="Ann <ann@example.com>, bob@example.com",
        Cc="cc@example.com",
        Bcc="hidden@example.com",
        X_Mailer="Thunderbird",
        In_Reply_To="<a@b>",
        Date="Thu, 26 Nov 2026 10:00:00 +0000",
    )
    msg.add_attachment(b"%PDF-1.4 tiny", "application", "pdf", filename="report.pdf")
    return msg


def test_report_of_a_message_that_would_be_sent(app, mail_stub):
    res = check(app, rich_message())
    assert res.content_type == "application/json"
    report = res.json
    assert report["would_send"] is True and report["problems"] == []
    assert report["sender"] == "sender@example.com"
    assert report["recipients"] == {
        "to": ["ann@example.com", "bob@example.com"],
        "cc": ["cc@example.com"],
        "bcc": ["hidden@example.com"],
    }
    assert set(report["headers_dropped"]) == {"X-Mailer", "Date"}
    assert report["headers_kept"] == ["In-Reply-To"]
    assert report["attachments"] == [
        {
            "name": "report.pdf",
            "content_type": "application/pdf",
            "declared_type": "application/pdf",
            "size": 13,
            "inline": False,
            "refused": False,
        }
    ]
    assert "known only when sending" in report["notes"][0]
    assert mail_stub.sent == []


def test_every_refusal_is_listed_not_only_the_first(app, mail_stub):
    msg = make_message(To="not an address", Cc="also@@bad")
    msg.add_attachment(b"MZ", "application", "octet-stream", filename="setup.exe")
    report = check(app, msg).json
    assert report["would_send"] is False
    problems = " | ".join(report["problems"])
    assert "To address" in problems and "Cc " in problems and ".exe" in problems
    assert len(report["problems"]) >= 3
    assert mail_stub.sent == []


def test_sender_after_fix_sender(app):
    msg = make_message()
    del msg["From"]
    assert check(app, msg).json["problems"] == [
        "message has no From address (send with fix_sender to use the default sender)"
    ]
    report = check(app, msg, fix_sender="true").json
    assert report["would_send"] is True and report["sender"] == "default@example.com"


def test_a_bad_signature_gets_the_same_answer_as_a_send(app):
    res = check(app, make_message(), status=400, key=OTHER_KEY + b"x")
    assert res.text == "signature does not match the message under any configured key\n"
    res = app.post("/check", b"msg=x", content_type="application/x-www-form-urlencoded", status=400)
    assert res.text == "missing or empty field 'signature'\n"


def test_scoped_key_sender_outside_its_list_is_a_problem(app):
    allowed = check(app, make_message(From="App <APP@example.com>"), key=SCOPED_KEY).json
    assert allowed["would_send"] is True
    domain = check(app, make_message(From="x@apps.example.org"), key=SCOPED_KEY).json
    assert domain["would_send"] is True
    report = check(app, make_message(From="boss@example.com"), key=SCOPED_KEY).json
    assert report["would_send"] is False
    assert "may not send as 'boss@example.com'" in report["problems"][0]


def zip_with(name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hi")
        archive.writestr(name, b"MZ")
    return buffer.getvalue()


def test_warnings_for_what_receivers_or_the_mail_api_change(app):
    msg = make_message(From="Sender <sender@Example.COM>")
    msg.add_attachment(zip_with("tools/setup.exe"), "application", "zip", filename="tools.zip")
    msg.add_attachment(b"\x89PNG", "image", "png", filename="picture.dat")
    report = check(app, msg).json
    assert report["would_send"] is True
    warnings = " | ".join(report["warnings"])
    assert "'Example.COM' has upper-case letters" in warnings
    assert "'tools.zip' is an archive holding an executable ('tools/setup.exe')" in warnings
    assert "'picture.dat' is sent as application/octet-stream, not image/png" in warnings


def test_an_unparseable_message_is_a_problem_not_an_error(app):
    report = check(app, b"\x00binary").json
    assert report == {**report, "would_send": False, "problems": ["msg is binary data, not an RFC 2822 message"]}


def test_every_real_send_logs_the_headers_it_dropped(app, caplog):
    caplog.set_level("INFO")
    app.post("/", form(rich_message().as_bytes()), content_type="application/x-www-form-urlencoded", status=204)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sent: 204")]
    assert "headers_dropped=X-Mailer,Date" in line


# --------------------------------------------------------------------------- the real server, every delivery mode


@pytest.mark.parametrize("mode", ["outbox", "smtp", "mail-api"])
def test_check_against_the_real_server_sends_nothing(start_server, smtp_sink, tmp_path, mode):
    extra = {"GAE_ENV": "standard"} if mode == "mail-api" else {}
    env = server_env(tmp_path, smtp_sink if mode == "smtp" else None, **extra)
    server = start_server(env)
    status, text = post(server.url + "check", form(rich_message().as_bytes()))
    assert status == 200
    report = json.loads(text)
    assert report["would_send"] is True and report["delivery"] == mode
    assert post(server.url + "check", form(rich_message().as_bytes(), b"wrong-key-0123456789"))[0] == 400
    server.stop()
    assert smtp_sink.received == []
    assert not (tmp_path / "outbox").exists() or not any((tmp_path / "outbox" / "new").iterdir())


@pytest.mark.parametrize("header", ["Resent-From", "On-Behalf-Of"])
def test_a_scoped_key_cannot_claim_another_sender_in_other_headers(app, mail_stub, header):
    msg = make_message(From="app@example.com", **{header.replace("-", "_"): "CEO <ceo@example.com>"})
    res = app.post("/", form(msg.as_bytes(), SCOPED_KEY), content_type="application/x-www-form-urlencoded", status=403)
    assert "may not send as 'ceo@example.com'" in res.text
    assert check(app, msg, key=SCOPED_KEY).json["would_send"] is False
    assert mail_stub.sent == []


def test_check_and_send_agree_on_text_a_codec_cannot_encode(app, mail_stub):
    raw = b"From: a@example.com\r\nTo: b@example.com\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n+2AA-\r\n"
    assert check(app, raw).json["would_send"] is True
    app.post("/", form(raw), content_type="application/x-www-form-urlencoded", status=204)
    assert mail_stub.sent[0].TextBody.strip() == "\ufffd"


def test_the_report_is_plain_unicode_whatever_the_message_holds(app):
    raw = (
        b"From: a@example.com\r\nTo: b@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B"
        b"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n--B\r\nContent-Type: application/x\xff\xfe\r\n"
        b'Content-Disposition: attachment; filename="a.bin"\r\n\r\ndata\r\n--B--\r\n'
    )
    text = check(app, raw).text
    text.encode("utf-8")  # no lone surrogates: any terminal or JSON reader takes it
    assert "\\udc" not in text


def test_an_archive_with_too_many_entries_is_not_opened(app):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for number in range(1200):
            archive.writestr(f"f{number}.txt", b"")
        archive.writestr("setup.exe", b"MZ")
    msg = make_message()
    msg.add_attachment(buffer.getvalue(), "application", "zip", filename="many.zip")
    report = check(app, msg).json
    assert report["would_send"] is True and not any("executable" in w for w in report["warnings"])


def test_the_report_lists_good_addresses_and_refused_attachments_too(app):
    msg = make_message(To="you@example.com, bad address")
    msg.add_attachment(b"MZ", "application", "octet-stream", filename="setup.exe")
    report = check(app, msg).json
    assert report["recipients"]["to"] == ["you@example.com"]
    [attachment] = report["attachments"]
    assert attachment["name"] == "setup.exe" and attachment["refused"] is True
    assert any(".exe" in problem for problem in report["problems"])
