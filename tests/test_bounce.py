"""Bounce notifications: posted as App Engine posts them, forwarded signed, verified by the receiver."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

import gmail
from conftest import KEY, OTHER_KEY, server_env

ORIGINAL = EmailMessage()
ORIGINAL["From"] = "app@example.com"
ORIGINAL["To"] = "gone@example.net"
ORIGINAL["Subject"] = "Your invoice"
ORIGINAL["Message-ID"] = "<invoice-42@example.com>"
ORIGINAL.set_content("SECRET-INVOICE-BODY\n")


def bounce_form(boundary: str = "bounce-boundary") -> tuple[bytes, str]:
    """A multipart/form-data POST as App Engine sends to /_ah/bounce."""
    fields = {
        "original-from": "app@example.com",
        "original-to": "gone@example.net",
        "original-subject": "Your invoice",
        "original-text": "SECRET-INVOICE-BODY",
        "notification-from": "MAILER-DAEMON@google.com",
        "notification-to": "app@example.com",
        "notification-subject": "Delivery Status Notification (Failure)",
        "notification-text": "550 5.1.1 The email account that you tried to reach does not exist.",
        "raw-message": ORIGINAL.as_string(),
    }
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_bounce(url: str) -> tuple[int, str]:
    body, content_type = bounce_form()
    request = urllib.request.Request(url + "_ah/bounce", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Receiver:
    """The application's bounce endpoint: verifies each request with gmail.verify_request."""

    def __init__(self, keys, status: int = 204):
        receiver = self
        self.bounces: list[dict] = []
        self.refused: list[str] = []
        self.status = status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                form = parse_qs(self.rfile.read(length).decode("ascii"))
                try:
                    receiver.bounces.append(json.loads(gmail.verify_request(form, keys)))
                    code = receiver.status
                except gmail.RequestNotVerified as err:
                    receiver.refused.append(str(err))
                    code = 403
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/bounces?token=t0ken"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    started = []

    def start(keys=KEY, status=204):
        started.append(Receiver(keys, status))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def on_app_engine(tmp_path, **extra) -> dict:
    """The real server as it runs on App Engine (GAE_ENV), where login: admin guards /_ah/bounce."""
    return server_env(tmp_path, GAE_ENV="standard", **extra)


def test_bounce_is_forwarded_signed_with_what_the_sender_needs(start_server, receiver, tmp_path):
    app = receiver()
    server = start_server(on_app_engine(tmp_path, GMAIL_BOUNCE_URL=app.url))
    assert post_bounce(server.url) == (204, "")
    [bounce] = app.bounces
    assert bounce["event"] == "bounce"
    assert bounce["original"]["from"] == "app@example.com" and bounce["original"]["to"] == "gone@example.net"
    assert bounce["original"]["subject"] == "Your invoice"
    assert bounce["original"]["message_id"] == "<invoice-42@example.com>"
    assert "550 5.1.1" in bounce["notification"]["text"]
    server.stop()
    log = "".join(server.log_lines)
    assert "invoice-42@example.com" in log and "t0ken" not in log and "SECRET-INVOICE-BODY" not in log


def test_a_receiver_with_another_key_refuses_and_app_engine_is_asked_to_retry(start_server, receiver, tmp_path):
    app = receiver(keys=OTHER_KEY)
    server = start_server(on_app_engine(tmp_path, GMAIL_BOUNCE_URL=app.url))
    status, text = post_bounce(server.url)
    assert status == 503 and "could not be forwarded to http://127.0.0.1" in text and "t0ken" not in text
    assert app.bounces == [] and app.refused == ["the signature does not match under any of the keys"]


def test_receiver_down_is_503_so_app_engine_retries(start_server, receiver, tmp_path):
    app = receiver()
    app.stop()
    server = start_server(on_app_engine(tmp_path, GMAIL_BOUNCE_URL=app.url))
    assert post_bounce(server.url)[0] == 503


def test_without_a_url_the_bounce_is_logged(start_server, tmp_path):
    server = start_server(on_app_engine(tmp_path))
    assert post_bounce(server.url)[0] == 204
    server.stop()
    assert "GMAIL_BOUNCE_URL is not set: logged only" in "".join(server.log_lines)


def test_off_app_engine_nobody_may_post_bounces(start_server, receiver, tmp_path):
    app = receiver()
    server = start_server(server_env(tmp_path, GMAIL_BOUNCE_URL=app.url))
    status, text = post_bounce(server.url)
    assert status == 403 and "only on App Engine" in text
    assert app.bounces == []


def test_app_yaml_lets_only_app_engine_post_bounces():
    from google.appengine.api import appinfo

    from conftest import ROOT

    with open(ROOT / "app.yaml") as f:
        info = appinfo.LoadSingleAppInfo(f)
    assert "mail_bounce" in info.inbound_services
    [handler] = [h for h in info.handlers if h.url == "/_ah/bounce"]
    assert handler.login == "admin" and info.handlers.index(handler) == 0


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"signature_v2": "0" * 64}, "does not match"),
        ({"timestamp": "1000"}, "s ago"),
        ({"msg": '{"event": "bounce", "forged": true}'}, "does not match"),
        ({"signature_v2": ""}, "no msg or no signature_v2"),
    ],
)
def test_verify_request_refuses_what_the_proxy_did_not_sign(change, reason):
    msg = b'{"event": "bounce"}'
    form = {"msg": msg.decode(), **gmail.sign_request(msg, KEY, False, signature_v1=False)}
    del form["fix_sender"], form["signature"]
    assert gmail.verify_request(form, [OTHER_KEY, KEY]) == msg
    with pytest.raises(gmail.RequestNotVerified, match=reason):
        gmail.verify_request({**form, **change}, KEY)


def test_the_receivers_query_token_is_sent_and_never_shown(start_server, tmp_path):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            self.send_response(204 if "token=t0ken" in self.path else 403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_port}/bounces?token=t0ken"
        server = start_server(on_app_engine(tmp_path, GMAIL_BOUNCE_URL=url))
        assert post_bounce(server.url) == (204, "")
        assert seen == ["/bounces?token=t0ken"]
        server.stop()
        assert "t0ken" not in "".join(server.log_lines)
    finally:
        receiver.shutdown()
        receiver.server_close()


@pytest.mark.parametrize(
    "url, problem",
    [
        ("https://user:s3cret@example.com/bounces", "must not hold a user or password"),
        ("ftp://example.com/x?token=s3cret", "must hold http:// or https:// URLs"),
        ("https://example.com/a?tags=a,b&token=s3cret", "must be one URL"),
        ("https://example.com/bounces/\u00e9?token=s3cret", "ASCII"),
    ],
)
def test_a_bad_bounce_url_stops_the_server_with_one_line_without_its_secrets(tmp_path, url, problem):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [sys.executable, str(ROOT / "mailer.py"), "--port", "0"],
        env=on_app_engine(tmp_path, GMAIL_BOUNCE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78 and problem in result.stderr
    assert "s3cret" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def bounce_app(monkeypatch, mail_stub):
    import webtest

    import mailer

    monkeypatch.setenv("GAE_ENV", "standard")
    return webtest.TestApp(mailer.make_app([KEY]))


@pytest.mark.parametrize("raw_path", ["/_ah/%62ounce", "/_ah%2Fbounce", "/%5Fah/bounce"])
def test_only_the_spelling_app_yaml_guards_is_a_bounce(monkeypatch, mail_stub, raw_path):
    body, content_type = bounce_form()
    res = bounce_app(monkeypatch, mail_stub).post(
        "/_ah/bounce", body, content_type=content_type, extra_environ={"RAW_URI": raw_path}, status=404
    )
    assert "not found" in res.text


@pytest.mark.parametrize(
    "body",
    [
        b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % n for n in range(5000))
        + b"--b--\r\n",
        (
            b'--b\r\nContent-Disposition: form-data; name="raw-message"\r\n'
            + b"Content-Type: multipart/mixed; boundary=n\r\n\r\n--n\r\n" * 3000
        ),
    ],
    ids=["many parts", "parts inside parts"],
)
def test_hostile_forms_are_400_not_500(monkeypatch, mail_stub, body):
    res = bounce_app(monkeypatch, mail_stub).post(
        "/_ah/bounce", body, content_type="multipart/form-data; boundary=b", status="*"
    )
    assert res.status_int in (204, 400), res.text
