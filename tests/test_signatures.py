"""Signature v2: timestamped HMAC-SHA256, a replay window, and idempotent retries."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlencode

import pytest
import webtest
from google.appengine.api.memcache import memcache_stub
from google.appengine.runtime import apiproxy_errors

import gmail
import mailer
from appengine_mailer import signatures
from conftest import KEY, OTHER_KEY, server_env, stub_for
from test_mailer import make_message

NOW = 1_800_000_000
MSG = make_message().as_bytes()


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def v2_form(msg: bytes = MSG, key: bytes = KEY, timestamp=NOW, fix_sender=False, v1=False, **override) -> bytes:
    fields = {
        "msg": msg,
        "timestamp": str(timestamp),
        "signature_v2": gmail.sign_v2(key, str(timestamp), fix_sender, msg),
    }
    if fix_sender:
        fields["fix_sender"] = "true"
    if v1:
        fields["signature"] = gmail.sign_v1(key, msg)
    fields.update(override)
    return urlencode(fields).encode()


def v1_form(msg: bytes = MSG, key: bytes = KEY) -> bytes:
    return urlencode({"msg": msg, "signature": gmail.sign_v1(key, msg)}).encode()


def make(clock=None, **options):
    return webtest.TestApp(
        mailer.make_app([KEY, OTHER_KEY], default_sender="default@example.com", clock=clock or Clock(), **options),
        lint=True,
    )


def post(app, body, status="*"):
    return app.post("/", body, content_type="application/x-www-form-urlencoded", status=status)


CASES = [
    # (id, app options, body, status, reason in body, messages sent)
    ("v1 only, accepted by default", {}, v1_form(), 204, "", 1),
    ("v1 only, refused when v2 required", {"require_signature_v2": True}, v1_form(), 400, "requires signature_v2", 0),
    ("v2 valid", {}, v2_form(), 204, "", 1),
    ("v2 valid when required", {"require_signature_v2": True}, v2_form(), 204, "", 1),
    ("v2 and v1 together", {"require_signature_v2": True}, v2_form(v1=True), 204, "", 1),
    ("v2 with the second key", {}, v2_form(key=OTHER_KEY), 204, "", 1),
    ("v2 wrong key", {}, v2_form(key=b"wrong"), 400, "signature does not match", 0),
    (
        "v2 wrong key, valid v1 beside it",
        {},
        v2_form(key=b"wrong", signature=gmail.sign_v1(KEY, MSG)),
        400,
        "signature does not match",
        0,
    ),
    ("v2 fix_sender added", {}, v2_form(fix_sender=False) + b"&fix_sender=true", 400, "signature does not match", 0),
    (
        "v2 fix_sender removed",
        {},
        v2_form(fix_sender=True).replace(b"&fix_sender=true", b""),
        400,
        "signature does not match",
        0,
    ),
    (
        "v2 expired",
        {},
        v2_form(timestamp=NOW - 301),
        400,
        "request expired: signed at 1799999699, server time is 1800000000",
        0,
    ),
    ("v2 from the future", {}, v2_form(timestamp=NOW + 301), 400, "from the future", 0),
    ("v2 at the window's edge", {}, v2_form(timestamp=NOW - 300), 204, "", 1),
    ("v2 timestamp not a number", {}, v2_form(timestamp="soon"), 400, "'soon' is not a whole number", 0),
    ("v2 timestamp negative", {}, v2_form(timestamp="-5"), 400, "not a whole number", 0),
    ("v2 timestamp missing", {}, v2_form(timestamp=""), 400, "not a whole number", 0),
]


@pytest.mark.parametrize("options, body, status, reason, sent", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_signature_table(mail_stub, options, body, status, reason, sent):
    res = post(make(**options), body)
    assert res.status_int == status, res.text
    assert reason in res.text
    assert len(mail_stub.sent) == sent


MARKED = [
    # (id, body, the ERROR_HEADER value: refusals of the client's setup are marked, others are not)
    ("v1 wrong key", v1_form(key=b"wrong"), gmail.BAD_SIGNATURE),
    ("v2 wrong key", v2_form(key=b"wrong"), gmail.BAD_SIGNATURE),
    ("v2 fix_sender tampered", v2_form() + b"&fix_sender=true", gmail.BAD_SIGNATURE),
    ("v2 expired", v2_form(timestamp=NOW - 301), gmail.CLOCK_SKEW),
    ("v2 from the future", v2_form(timestamp=NOW + 301), gmail.CLOCK_SKEW),
    ("timestamp not a number", v2_form(timestamp="soon"), None),
    ("missing signature", urlencode({"msg": MSG}).encode(), None),
    ("no recipients", v2_form(msg=make_message(To="").as_bytes()), None),
]


@pytest.mark.parametrize("body, marker", [c[1:] for c in MARKED], ids=[c[0] for c in MARKED])
def test_refusals_of_the_setup_are_marked_for_clients(mail_stub, body, marker):
    res = post(make(), body, 400)
    assert res.headers.get(gmail.ERROR_HEADER) == marker
    assert mail_stub.sent == []


@pytest.mark.parametrize(
    "later, status, reason",
    [(200, 204, ""), (301, 400, "request expired")],
    ids=["within the window", "after the window"],
)
def test_replay_is_never_sent_again(mail_stub, later, status, reason):
    clock = Clock()
    app = make(clock)
    body = v2_form()
    post(app, body, 204)
    clock.now += later
    assert reason in post(app, body, status).text
    assert len(mail_stub.sent) == 1


def test_failed_send_is_not_remembered(mail_stub):
    app = make()
    body = v2_form()
    mail_stub.fail_with = apiproxy_errors.OverQuotaError("quota")
    post(app, body, 503)
    mail_stub.fail_with = None
    post(app, body, 204)
    post(app, body, 204)
    assert len(mail_stub.sent) == 1


def test_refused_message_is_not_remembered(mail_stub):
    app = make()
    no_recipients = make_message(To="").as_bytes()
    post(app, v2_form(no_recipients), 400)
    assert "no recipients" in post(app, v2_form(no_recipients), 400).text


def test_same_request_in_flight_gets_503_retry_soon(mail_stub):
    release = threading.Event()
    mail_stub.fail_with = lambda request: release.wait(10) and None
    app = make()
    body = v2_form()
    first = threading.Thread(target=post, args=(app, body, 204))
    first.start()
    time.sleep(0.2)
    second = post(app, body, 503)
    release.set()
    first.join()
    assert second.headers["Retry-After"] == "1" and "being sent right now" in second.text
    assert len(mail_stub.sent) == 1


def test_health_shows_v2_requirement():
    assert make(require_signature_v2=True).get("/").json["signature_v2_required"] is True
    assert make().get("/").json["signature_v2_required"] is False


def test_require_v2_from_environment(monkeypatch, tmp_path):
    env = {"GMAIL_SECRET_KEY": KEY.decode(), "GMAIL_REQUIRE_SIGNATURE_V2": "true", "GMAIL_OUTBOX": str(tmp_path)}
    assert mailer.app_from_environment(env, root=tmp_path).require_signature_v2 is True


# --------------------------------------------------------------------------- stores


def test_in_process_store_is_bounded():
    store = signatures.InProcessReplayStore(max_entries=100)
    for i in range(10_000):
        assert store.claim(f"key{i}", 300) is None
        store.mark_sent(f"key{i}", 300)
    assert len(store) == 100
    assert store.claim("key9999", 300) == "sent" and store.claim("key0", 300) is None


def test_in_process_store_forgets_after_ttl():
    clock = Clock(0)
    store = signatures.InProcessReplayStore(clock=clock)
    store.claim("k", 10)
    store.mark_sent("k", 10)
    clock.now = 9
    assert store.claim("k", 10) == "sent"
    clock.now = 11
    assert store.claim("k", 10) is None


@pytest.fixture
def memcache():
    clock = Clock()
    with stub_for("memcache", memcache_stub.MemcacheServiceStub(gettime=clock)):
        yield clock


def test_memcache_store_against_sdk_stub(memcache):
    store = signatures.MemcacheReplayStore()
    assert store.claim("sig", 300) is None
    assert store.claim("sig", 300) == "pending"
    store.release("sig")
    assert store.claim("sig", 300) is None
    store.mark_sent("sig", 300)
    assert store.claim("sig", 300) == "sent"
    memcache.now += 301
    assert store.claim("sig", 300) is None


def test_app_with_memcache_store_sends_once(mail_stub, memcache):
    clock = Clock()
    app = make(clock, replay_store=signatures.MemcacheReplayStore())
    body = v2_form()
    post(app, body, 204)
    post(app, body, 204)
    assert len(mail_stub.sent) == 1


# --------------------------------------------------------------------------- end to end


def http_post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=60) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_replays_against_real_server(smtp_server):
    within = v2_form(timestamp=int(time.time()))
    assert http_post(smtp_server.url, within)[0] == 204
    assert http_post(smtp_server.url, within)[0] == 204
    assert len(smtp_server.sink.wait_for(1)) == 1

    almost_expired = v2_form(make_message(Subject="edge").as_bytes(), timestamp=int(time.time()) - 294)
    assert http_post(smtp_server.url, almost_expired)[0] == 204
    time.sleep(7)
    status, text = http_post(smtp_server.url, almost_expired)
    assert status == 400 and "request expired" in text
    received = smtp_server.sink.wait_for(3, timeout=1)
    assert sorted(env.message["Subject"] for env in received) == ["Hello", "edge"]


def test_v2_only_client_against_server_requiring_v2(start_server, smtp_sink, tmp_path):
    server = start_server(server_env(tmp_path, smtp_sink, GMAIL_REQUIRE_SIGNATURE_V2="true"))
    assert gmail.GmailProxy(KEY, server.url, signature_v1=False).send_mail(MSG)
    assert len(smtp_sink.wait_for(1)) == 1
    status, text = http_post(server.url, v1_form())
    assert status == 400 and "requires signature_v2" in text


# --------------------------------------------------------------------------- client


def test_client_sends_v2_and_v1_and_old_servers_accept(reference_server):
    assert gmail.GmailProxy(KEY, reference_server.url).send_mail(MSG)
    [accepted] = reference_server.accepted
    stamp = accepted["timestamp"]
    assert abs(int(stamp) - time.time()) < 60
    assert accepted["signature_v2"] == gmail.sign_v2(KEY, stamp, False, MSG)


def test_client_can_turn_v1_off(reference_server):
    with pytest.raises(gmail.MessageSendingFailure, match="missing parameters"):
        gmail.GmailProxy(KEY, reference_server.url, signature_v1=False).send_mail(MSG)


def test_client_retries_once_after_503_with_same_request(reference_server):
    reference_server.force_status = 503
    reference_server.force_times = 1
    reference_server.retry_after = "0.2"
    started = time.monotonic()
    assert gmail.GmailProxy(KEY, reference_server.url).send_mail(MSG)
    assert time.monotonic() - started >= 0.2
    assert reference_server.requests == 2 and len(set(reference_server.bodies)) == 1


def test_client_gives_up_after_second_503_and_caps_retry_after(reference_server):
    reference_server.force_status, reference_server.retry_after = 503, "3600"
    started = time.monotonic()
    with pytest.raises(gmail.MessageSendingFailure) as caught:
        gmail.GmailProxy(KEY, reference_server.url).send_mail(MSG)
    assert caught.value.status == 503 and reference_server.requests == 2
    assert time.monotonic() - started < gmail.MAX_RETRY_AFTER_SECONDS + 2


def test_client_retries_once_after_dropped_connection(reference_server):
    reference_server.drop_times = 1
    assert gmail.GmailProxy(KEY, reference_server.url).send_mail(MSG)
    assert reference_server.requests == 2 and len(reference_server.accepted) == 1


def test_cli_exit_code_unchanged_after_retry(reference_server, tmp_path):
    reference_server.force_status, reference_server.retry_after = 503, "0"
    code = gmail.main(
        ["--url", reference_server.url, "-i"],
        stdin=__import__("io").BytesIO(MSG),
        environ={"GMAIL_SECRET_KEY": KEY.decode()},
    )
    assert code == 75 and reference_server.requests == 2


def test_readme_worked_example_matches_the_code():
    import re

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    documented = re.search(r"`signature_v2` is\s+`([0-9a-f]{64})`", readme).group(1)
    assert gmail.sign_v2(b"secret", "1700000000", False, b"To: a@example.com\n\nhi\n") == documented
    assert len(gmail.signed_bytes_v2("1700000000", False, b"To: a@example.com\n\nhi\n")) == 59
    assert "the 59 bytes" in readme
