"""SMTP relay as a first-class delivery path: the real server process against SMTP servers that refuse,
defer, lack STARTTLS or need a trusted certificate; settings checked at start-up."""

from __future__ import annotations

import re
import shutil
import smtplib
import ssl
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appengine_mailer.relay import RelaySMTP
from conftest import KEY, ROOT, Envelope, SMTPSink, form, free_port, server_env
from test_mailer_e2e import message, post


class PickyHandler:
    """An SMTP server's policy: refuses or defers by recipient, sender or subject, keeps what it accepts."""

    def __init__(self, sink: SMTPSink):
        self.sink = sink

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address.startswith("blocked@"):
            return "550 5.7.1 sender not allowed"
        if address.startswith("anonymous@"):
            return "530 5.7.0 Authentication required"
        if address.startswith("huge@"):
            return "552 5.3.4 message size exceeds fixed limit"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local.startswith("refuse"):
            return "550 5.1.1 no such user"
        if local.startswith("defer"):
            return "450 4.2.0 mailbox busy"
        if local.startswith("elsewhere"):
            return "554 5.7.1 Relay access denied"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if b"Subject: reject-data" in envelope.original_content:
            return "554 5.7.1 message looks like spam"
        if b"Subject: defer-data" in envelope.original_content:
            return "451 4.3.0 try again later"
        self.sink.received.append(Envelope(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"


def start_sink(**controller_options):
    from aiosmtpd.controller import Controller

    sink = SMTPSink("127.0.0.1", free_port())
    controller = Controller(PickyHandler(sink), hostname=sink.host, port=sink.port, **controller_options)
    controller.start()
    return sink, controller


@pytest.fixture
def picky(start_server, tmp_path):
    """A real mailer.py relaying (TLS off, as to a local relay) into a picky SMTP server."""
    sink, controller = start_sink()
    server = start_server(server_env(tmp_path, sink, GMAIL_DEFAULT_SENDER="default@example.com"))
    server.sink = sink
    yield server
    controller.stop()


def send(server, **headers) -> tuple[int, str]:
    extra = headers.pop("extra", {})
    return post(server.url, form(message(**headers).as_bytes(), **extra))


def test_every_recipient_refused_is_400_quoting_the_relay(picky):
    status, text = send(picky, To="refuse1@example.com, refuse2@example.com")
    assert status == 400
    assert text.startswith(f"the SMTP relay at 127.0.0.1:{picky.sink.port} refused every recipient: ")
    assert "550 5.1.1 no such user" in text
    assert picky.sink.received == []


def test_one_recipient_refused_of_two_is_sent_to_the_other_and_logged(picky):
    status, _ = send(picky, To="ok@example.com, refuse@example.com")
    assert status == 204
    [envelope] = picky.sink.wait_for(1)
    assert envelope.rcpt_tos == ["ok@example.com"]
    picky.stop()
    log = "".join(picky.log_lines)
    assert "the SMTP relay refused 1 of 2 recipients (550 5.1.1 no such user)" in log


@pytest.mark.parametrize(
    "headers, reply",
    [
        ({"To": "defer@example.com"}, "450 4.2.0 mailbox busy"),
        ({"Subject": "defer-data"}, "451 4.3.0 try again later"),
    ],
)
def test_temporary_refusals_are_503_with_the_reply(picky, headers, reply):
    status, text = send(picky, **headers)
    assert status == 503 and reply in text and "retry later" in text


def test_refused_data_is_400_quoting_the_relay(picky):
    status, text = send(picky, Subject="reject-data")
    assert status == 400
    assert (
        text
        == f"the SMTP relay at 127.0.0.1:{picky.sink.port} refused the message: 554 5.7.1 message looks like spam\n"
    )


def test_refused_sender_is_400_or_falls_back_to_the_default_with_fix_sender(picky):
    status, text = send(picky, From="Blocked <blocked@example.com>")
    assert status == 400 and "refused the sender" in text and "550 5.7.1 sender not allowed" in text
    assert send(picky, From="Blocked <blocked@example.com>", extra={"fix_sender": "true"})[0] == 204
    [envelope] = picky.sink.wait_for(1)
    assert envelope.mail_from == "default@example.com"
    assert envelope.message["Reply-To"] == "Blocked <blocked@example.com>"


@pytest.mark.parametrize(
    "headers, reply",
    [
        ({"From": "anonymous@example.com"}, "530 5.7.0 Authentication required"),
        ({"To": "elsewhere@example.org"}, "554 5.7.1 Relay access denied"),
    ],
)
def test_a_relay_wanting_a_login_is_the_proxys_configuration_so_503(picky, headers, reply):
    status, text = send(picky, extra={"fix_sender": "true"}, **headers)
    assert status == 503 and reply in text and "APPENGINE_SMTP_USER" in text
    assert picky.sink.received == []


def test_a_size_refusal_at_mail_from_is_400_without_trying_the_default_sender(picky):
    status, text = send(picky, From="huge@example.com", extra={"fix_sender": "true"})
    assert status == 400 and text.endswith("refused the message's size: 552 5.3.4 message size exceeds fixed limit\n")
    assert picky.sink.received == []


def test_relay_without_starttls_with_the_default_tls(start_server, tmp_path):
    sink, controller = start_sink()
    try:
        env = server_env(tmp_path, sink)
        del env["APPENGINE_SMTP_USE_TLS"]  # the SDK's default: STARTTLS
        server = start_server(env)
        status, text = post(server.url, form(message().as_bytes()))
        assert status == 503
        assert text == (
            f"the SMTP server at 127.0.0.1:{sink.port} does not offer STARTTLS; set APPENGINE_SMTP_USE_TLS=false\n"
        )
    finally:
        controller.stop()


@pytest.fixture
def certificate(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_starttls_checks_the_relays_certificate(start_server, tmp_path, certificate):
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink, controller = start_sink(tls_context=context, require_starttls=True)
    try:
        env = server_env(tmp_path, sink, APPENGINE_SMTP_USE_TLS="true")
        untrusted = start_server(env)
        status, text = post(untrusted.url, form(message().as_bytes()))
        assert status == 503 and "could not be verified" in text and "GMAIL_SMTP_CA_FILE" in text
        trusted = start_server({**env, "GMAIL_SMTP_CA_FILE": str(cert)})
        assert post(trusted.url, form(message().as_bytes()))[0] == 204
        assert len(sink.wait_for(1)) == 1
    finally:
        controller.stop()


# --------------------------------------------------------------------------- start-up checks


@pytest.mark.parametrize(
    "settings, lines",
    [
        ({"APPENGINE_SMTP_HOST": ""}, ["APPENGINE_USE_SMTP_MAIL_SERVICE=true needs APPENGINE_SMTP_HOST"]),
        ({"APPENGINE_SMTP_USE_TLS": "yes"}, ["APPENGINE_SMTP_USE_TLS must be true or false, not 'yes'"]),
        ({"APPENGINE_SMTP_PORT": "smtp"}, ["APPENGINE_SMTP_PORT must be a port number, not 'smtp'"]),
        ({"APPENGINE_SMTP_PORT": ""}, ["APPENGINE_SMTP_PORT must be a port number, not ''"]),
        ({"APPENGINE_SMTP_USE_TLS": "true "}, ["APPENGINE_SMTP_USE_TLS must be true or false, not 'true '"]),
        (
            {"APPENGINE_SMTP_USER": "apikey", "APPENGINE_SMTP_HOST": ""},
            ["needs APPENGINE_SMTP_HOST", "APPENGINE_SMTP_USER is set but APPENGINE_SMTP_PASSWORD is not"],
        ),
        ({"APPENGINE_USE_SMTP_MAIL_SERVICE": "True"}, ["must be true or false, not 'True'"]),
        ({"GMAIL_SMTP_CA_FILE": "/nonexistent.pem"}, ["GMAIL_SMTP_CA_FILE '/nonexistent.pem' is not a readable"]),
    ],
)
def test_bad_smtp_settings_stop_the_server_with_one_line_each(tmp_path, smtp_sink, settings, lines):
    env = server_env(tmp_path, smtp_sink, **settings)
    result = subprocess.run(
        [sys.executable, str(ROOT / "mailer.py"), "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(lines) and "Traceback" not in result.stderr
    for line, expected in zip(errors, lines):
        assert line.startswith("mailer.py: ") and expected in line


def test_relay_login_with_the_password_in_keys(deployment, start_server, tmp_path):
    from aiosmtpd.smtp import AuthResult

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (auth_data.login, auth_data.password) == (b"apikey", b"s3cret-relay-password")
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself

    sink, controller = start_sink(authenticator=authenticator, auth_require_tls=False, auth_required=True)
    try:
        env = server_env(tmp_path, sink, APPENGINE_SMTP_USER="apikey")  # the password comes from keys/
        del env["GMAIL_SECRET_KEY"]
        (deployment / "keys").mkdir()
        (deployment / "keys" / "GMAIL_SECRET_KEY").write_text(KEY.decode() + "\n")
        password_file = deployment / "keys" / "APPENGINE_SMTP_PASSWORD"
        password_file.write_text("wrong\n")
        refused = start_server(env, cwd=deployment, script=deployment / "mailer.py")
        status, text = post(refused.url, form(message().as_bytes()))
        assert status == 503 and "refused the proxy's credentials (APPENGINE_SMTP_USER" in text
        assert "wrong" not in text
        password_file.write_text("s3cret-relay-password\n")
        accepted = start_server(env, cwd=deployment, script=deployment / "mailer.py")
        assert post(accepted.url, form(message().as_bytes()))[0] == 204
        assert len(sink.wait_for(1)) == 1
        accepted.stop()
        assert "s3cret-relay-password" not in "".join(accepted.log_lines + refused.log_lines)
    finally:
        controller.stop()


# --------------------------------------------------------------------------- DATA streamed


class _Recorder(RelaySMTP):
    """RelaySMTP with tiny slices and no network: records what DATA sends."""

    SLICE = 7

    def __init__(self):
        super().__init__()
        self.sent: list[bytes] = []
        self.replies = [(354, b"go ahead"), (250, b"ok")]

    def putcmd(self, cmd, args=""):
        pass

    def getreply(self):
        return self.replies.pop(0)

    def send(self, s):
        self.sent.append(bytes(s))


DATA_PIECES = [b"abc", b".", b"..x", b"\r\n", b"\n", b"x" * 20, b"From "]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(DATA_PIECES), max_size=20).map(b"".join))
def test_streamed_data_is_what_smtplib_sends(message):
    recorder = _Recorder()
    assert recorder.data(message) == (250, b"ok")
    quoted = re.sub(rb"(?m)^\.", b"..", message)  # smtplib.SMTP.data, whole
    quoted = quoted if quoted[-2:] == b"\r\n" else quoted + b"\r\n"
    assert b"".join(recorder.sent) == quoted + b".\r\n"


def test_refused_data_raises_as_smtplib_does():
    recorder = _Recorder()
    recorder.replies = [(554, b"no")]
    try:
        recorder.data(b"x\r\n")
    except smtplib.SMTPDataError as error:
        assert error.smtp_code == 554
    else:
        raise AssertionError("no SMTPDataError")
