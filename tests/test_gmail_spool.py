"""gmail.py's spool and failover, with real processes: nothing lost through an outage, nothing sent twice."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

import gmail
from conftest import KEY, OTHER_KEY, ROOT, free_port, server_env


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/"


def cli(*args, url: str, stdin: bytes = b"", wait: bool = True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GMAIL_") and k != "RECIPIENT"}
    env.update(GMAIL_PROXY_URL=url, GMAIL_SECRET_KEY=KEY.decode())
    command = [sys.executable, "-I", str(ROOT / "gmail.py"), *args]
    if not wait:
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    return subprocess.run(command, input=stdin, env=env, capture_output=True, timeout=120)


def message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", "user@example.com", subject
    msg.set_content("queued body\n")
    return msg.as_bytes()


def queue(spool_dir: Path, count: int) -> None:
    """Queue messages as --queue does during an outage (through the library, which --queue uses)."""
    with gmail.GmailProxy(KEY, dead_url(), queue_dir=str(spool_dir)) as proxy:
        for i in range(count):
            assert proxy.send_mail(message(f"queued {i}")) and proxy.last_queued


def subjects(sink) -> collections.Counter:
    return collections.Counter(env.message["Subject"] for env in sink.received)


def entries(spool_dir: Path, folder: str = "new") -> list:
    path = spool_dir / folder
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_outage_queues_then_flush_delivers_exactly_once(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    result = cli(
        "--queue",
        str(spool_dir),
        "-s",
        "during the outage",
        "-r",
        "me@example.com",
        "you@example.com",
        url=dead_url(),
        stdin=b"hello\n",
    )
    assert result.returncode == 0, result.stderr
    assert b"queued in" in result.stderr and b"--flush" in result.stderr
    [entry] = entries(spool_dir)
    content = (spool_dir / "new" / entry).read_bytes()
    assert KEY not in content and b"during the outage" in content
    assert b"outage" not in entry.encode() and (spool_dir / "new" / entry).stat().st_mode & 0o077 == 0

    server = start_server(server_env(tmp_path, smtp_sink))
    result = cli("--flush", str(spool_dir), url=server.url)
    assert result.returncode == 0, result.stderr
    assert b"sent 1" in result.stdout
    smtp_sink.wait_for(1)
    assert subjects(smtp_sink) == {"during the outage": 1}
    assert entries(spool_dir) == []
    assert cli("--flush", str(spool_dir), url=server.url).returncode == 0
    time.sleep(0.3)
    assert len(smtp_sink.received) == 1


def test_permanent_refusal_at_flush_moves_to_failed(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 1)
    server = start_server(server_env(tmp_path, smtp_sink, keys=(OTHER_KEY,)))
    result = cli("--flush", str(spool_dir), url=server.url)
    assert result.returncode == 0 and b"moved to" in result.stderr
    [failed] = [n for n in entries(spool_dir, "failed") if not n.endswith(".reason")]
    reason = (spool_dir / "failed" / (failed + ".reason")).read_text()
    assert "400" in reason and "signature does not match" in reason
    assert entries(spool_dir) == [] and smtp_sink.received == []
    listing = cli("--list", str(spool_dir), url=server.url).stdout.decode()
    assert f"failed {failed}" in listing and "signature does not match" in listing


def test_backoff_second_flush_does_not_hammer(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 3)
    reference_server.force_status, reference_server.retry_after = 503, "0"
    assert cli("--flush", str(spool_dir), url=reference_server.url).returncode == 0
    first = reference_server.requests
    assert first == 2  # one message tried (and retried once), then the run stopped
    assert cli("--flush", str(spool_dir), url=reference_server.url).returncode == 0
    assert reference_server.requests == first
    listing = cli("--list", str(spool_dir), url=reference_server.url).stdout.decode()
    assert "attempts 1, next try in 5" in listing or "attempts 1, next try in 6" in listing
    lines = listing.splitlines()
    assert len(lines) == 3 and all(line.startswith("queued ") for line in lines) and "503" in lines[0]


def test_two_concurrent_flushers_send_each_message_once(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 50)
    server = start_server(server_env(tmp_path, smtp_sink))
    flushers = [cli("--flush", str(spool_dir), url=server.url, wait=False) for _ in range(2)]
    for flusher in flushers:
        assert flusher.wait(120) == 0, flusher.stderr.read()
    smtp_sink.wait_for(50)
    time.sleep(0.3)
    assert subjects(smtp_sink) == {f"queued {i}": 1 for i in range(50)}
    assert entries(spool_dir) == []


def test_flusher_killed_mid_run_loses_nothing_and_duplicates_nothing(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 30)
    smtp_sink.delay = 0.05
    server = start_server(server_env(tmp_path, smtp_sink))
    flusher = cli("--flush", str(spool_dir), url=server.url, wait=False)
    deadline = time.monotonic() + 60
    while len(smtp_sink.received) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    flusher.send_signal(signal.SIGKILL)
    flusher.wait()
    assert 0 < len(entries(spool_dir)) < 30  # it really was killed mid-run
    result = cli("--flush", str(spool_dir), url=server.url)
    assert result.returncode == 0, result.stderr
    smtp_sink.wait_for(30)
    time.sleep(0.5)
    assert subjects(smtp_sink) == {f"queued {i}": 1 for i in range(30)}
    assert entries(spool_dir) == []


def test_failover_to_the_second_url(start_server, smtp_sink, tmp_path):
    server = start_server(server_env(tmp_path, smtp_sink))
    urls = f"{dead_url()}, {server.url}"
    result = cli("-s", "via the second", "-r", "me@example.com", "you@example.com", url=urls, stdin=b"hi\n")
    assert result.returncode == 0, result.stderr
    smtp_sink.wait_for(1)
    assert subjects(smtp_sink) == {"via the second": 1}


def test_failover_after_503_and_back_to_the_working_one(reference_server, tmp_path):
    from reference_server import ReferenceServer

    second = ReferenceServer(KEY)
    try:
        reference_server.force_status, reference_server.retry_after = 503, "0"
        with gmail.GmailProxy(KEY, f"{reference_server.url} {second.url}") as proxy:
            for i in range(3):
                assert proxy.send_mail(message(f"m{i}"))
        assert len(second.accepted) == 3 and reference_server.requests == 2  # stays on the one that works
    finally:
        second.stop()


def test_refusal_is_not_failed_over_or_queued(reference_server, tmp_path):
    from reference_server import ReferenceServer

    second = ReferenceServer(KEY)
    try:
        reference_server.force_status = 400
        proxy = gmail.GmailProxy(KEY, f"{reference_server.url},{second.url}", queue_dir=str(tmp_path / "spool"))
        with pytest.raises(gmail.MessageSendingFailure) as caught:
            proxy.send_mail(message("bad"))
        assert caught.value.status == 400 and second.requests == 0
        assert entries(tmp_path / "spool") == []
    finally:
        second.stop()


def test_message_older_than_max_age_moves_to_failed(tmp_path, reference_server):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 1)
    result = cli("--flush", str(spool_dir), "--max-age", "0", url=reference_server.url)
    assert result.returncode == 0 and reference_server.requests == 0
    [reason] = [n for n in entries(spool_dir, "failed") if n.endswith(".reason")]
    assert "expired" in (spool_dir / "failed" / reason).read_text()


def test_response_lost_after_sending_is_not_delivered_twice(start_server, smtp_sink, tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 1)
    server = start_server(server_env(tmp_path, smtp_sink))
    spool = gmail.Spool(str(spool_dir))
    real_send = gmail.GmailProxy.send_signed

    def send_then_die(self, body):
        real_send(self, body)  # the proxy accepted and sends the message...
        raise SystemExit("killed before the spool entry was removed")  # ...but the flusher dies

    monkeypatch.setattr(gmail.GmailProxy, "send_signed", send_then_die)
    with pytest.raises(SystemExit), gmail.GmailProxy(KEY, server.url) as proxy:
        spool.flush(proxy)
    monkeypatch.setattr(gmail.GmailProxy, "send_signed", real_send)
    assert len(entries(spool_dir)) == 1
    time.sleep(1.1)  # a new signature now would differ (timestamps are whole seconds)
    with gmail.GmailProxy(KEY, server.url) as proxy:
        assert spool.flush(proxy)["sent"] == 1  # the same signed request again: 204, not sent again
    time.sleep(0.5)
    assert subjects(smtp_sink) == {"queued 0": 1} and entries(spool_dir) == []


def test_unwritable_spool_keeps_the_temporary_exit_code(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cli("--queue", str(blocker / "spool"), "-s", "x", "you@example.com", url=dead_url(), stdin=b"hi\n")
    assert result.returncode == 75 and b"could not be queued" in result.stderr  # the caller keeps the message
    result = cli("--flush", str(blocker / "spool"), url=dead_url())
    assert result.returncode == 74 and b"Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_malformed_proxy_url_is_a_configuration_error(tmp_path):
    result = cli("-s", "x", "you@example.com", url="http://proxy:notaport/", stdin=b"hi\n")
    assert result.returncode == 78 and b"http://proxy:notaport/" in result.stderr


def test_flush_report_counts_each_message_once(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 4)
    spool = gmail.Spool(str(spool_dir))
    first = spool.names()[0]
    meta, raw = spool._read(spool.new, first)
    meta["next_try"] = time.time() + 3600  # the oldest is backed off already
    spool._write(first, meta, raw)
    reference_server.force_status, reference_server.retry_after = 503, "0"
    with gmail.GmailProxy(KEY, reference_server.url) as proxy:
        report = spool.flush(proxy)
    assert report == {"sent": 0, "failed": 0, "deferred": 1, "waiting": 2 + 1}  # 1 backed off + 2 not tried
    assert sum(report.values()) == 4


def test_damaged_entry_is_set_aside_and_the_rest_still_flows(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 2)
    damaged = spool_dir / "new" / "00000000000000000001.1.damaged"  # sorts first
    damaged.write_bytes(b"not json\nTo: a@b.c\n\nx\n")
    server = start_server(server_env(tmp_path, smtp_sink))
    result = cli("--flush", str(spool_dir), url=server.url)
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    assert b"sent 2, failed 1" in result.stdout
    assert (spool_dir / "failed" / damaged.name).exists() and entries(spool_dir) == []
    assert "unreadable" in (spool_dir / "failed" / (damaged.name + ".reason")).read_text()
    assert f"failed {damaged.name}" in cli("--list", str(spool_dir), url=server.url).stdout.decode()
