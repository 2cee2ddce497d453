"""GmailProxy.send_many, and the spool's flush, over several connections at once: real servers, real processes."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

import pytest

import gmail
from conftest import KEY, ROOT, free_port, server_env
from reference_server import ReferenceServer


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/"


def message(subject: str, to: str = "user@example.com") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", to, subject
    msg.set_content("a notification\n")
    return msg.as_bytes()


def accepted_subjects(server: ReferenceServer) -> collections.Counter:
    return collections.Counter(message_from_bytes(a["msg"])["Subject"] for a in server.accepted)


def queue(spool_dir: Path, count: int) -> None:
    """Queue messages as an outage would (one connection attempt, then the rest queued without trying)."""
    with gmail.GmailProxy(KEY, dead_url(), queue_dir=str(spool_dir)) as proxy:
        assert all(outcome.queued for outcome in proxy.send_many([message(f"queued {i}") for i in range(count)]))


def flush(spool_dir: Path, url: str, *args: str, wait: bool = True):
    env = {"PATH": "/usr/bin:/bin", "GMAIL_PROXY_URL": url, "GMAIL_SECRET_KEY": KEY.decode()}
    command = [sys.executable, "-I", str(ROOT / "gmail.py"), "--flush", str(spool_dir), *args]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, env=env, capture_output=True, timeout=120)


def entries(spool_dir: Path) -> list:
    return sorted(p.name for p in (spool_dir / "new").iterdir())


# --------------------------------------------------------------------------- outcomes


def test_outcomes_in_order_with_accepted_and_refused_messages(reference_server):
    reference_server.delay = 0.05
    reference_server.force_status, reference_server.force_reason = 400, "no such recipient"
    reference_server.force_if = b"refuse-me"
    subjects = [f"refuse-me {i}" if i % 3 == 1 else f"ok {i}" for i in range(18)]
    with gmail.GmailProxy(KEY, reference_server.url, fail_silently=True) as proxy:
        outcomes = proxy.send_many([message(s) for s in subjects], concurrency=4)
    assert [bool(o) for o in outcomes] == [not s.startswith("refuse") for s in subjects]
    assert [o.sent for o in outcomes] == [bool(o) for o in outcomes] and not any(o.queued for o in outcomes)
    for subject, outcome in zip(subjects, outcomes):
        if subject.startswith("refuse"):
            assert outcome.failure.status == 400 and outcome.failure.reason == "no such recipient"
        else:
            assert outcome == gmail.Outcome(True)
    assert accepted_subjects(reference_server) == {s: 1 for s in subjects if s.startswith("ok")}
    assert 1 < max(reference_server.in_flight_seen) <= 4


def test_without_fail_silently_the_first_failure_is_raised_after_every_message(reference_server):
    reference_server.force_status, reference_server.force_if = 400, b"refuse-me"
    subjects = ["ok 0", "refuse-me 1", "ok 2", "refuse-me 3", "ok 4"]
    with pytest.raises(gmail.MessageSendingFailure) as caught, gmail.GmailProxy(KEY, reference_server.url) as proxy:
        proxy.send_many([message(s) for s in subjects], concurrency=3)
    outcomes = caught.value.outcomes
    assert [o.sent for o in outcomes] == [True, False, True, False, True]
    assert caught.value is outcomes[1].failure and outcomes[3].failure is not outcomes[1].failure
    assert accepted_subjects(reference_server) == {"ok 0": 1, "ok 2": 1, "ok 4": 1}  # the rest still went


def test_concurrency_is_checked_and_a_message_over_the_limit_is_refused_alone(reference_server):
    proxy = gmail.GmailProxy(KEY, reference_server.url, fail_silently=True)
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(gmail.ConfigurationError, match="concurrency must be a whole number of at least 1"):
            proxy.send_many([message("x")], concurrency=bad)
    huge = b"To: a@example.com\n\n" + b"x" * gmail.MAX_REQUEST_BYTES
    outcomes = proxy.send_many([message("before"), huge, message("after")])
    assert [o.sent for o in outcomes] == [True, False, True] and outcomes[1].failure.status == 413
    assert reference_server.requests == 2 and proxy.send_many([]) == []


# --------------------------------------------------------------------------- connections


def test_up_to_n_connections_kept_alive_across_batches(reference_server):
    reference_server.delay = 0.05
    with gmail.GmailProxy(KEY, reference_server.url) as proxy:
        assert all(proxy.send_many([message(f"first {i}") for i in range(16)], concurrency=4))
        assert all(proxy.send_many([message(f"second {i}") for i in range(16)], concurrency=4))
        assert proxy.send_mail(message("alone"))
    assert 1 < max(reference_server.in_flight_seen) <= 4 and reference_server.connections <= 4
    assert len(reference_server.accepted) == 33 and reference_server.requests == 33


def test_exactly_once_through_the_real_proxy_with_concurrency(smtp_server):
    smtp_server.sink.delay = 0.02
    subjects = [f"notice {i}" for i in range(40)]
    with gmail.GmailProxy(KEY, smtp_server.url) as proxy:
        outcomes = proxy.send_many([message(s, f"user{i}@example.com") for i, s in enumerate(subjects)], 8)
    assert all(o.sent for o in outcomes)
    received = smtp_server.sink.wait_for(40)
    time.sleep(0.3)
    assert collections.Counter(env.message["Subject"] for env in smtp_server.sink.received) == {s: 1 for s in subjects}
    assert sorted(env.rcpt_tos[0] for env in received) == sorted(f"user{i}@example.com" for i in range(40))


# --------------------------------------------------------------------------- an unavailable proxy, failover, the spool


@pytest.mark.parametrize(
    "status, retry_after", [(503, "0"), (429, "60"), (502, None)], ids=["503", "429 for a minute", "502"]
)
def test_an_unavailable_proxy_gets_one_message_not_one_per_connection(reference_server, tmp_path, status, retry_after):
    reference_server.force_status, reference_server.retry_after = status, retry_after
    spool_dir = tmp_path / "spool"
    subjects = [f"m{i}" for i in range(10)]
    with gmail.GmailProxy(KEY, reference_server.url, queue_dir=str(spool_dir)) as proxy:
        outcomes = proxy.send_many([message(s) for s in subjects], concurrency=8)
    assert reference_server.requests == (2 if status == 503 else 1)  # a 503 is retried once, unchanged
    assert all(o.queued and not o.sent and o.failure.status == status for o in outcomes)
    assert len({id(o.failure) for o in outcomes}) == 1  # the rest were not tried: the same reason
    queued = [message_from_bytes((spool_dir / "new" / n).read_bytes().partition(b"\n")[2]) for n in entries(spool_dir)]
    assert [m["Subject"] for m in queued] == subjects  # queued in the order given: oldest first


def test_failover_inside_a_batch(reference_server):
    second = ReferenceServer(KEY)
    try:
        reference_server.force_status, reference_server.retry_after = 503, "0"
        with gmail.GmailProxy(KEY, f"{reference_server.url} {second.url}") as proxy:
            assert all(proxy.send_many([message(f"m{i}") for i in range(20)], concurrency=4))
            assert proxy.send_mail(message("next"))  # the URL that worked is tried first next time
        assert reference_server.requests == 2 and len(second.accepted) == 21
    finally:
        second.stop()


def test_spool_queueing_inside_a_batch(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    reference_server.force_status, reference_server.force_if = 500, b"poison"  # this message's own failure
    subjects = ["ok 0", "poison 1", "ok 2", "ok 3", "poison 4", "ok 5"]
    with gmail.GmailProxy(KEY, reference_server.url, queue_dir=str(spool_dir)) as proxy:
        outcomes = proxy.send_many([message(s) for s in subjects], concurrency=3)
    assert all(outcomes) and [o.sent for o in outcomes] == [not s.startswith("poison") for s in subjects]
    assert [o.queued for o in outcomes if o.queued] == entries(spool_dir)
    assert all(o.failure.status == 500 for o in outcomes if o.queued)
    assert accepted_subjects(reference_server) == {"ok 0": 1, "ok 2": 1, "ok 3": 1, "ok 5": 1}


# --------------------------------------------------------------------------- back-pressure


@pytest.mark.parametrize("busy_status", [429, 503])
def test_back_pressure_lowers_the_concurrency_for_the_rest_of_the_batch(reference_server, busy_status):
    reference_server.delay, reference_server.busy_limit = 0.05, 2  # it takes two requests at once
    reference_server.busy_status, reference_server.retry_after = busy_status, "0.1"
    subjects = [f"m{i}" for i in range(40)]
    with gmail.GmailProxy(KEY, reference_server.url) as proxy:
        outcomes = proxy.send_many([message(s) for s in subjects], concurrency=8)
    assert all(o.sent for o in outcomes)
    assert accepted_subjects(reference_server) == {s: 1 for s in subjects}
    busy = reference_server.answered.count(busy_status)
    assert 0 < busy <= 2 * (8 + 4)  # halved per wave, never back up (a 503 is retried once by itself)
    assert max(reference_server.in_flight_seen) > 2 and max(reference_server.in_flight_seen[-20:]) <= 2


# --------------------------------------------------------------------------- the spool's flush


def test_flush_with_concurrency_stops_early_on_503_and_sends_nothing_twice(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 30)
    reference_server.delay, reference_server.force_after = 0.02, 10  # ten go through, then the proxy is down
    reference_server.force_status, reference_server.retry_after = 503, "0"
    result = flush(spool_dir, reference_server.url, "--concurrency", "4")
    assert result.returncode == 0 and b"sent 10, failed 0, still queued 20" in result.stdout, result.stderr
    assert reference_server.requests <= 10 + 2 * (4 + 2 + 1)  # stopped early: not one try per message
    assert max(accepted_subjects(reference_server).values()) == 1 and len(entries(spool_dir)) == 20
    tried = reference_server.requests
    assert flush(spool_dir, reference_server.url, "--concurrency", "4").returncode == 0
    assert reference_server.requests == tried  # the next flush waits for the back-off


def test_flush_under_back_pressure_delivers_everything_once(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 30)
    reference_server.delay, reference_server.busy_limit, reference_server.retry_after = 0.03, 2, "0"
    result = flush(spool_dir, reference_server.url, "--concurrency", "8")
    assert result.returncode == 0 and b"sent 30, failed 0, still queued 0" in result.stdout, result.stderr
    assert accepted_subjects(reference_server) == {f"queued {i}": 1 for i in range(30)}
    assert entries(spool_dir) == [] and reference_server.answered.count(429) <= 8 + 4


@pytest.mark.parametrize("concurrency", ["1", "8"])
def test_flusher_killed_mid_batch_then_rerun_delivers_each_entry_once(start_server, smtp_sink, tmp_path, concurrency):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 30)
    smtp_sink.delay = 0.05
    server = start_server(server_env(tmp_path, smtp_sink))
    flusher = flush(spool_dir, server.url, "--concurrency", concurrency, wait=False)
    deadline = time.monotonic() + 60
    while len(smtp_sink.received) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    flusher.send_signal(signal.SIGKILL)
    flusher.wait()
    assert 0 < len(entries(spool_dir)) < 30  # it really was killed mid-run
    result = flush(spool_dir, server.url, "--concurrency", concurrency)
    assert result.returncode == 0, result.stderr
    smtp_sink.wait_for(30)
    time.sleep(0.5)
    assert collections.Counter(env.message["Subject"] for env in smtp_sink.received) == {
        f"queued {i}": 1 for i in range(30)
    }
    assert entries(spool_dir) == []


# --------------------------------------------------------------------------- the command line


def run_cli(args, url: str, stdin: bytes):
    env = {"PATH": "/usr/bin:/bin", "GMAIL_PROXY_URL": url, "GMAIL_SECRET_KEY": KEY.decode()}
    command = [sys.executable, "-I", str(ROOT / "gmail.py"), *args]
    return subprocess.run(command, input=stdin, env=env, capture_output=True, timeout=60)


def test_sendmail_recipients_sent_at_once_and_a_refusal_does_not_stop_the_others(reference_server):
    reference_server.delay, reference_server.force_status = 0.02, 400
    reference_server.force_reason, reference_server.force_if = "no such user", b"bad%40example.com"
    raw = b"From: app@example.com\nTo: list@example.com\nSubject: news\n\nbody\n"
    recipients = ["a@example.com", "bad@example.com", "c@example.com", "d@example.com"]
    result = run_cli(["-i", "--concurrency", "3", *recipients], reference_server.url, raw)
    assert result.returncode == 65
    [line] = result.stderr.decode().splitlines()
    assert "400 no such user" in line
    copies = [message_from_bytes(a["msg"]) for a in reference_server.accepted]
    assert sorted(copy["Bcc"] for copy in copies) == ["a@example.com", "c@example.com", "d@example.com"]


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_cli_concurrency_must_be_a_positive_number(reference_server, value):
    result = run_cli(["--concurrency", value, "-i", "a@example.com"], reference_server.url, b"To: a@example.com\n\nx\n")
    assert result.returncode == 64 and b"--concurrency" in result.stderr and reference_server.requests == 0
