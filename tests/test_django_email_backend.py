"""GmailBackend through Django's own mail API, into the real proxy and an SMTP server."""

from __future__ import annotations

import time
from email.mime.image import MIMEImage

import pytest

django = pytest.importorskip("django")
from django.core import mail  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.test import override_settings  # noqa: E402
from django_setup import DJANGO_SECRET  # noqa: E402

import gmail  # noqa: E402
from appengine_mailer.django_email_backend import GmailBackend  # noqa: E402
from conftest import KEY, free_port, server_env  # noqa: E402

# Django 6.1 deprecates EMAIL_BACKEND and get_connection() in favour of MAILERS; the
# documented settings still work until Django 2028, and these tests use them on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
]


@pytest.fixture
def proxy(start_server, smtp_sink, tmp_path):
    """The real proxy, trusting Django's SECRET_KEY, delivering into smtp_sink."""
    server = start_server(server_env(tmp_path, smtp_sink, keys=(DJANGO_SECRET.encode(),)))
    server.sink = smtp_sink
    with override_settings(EMAIL_APPENGINE_PROXY_URL=server.url):
        yield server


def by_recipient(received):
    return {rcpt: env for env in received for rcpt in env.rcpt_tos}


def test_send_mail(proxy):
    assert mail.send_mail("Hello", "Body text\n", "from@example.com", ["to@example.com"]) == 1
    [env] = proxy.sink.wait_for(1)
    assert env.mail_from == "from@example.com" and env.rcpt_tos == ["to@example.com"]
    assert env.message["Subject"] == "Hello"
    assert env.message.get_body(("plain",)).get_content().strip() == "Body text"


def test_send_mass_mail(proxy):
    datatuple = [(f"Mass {i}", f"Body {i}", "from@example.com", [f"r{i}@example.com"]) for i in range(3)]
    assert mail.send_mass_mail(datatuple) == 3
    received = proxy.sink.wait_for(3)
    assert sorted(env.message["Subject"] for env in received) == ["Mass 0", "Mass 1", "Mass 2"]


def test_everything_django_expresses_arrives(proxy):
    msg = mail.EmailMultiAlternatives(
        "Grüße",
        "Plain text\n",
        "Sender Näme <from@example.com>",
        ["to@example.com"],
        cc=["cc@example.com"],
        bcc=["hidden@example.com"],
        reply_to=["replies@example.com"],
        headers={"In-Reply-To": "<earlier@example.com>", "X-Not-Allowed": "dropped"},
    )
    msg.attach_alternative("<p>HTML <img src='cid:logo'></p>", "text/html")
    msg.attach("report.pdf", b"%PDF-1.4\x00\xff binary", "application/pdf")
    logo = MIMEImage(b"\x89PNG\r\n\x1a\nfakepng", "png")
    logo.add_header("Content-ID", "<logo>")
    logo.add_header("Content-Disposition", "inline", filename="logo.png")
    msg.attach(logo)
    assert msg.send() == 1
    received = proxy.sink.wait_for(1)
    [env] = received
    assert sorted(env.rcpt_tos) == ["cc@example.com", "hidden@example.com", "to@example.com"]
    got = env.message
    assert b"hidden@example.com" not in env.content
    assert got["Subject"] == "Grüße" and got["From"].addresses[0].display_name == "Sender Näme"
    assert got["Reply-To"] == "replies@example.com" and got["In-Reply-To"] == "<earlier@example.com>"
    assert "X-Not-Allowed" not in got
    assert "<p>HTML" in got.get_body(("html",)).get_content()
    parts = {p.get_filename(): p for p in got.walk() if p.get_filename()}
    assert parts["report.pdf"].get_content() == b"%PDF-1.4\x00\xff binary"
    assert parts["logo.png"]["Content-ID"] == "<logo>"
    assert parts["logo.png"].get_content() == b"\x89PNG\r\n\x1a\nfakepng"


def test_fail_silently_returns_count_and_never_raises():
    with override_settings(EMAIL_APPENGINE_PROXY_URL=f"http://127.0.0.1:{free_port()}/"):
        connection = mail.get_connection(fail_silently=True)
        assert mail.EmailMessage("s", "b", "f@example.com", ["t@example.com"], connection=connection).send() == 0
        with pytest.raises(gmail.MessageSendingFailure, match="could not reach"):
            mail.send_mail("s", "b", "f@example.com", ["t@example.com"])


def test_refusal_raises_unless_silent(reference_server):
    reference_server.force_status, reference_server.force_reason = 400, "no recipients"
    with override_settings(EMAIL_APPENGINE_PROXY_URL=reference_server.url, EMAIL_APPENGINE_SECRET_KEY=KEY.decode()):
        with pytest.raises(gmail.MessageSendingFailure, match="400 no recipients"):
            mail.send_mail("s", "b", "f@example.com", ["t@example.com"])
        messages = [mail.EmailMessage("s", "b", "f@example.com", ["t@example.com"]) for _ in range(2)]
        assert mail.get_connection(fail_silently=True).send_messages(messages) == 0


def test_missing_setting_is_improperly_configured_even_when_silent():
    with (
        override_settings(EMAIL_APPENGINE_PROXY_URL=None),
        pytest.raises(ImproperlyConfigured, match="EMAIL_APPENGINE_PROXY_URL"),
    ):
        mail.get_connection(fail_silently=True)


def test_own_secret_key_setting_and_fix_sender(reference_server):
    with override_settings(
        EMAIL_APPENGINE_PROXY_URL=reference_server.url,
        EMAIL_APPENGINE_SECRET_KEY=KEY.decode(),
        EMAIL_APPENGINE_FIX_SENDER=True,
    ):
        assert mail.send_mail("s", "b", "f@example.com", ["t@example.com"]) == 1
    assert reference_server.accepted[0]["fix_sender"] == "true"


def test_connection_contract(reference_server):
    with override_settings(
        EMAIL_APPENGINE_PROXY_URL=reference_server.url,
        EMAIL_APPENGINE_SECRET_KEY=KEY.decode(),
        EMAIL_APPENGINE_CONCURRENCY=1,
    ):
        backend = GmailBackend()
        backend.close()  # safe when nothing is open
        assert backend.send_messages([]) == 0
        assert backend.open() is True and backend.open() is False
        messages = [mail.EmailMessage(f"m{i}", "b", "f@example.com", ["t@example.com"]) for i in range(20)]
        messages.append(mail.EmailMessage("nobody", "b", "f@example.com", []))
        assert backend.send_messages(messages) == 20
        backend.close()
        backend.close()
        with GmailBackend() as connection:
            assert connection.send_messages(messages[:5]) == 5
    assert reference_server.connections == 2 and len(reference_server.accepted) == 25


def test_send_mass_mail_with_concurrency_through_the_real_proxy(proxy):
    proxy.sink.delay = 0.02
    datatuple = [(f"Mass {i}", f"Body {i}", "from@example.com", [f"r{i}@example.com"]) for i in range(24)]
    with override_settings(EMAIL_APPENGINE_CONCURRENCY=6):
        assert mail.get_connection().concurrency == 6
        assert mail.send_mass_mail(datatuple) == 24
    received = proxy.sink.wait_for(24)
    time.sleep(0.3)
    assert sorted(env.message["Subject"] for env in proxy.sink.received) == sorted(f"Mass {i}" for i in range(24))
    assert sorted(env.rcpt_tos[0] for env in received) == sorted(f"r{i}@example.com" for i in range(24))


def test_a_refused_message_in_a_batch(reference_server):
    reference_server.force_status, reference_server.force_reason = 400, "no such user"
    reference_server.force_if = b"refuse-me"
    subjects = ["ok 0", "refuse-me 1", "ok 2", "ok 3", "refuse-me 4", "ok 5"]
    with override_settings(EMAIL_APPENGINE_PROXY_URL=reference_server.url, EMAIL_APPENGINE_SECRET_KEY=KEY.decode()):
        messages = [mail.EmailMessage(s, "b", "f@example.com", ["t@example.com"]) for s in subjects]
        assert mail.get_connection(fail_silently=True, concurrency=3).send_messages(messages) == 4
        with pytest.raises(gmail.MessageSendingFailure, match="400 no such user") as caught:
            mail.get_connection(concurrency=3).send_messages(messages)
    assert [outcome.sent for outcome in caught.value.outcomes] == [not s.startswith("refuse") for s in subjects]
    assert len(reference_server.accepted) == 8  # the refusal stopped no other message


@pytest.mark.parametrize(
    "setting, option, named",
    [(0, None, "EMAIL_APPENGINE_CONCURRENCY"), ("8", None, "EMAIL_APPENGINE_CONCURRENCY"), (None, -1, "concurrency")],
)
def test_concurrency_must_be_a_whole_number_even_when_silent(reference_server, setting, option, named):
    with (
        override_settings(EMAIL_APPENGINE_PROXY_URL=reference_server.url, EMAIL_APPENGINE_CONCURRENCY=setting),
        pytest.raises(ImproperlyConfigured, match=f"{named} to be a whole number of at least 1"),
    ):
        mail.get_connection(fail_silently=True, concurrency=option)


@pytest.mark.skipif(django.VERSION < (6, 0), reason="Django 5.x passes no alias and ignores unknown options")
def test_django6_alias_accepted_and_unknown_options_rejected(reference_server):
    from django.core.mail import InvalidMailer

    with override_settings(EMAIL_APPENGINE_PROXY_URL=reference_server.url):
        assert GmailBackend(alias="default").alias == "default"
        with pytest.raises(InvalidMailer, match="bogus"):
            GmailBackend(alias="default", bogus=1)


@pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS arrived in Django 6.1")
def test_django61_mailers_options(reference_server):
    mailers = {
        "default": {
            "BACKEND": "appengine_mailer.django_email_backend.GmailBackend",
            "OPTIONS": {
                "proxy_url": reference_server.url,
                "secret_key": KEY.decode(),
                "fix_sender": True,
                "concurrency": 3,
            },
        }
    }
    reference_server.delay = 0.05
    messages = [mail.EmailMessage(f"s{i}", "b", "f@example.com", ["t@example.com"]) for i in range(9)]
    with override_settings(MAILERS=mailers), mail.mailers["default"] as connection:
        assert connection.concurrency == 3
        sent = connection.send_messages(messages)
    assert sent == 9 and all(accepted["fix_sender"] == "true" for accepted in reference_server.accepted)
    assert 1 < max(reference_server.in_flight_seen) <= 3


def test_check_reports_without_sending(proxy):
    from django.core.mail import EmailMessage

    message = EmailMessage("Hi", "Body", "from@example.com", ["to@example.com"], bcc=["hidden@example.com"])
    message.attach("run.exe", b"MZ", "application/octet-stream")
    report = GmailBackend().check(message)
    assert report["would_send"] is False and any(".exe" in problem for problem in report["problems"])
    assert report["recipients"]["bcc"] == ["hidden@example.com"]
    message.attachments = []
    assert GmailBackend().check(message)["would_send"] is True
    assert proxy.sink.received == []
