"""The real `python mailer.py` process in the SDK's SMTP mode, delivering into a real SMTP server."""

from __future__ import annotations

import http.client
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest

from conftest import form, server_env
from test_mailer import make_message


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def message(**headers) -> EmailMessage:
    headers.setdefault("To", "rcpt@example.com")
    return make_message(**headers)


def test_full_message_arrives_as_sent(smtp_server):
    msg = message(
        From="Jürgen Groß <sender@example.com>",
        To="Ann <ann@example.com>, bob@example.com",
        Cc="Cé <cc@example.com>",
        Bcc="secret@example.com",
        Subject="Grüße ☃",
        **{"In-Reply-To": "<prev@example.com>"},
    )
    msg.add_alternative("<p>Hello <b>HTML</b></p>", subtype="html")
    attachment = os.urandom(10 * 1024 * 1024) + b"\r\n\n\r"
    msg.add_attachment(attachment, "application", "pdf", filename="big.pdf")
    status, text = post(smtp_server.url, form(msg.as_bytes()))
    assert (status, text) == (204, "")
    [env] = smtp_server.sink.wait_for(1)
    assert env.mail_from == "sender@example.com"
    assert sorted(env.rcpt_tos) == ["ann@example.com", "bob@example.com", "cc@example.com", "secret@example.com"]
    got = env.message
    assert got["Subject"] == "Grüße ☃"
    assert got["From"].addresses[0].display_name == "Jürgen Groß"
    assert got["Cc"].addresses[0].display_name == "Cé"
    assert got["In-Reply-To"] == "<prev@example.com>"
    assert "Bcc" not in got and b"secret@example.com" not in env.content
    assert "Reply-To" not in got
    assert got["Date"] and got["Message-ID"]
    assert got.get_body(("plain",)).get_content() == "Plain body\n"
    assert "<b>HTML</b>" in got.get_body(("html",)).get_content()
    [part] = list(got.iter_attachments())
    assert part.get_filename() == "big.pdf"
    assert part.get_content() == attachment


def test_latin1_body_and_hundred_recipients(smtp_server):
    to = ", ".join(f"r{i}@example.com" for i in range(100))
    raw = (
        f"From: s@example.com\r\nTo: {to}\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode()
    raw += "Café crème\r\n".encode("latin-1")
    assert post(smtp_server.url, form(raw))[0] == 204
    [env] = smtp_server.sink.wait_for(1)
    assert len(env.rcpt_tos) == 100
    assert env.message.get_body(("plain",)).get_content().strip() == "Café crème"


def test_refusal_sends_nothing(smtp_server):
    status, text = post(smtp_server.url, form(message().as_bytes(), b"wrong"))
    assert status == 400 and "signature" in text
    assert smtp_server.sink.wait_for(1, timeout=0.5) == []


def test_smtp_down_is_503_and_server_keeps_serving(start_server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    env = server_env(
        tmp_path,
        APPENGINE_USE_SMTP_MAIL_SERVICE="true",
        APPENGINE_SMTP_HOST="127.0.0.1",
        APPENGINE_SMTP_PORT=str(dead_port),
        APPENGINE_SMTP_USE_TLS="false",
    )
    server = start_server(env)
    status, text = post(server.url, form(message().as_bytes()))
    assert status == 503 and "retry" in text
    assert post(server.url, b"", timeout=10)[0] == 400


def test_hung_smtp_server_does_not_hang_the_request(start_server, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)  # accepts connections, never says a word
    try:
        env = server_env(
            tmp_path,
            APPENGINE_USE_SMTP_MAIL_SERVICE="true",
            APPENGINE_SMTP_HOST="127.0.0.1",
            APPENGINE_SMTP_PORT=str(listener.getsockname()[1]),
            APPENGINE_SMTP_USE_TLS="false",
            GMAIL_SMTP_TIMEOUT="1",
        )
        server = start_server(env)
        status, _ = post(server.url, form(message().as_bytes()), timeout=30)
        assert status == 503
    finally:
        listener.close()


def test_forty_megabyte_body_gets_413_and_server_keeps_serving(smtp_server):
    parts = urlsplit(smtp_server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", "/")
    conn.putheader("Content-Type", "application/x-www-form-urlencoded")
    conn.putheader("Content-Length", str(40 * 1024 * 1024))
    conn.endheaders()
    try:
        conn.send(b"msg=" + b"a" * (1024 * 1024))  # the server answers without reading the rest
    except (BrokenPipeError, ConnectionResetError):
        pass
    res = conn.getresponse()
    assert res.status == 413 and b"limit" in res.read()
    conn.close()
    assert post(smtp_server.url, form(message().as_bytes()))[0] == 204
    assert len(smtp_server.sink.wait_for(1)) == 1


def test_concurrent_senders_each_message_delivered_once(smtp_server):
    def send(i: int) -> int:
        return post(smtp_server.url, form(message(Subject=f"load {i}").as_bytes()))[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, range(800)))
    assert statuses == [204] * 800
    received = smtp_server.sink.wait_for(800)
    subjects = sorted(env.message["Subject"] for env in received)
    assert subjects == sorted(f"load {i}" for i in range(800))


def test_no_key_exits_with_instructions(tmp_path):
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    for name in ("mailer.py", "gmail.py"):  # a copy with no keys/ folder beside it
        shutil.copy(ROOT / name, tmp_path / name)
    env = server_env(tmp_path)
    del env["GMAIL_SECRET_KEY"]
    result = subprocess.run(
        [sys.executable, str(tmp_path / "mailer.py"), "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78
    assert "GMAIL_SECRET_KEY" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "name, value",
    [
        ("GMAIL_MAX_RECIPIENTS", "lots"),
        ("GMAIL_MAX_RECIPIENTS", "-1"),
        ("GMAIL_MAX_RECIPIENTS", "0.5"),
        ("GMAIL_MAX_RECIPIENTS", "inf"),
        ("GMAIL_SMTP_TIMEOUT", "soon"),
        ("GMAIL_SMTP_TIMEOUT", "nan"),
        ("GMAIL_SMTP_TIMEOUT", "inf"),
    ],
)
def test_bad_number_setting_stops_with_one_line(tmp_path, smtp_sink, name, value):
    import subprocess
    import sys

    from conftest import ROOT

    env = server_env(tmp_path, smtp_sink, **{name: value})
    result = subprocess.run(
        [sys.executable, str(ROOT / "mailer.py"), "--port", "0"], env=env, capture_output=True, text=True, timeout=60
    )
    kind = "a positive whole number" if name == "GMAIL_MAX_RECIPIENTS" else "a positive number"
    assert result.returncode == 78 and result.stderr.strip() == f"mailer.py: {name} must be {kind}, not {value!r}"
