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
