"""appengine_mailer.views.bounce through Django's test client, fed what the proxy forwards."""

from __future__ import annotations

import json
import time

import pytest

django = pytest.importorskip("django")
from django.test import Client, override_settings  # noqa: E402
from django_setup import DJANGO_SECRET  # noqa: E402

import gmail  # noqa: E402
from appengine_mailer.bounce import forward  # noqa: E402
from appengine_mailer.signals import bounce_received  # noqa: E402

REPORT = {
    "event": "bounce",
    "original": {"from": "app@example.com", "to": "gone@example.net", "message_id": "<m@example.com>"},
    "notification": {"text": "550 5.1.1 no such user"},
}


def signed_form(report: dict, key: str = DJANGO_SECRET, timestamp: float | None = None) -> dict:
    msg = json.dumps(report).encode()
    fields = gmail.sign_request(msg, key.encode(), False, timestamp=timestamp, signature_v1=False)
    return {"msg": msg.decode(), "timestamp": fields["timestamp"], "signature_v2": fields["signature_v2"]}


@pytest.fixture
def received():
    seen = []

    def handler(sender, bounce, original, notification, **kwargs):
        seen.append((bounce, original, notification))

    bounce_received.connect(handler)
    yield seen
    bounce_received.disconnect(handler)


def test_a_signed_bounce_sends_the_signal(received):
    response = Client().post("/mail/bounces/", signed_form(REPORT))
    assert response.status_code == 204
    assert received == [(REPORT, REPORT["original"], REPORT["notification"])]


@pytest.mark.parametrize(
    "form, status, text",
    [
        (signed_form(REPORT, key="another-key-entirely"), 403, "does not match"),
        (signed_form(REPORT, timestamp=time.time() - 3600), 403, "s ago"),
        ({"msg": json.dumps(REPORT)}, 403, "no signature_v2"),
        (signed_form({"event": "delivered"}), 400, "not a bounce report"),
    ],
)
def test_anything_else_is_refused_and_no_signal_is_sent(received, form, status, text):
    response = Client().post("/mail/bounces/", form)
    assert response.status_code == status and text in response.content.decode()
    assert received == []


def test_only_post(received):
    assert Client().get("/mail/bounces/").status_code == 405


def test_own_key_setting_is_used(received):
    with override_settings(EMAIL_APPENGINE_SECRET_KEY="mailer-specific-key-0123456789"):
        assert Client().post("/mail/bounces/", signed_form(REPORT)).status_code == 403
        assert Client().post("/mail/bounces/", signed_form(REPORT, "mailer-specific-key-0123456789")).status_code == 204


def test_what_the_proxy_forwards_is_what_the_view_takes(received, live_django):
    forward(REPORT, live_django + "mail/bounces/", DJANGO_SECRET.encode())
    assert [bounce for bounce, _, _ in received] == [REPORT]


@pytest.fixture
def live_django():
    """The test project served for real, so the proxy's own forward() posts to the view."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from django.core.wsgi import get_wsgi_application

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, get_wsgi_application(), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "msg",
    ["[" * 100_000, json.dumps({"event": "bounce", "original": "x", "notification": {}}), "not json"],
)
def test_a_signed_msg_that_is_not_a_report_is_400(received, msg):
    fields = gmail.sign_request(msg.encode(), DJANGO_SECRET.encode(), False, signature_v1=False)
    form = {"msg": msg, "timestamp": fields["timestamp"], "signature_v2": fields["signature_v2"]}
    assert Client().post("/mail/bounces/", form).status_code == 400
    assert received == []


def test_keys_read_from_files_and_rotation(received):
    with override_settings(EMAIL_APPENGINE_SECRET_KEY="key-read-from-a-file-0123\n"):
        assert Client().post("/mail/bounces/", signed_form(REPORT, "key-read-from-a-file-0123")).status_code == 204
    with override_settings(EMAIL_APPENGINE_BOUNCE_KEYS=["old-key-0123456789abcd", "new-key-0123456789abcd"]):
        assert Client().post("/mail/bounces/", signed_form(REPORT, "old-key-0123456789abcd")).status_code == 204


@pytest.mark.parametrize("keys", ["", b"", [""], ["", "real-key-0123456789"], "  "])
def test_verify_request_refuses_blank_keys(keys):
    form = signed_form(REPORT, "")
    with pytest.raises(ValueError, match="blank key"):
        gmail.verify_request(form, keys)
