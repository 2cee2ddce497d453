"""gmail.py's spool and failover, with real processes: nothing lost through an outage, nothing sent twice."""

from __future__ import annotations

import collections
import fcntl
import json
import os
import stat
import subprocess
import sys
import time
from email import message_from_bytes
from email.message import EmailMessage
from pathlib import Path

import pytest

import gmail
from conftest import KEY, OTHER_KEY, ROOT, free_port, server_env


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/"


POISON = "00000000000000000001.1.poison"  # sorts before every real entry


# Runs a command with a cap on the size of any file it writes: past it, a write fails partway
# (EFBIG), as it does when the disk fills up (ENOSPC) -- without filling this machine's disk.
FILE_SIZE_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
os.execv(sys.argv[2], sys.argv[2:])
"""


def cli(*args, url: str, stdin: bytes = b"", wait: bool = True, file_size_limit: int | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GMAIL_") and k != "RECIPIENT"}
    env.update(GMAIL_PROXY_URL=url, GMAIL_SECRET_KEY=KEY.decode())
    command = [sys.executable, "-I", str(ROOT / "gmail.py"), *args]
    if file_size_limit is not None:
        command = [sys.executable, "-I", "-c", FILE_SIZE_LIMIT, str(file_size_limit), *command]
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


def read_entry(path: Path) -> tuple:
    meta, _, raw = path.read_bytes().partition(b"\n")
    return json.loads(meta), raw


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
    with gmail.GmailProxy(KEY, dead_url(), queue_dir=str(spool_dir)) as proxy:
        assert proxy.send_mail(b"From: app@example.com\nSubject: nobody to send to\n\nx\n")
    server = start_server(server_env(tmp_path, smtp_sink))
    result = cli("--flush", str(spool_dir), url=server.url)
    assert result.returncode == 0 and b"moved to" in result.stderr
    [failed] = [n for n in entries(spool_dir, "failed") if not n.endswith(".reason")]
    reason = (spool_dir / "failed" / (failed + ".reason")).read_text()
    assert "refused the message: 400" in reason
    assert entries(spool_dir) == [] and smtp_sink.received == []
    listing = cli("--list", str(spool_dir), url=server.url).stdout.decode()
    assert f"failed {failed}" in listing and "refused the message: 400" in listing


def test_wrong_key_at_flush_keeps_everything_queued_then_the_fix_sends_it(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 3)
    wrong = start_server(server_env(tmp_path, smtp_sink, keys=(OTHER_KEY,)))
    result = cli("--flush", str(spool_dir), url=wrong.url)
    assert result.returncode == 78 and result.stdout == b""
    [line] = result.stderr.decode().splitlines()
    assert "does not hold the secret key from GMAIL_SECRET_KEY" in line and "3 message(s) kept in" in line
    assert len(entries(spool_dir)) == 3 and entries(spool_dir, "failed") == []
    server = start_server(server_env(tmp_path, smtp_sink))  # the key is fixed: no back-off to wait for
    result = cli("--flush", str(spool_dir), url=server.url)
    assert result.returncode == 0 and b"sent 3" in result.stdout
    smtp_sink.wait_for(3)
    assert subjects(smtp_sink) == {f"queued {i}": 1 for i in range(3)}


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
    oldest = spool_dir / "new" / spool.names()[0]
    meta, raw = read_entry(oldest)
    meta["next_try"] = time.time() + 3600  # the oldest is backed off already
    oldest.write_bytes(json.dumps(meta).encode() + b"\n" + raw)
    reference_server.force_status, reference_server.retry_after = 503, "0"
    with gmail.GmailProxy(KEY, reference_server.url) as proxy:
        report = spool.flush(proxy)
    assert report == {"sent": 0, "failed": 0, "deferred": 1, "waiting": 2 + 1}  # 1 backed off + 2 not tried
    assert sum(report.values()) == 4


def test_damaged_entry_is_set_aside_and_the_rest_still_flows(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 3)
    damaged = spool_dir / "new" / POISON  # sorts first
    damaged.write_bytes(b'{"queued_at": 1700000000, "attempts": 0, "next_try": 0}\nTo: a@b.c\n\nx\n')
    server = start_server(server_env(tmp_path, smtp_sink))
    result = cli("--flush", str(spool_dir), url=server.url)
    assert result.returncode == 0 and b"Traceback" not in result.stderr
    assert b"sent 3, failed 1" in result.stdout
    assert (spool_dir / "failed" / damaged.name).exists() and entries(spool_dir) == []
    reason = (spool_dir / "failed" / (damaged.name + ".reason")).read_text()
    assert reason == "damaged spool entry: incomplete bookkeeping: no last_error, fix_sender\n"
    assert f"failed {damaged.name}" in cli("--list", str(spool_dir), url=server.url).stdout.decode()
    smtp_sink.wait_for(3)
    assert subjects(smtp_sink) == {f"queued {i}": 1 for i in range(3)}


# --------------------------------------------------------------------------- damaged entries


def _valid_entry(spool_dir: Path, subject: str) -> bytes:
    """A well-formed entry (as gmail.py writes them) for a message with this subject."""
    meta, _ = read_entry(spool_dir / "new" / entries(spool_dir)[0])
    raw = message(subject)
    return json.dumps({**meta, "size": len(raw)}).encode() + b"\n" + raw


def _truncated(path: Path, spool_dir: Path, outside: Path) -> None:
    path.write_bytes(_valid_entry(spool_dir, "cut short")[:-20])


def _symlink_to_an_entry_outside(path: Path, spool_dir: Path, outside: Path) -> None:
    outside.write_bytes(_valid_entry(spool_dir, "injected"))
    path.symlink_to(outside)


POISONS = {
    "not JSON": lambda path, *_: path.write_bytes(b"not json\nTo: a@b.c\n\nx\n"),
    "incomplete bookkeeping": lambda path, *_: path.write_bytes(
        b'{"queued_at": 1700000000, "attempts": 0, "next_try": 0}\nTo: a@b.c\n\nx\n'
    ),
    "wrong types": lambda path, *_: path.write_bytes(
        b'{"queued_at": "yesterday", "attempts": 0, "next_try": 0, "last_error": "", "fix_sender": false}\nx\n'
    ),
    "not finite": lambda path, *_: path.write_bytes(
        b'{"queued_at": NaN, "attempts": 0, "next_try": 0, "last_error": "", "fix_sender": false}\nTo: a@b.c\n\nx\n'
    ),
    "bad signed fields": lambda path, *_: path.write_bytes(
        b'{"queued_at": 1e9, "attempts": 0, "next_try": 0, "last_error": "", "fix_sender": false, '
        b'"signed": {"timestamp": "soon", "evil": 1}}\nTo: a@b.c\n\nx\n'
    ),
    "truncated": _truncated,
    "binary junk": lambda path, *_: path.write_bytes(bytes(range(256)) * 64),
    "empty": lambda path, *_: path.write_bytes(b""),
    "no line end": lambda path, *_: path.write_bytes(b"{" * 70_000),
    "deeply nested JSON": lambda path, *_: path.write_bytes(b"[" * 60_000 + b"\nTo: a@b.c\n\nx\n"),
    "symbolic link": _symlink_to_an_entry_outside,
    "folder": lambda path, *_: path.mkdir(),
    "named pipe": lambda path, *_: os.mkfifo(path),
}


@pytest.mark.parametrize("kind", list(POISONS))
def test_a_poisoned_entry_ahead_of_three_good_ones(reference_server, tmp_path, kind):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 3)
    outside = tmp_path / "outside-the-spool"
    POISONS[kind](spool_dir / "new" / POISON, spool_dir, outside)
    before = cli("--list", str(spool_dir), url=reference_server.url)
    assert before.returncode == 0 and before.stderr == b""
    assert f"queued {POISON}  damaged: " in before.stdout.decode()

    result = cli("--flush", str(spool_dir), url=reference_server.url)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert b"sent 3, failed 1, still queued 0" in result.stdout
    sent = sorted(message_from_bytes(a["msg"])["Subject"] for a in reference_server.accepted)
    assert sent == ["queued 0", "queued 1", "queued 2"]
    assert os.path.lexists(spool_dir / "failed" / POISON) and entries(spool_dir) == []
    assert (spool_dir / "failed" / (POISON + ".reason")).read_text().startswith("damaged spool entry: ")
    after = cli("--list", str(spool_dir), url=reference_server.url)
    assert after.returncode == 0 and after.stderr == b"" and f"failed {POISON}" in after.stdout.decode()
    if kind == "symbolic link":  # never followed: the file it points to is neither sent nor moved
        assert outside.exists() and b"not followed" in (spool_dir / "failed" / (POISON + ".reason")).read_bytes()


# --------------------------------------------------------------------------- the spool's own folders


def one_line(result) -> str:
    [line] = result.stderr.decode().splitlines()
    return line


def test_spool_is_created_for_its_user_alone(tmp_path):
    spool_dir = tmp_path / "spool"
    result = cli("--queue", str(spool_dir), "-s", "x", "you@example.com", url=dead_url(), stdin=b"hi\n")
    assert result.returncode == 0, result.stderr
    for folder in (spool_dir, spool_dir / "new", spool_dir / "tmp", spool_dir / "failed"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    [entry] = (spool_dir / "new").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "folder, mode", [("", 0o777), ("", 0o770), ("", 0o722), ("new", 0o777), ("tmp", 0o773)], ids=str
)
def test_spool_writable_by_others_is_refused(tmp_path, folder, mode):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 1)
    (spool_dir / folder).chmod(mode)
    for args in (["--flush", str(spool_dir)], ["--list", str(spool_dir)]):
        result = cli(*args, url=dead_url())
        assert result.returncode == 74
        assert one_line(result) == (
            f"gmail.py: spool folder {spool_dir / folder if folder else spool_dir} is writable by others "
            f"(mode {mode:04o}); chmod 700 {spool_dir / folder if folder else spool_dir}: refusing to use it"
        )
    result = cli("--queue", str(spool_dir), "-s", "x", "you@example.com", url=dead_url(), stdin=b"hi\n")
    assert result.returncode == 75  # not queued: the caller (an MTA) must keep the message
    assert "could not be queued" in one_line(result) and "writable by others" in one_line(result)
    assert len(entries(spool_dir)) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the spool to another user needs root")
def test_spool_owned_by_someone_else_is_refused(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 1)  # then someone else takes it over: root must not sign what they put there
    os.chown(spool_dir, 65534, 65534)
    result = cli("--flush", str(spool_dir), url=reference_server.url)
    assert result.returncode == 74 and reference_server.requests == 0
    assert one_line(result) == (
        f"gmail.py: spool folder {spool_dir} belongs to uid 65534, not to this user (uid 0): refusing to use it"
    )


def test_planted_symlinks_are_never_followed(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 1)
    victim = tmp_path / "a-file-root-owns"
    victim.write_text("precious\n")
    future = tmp_path / "far-future"
    future.write_text("99999999999\n")
    (spool_dir / "retry-at").symlink_to(future)  # followed, the flush would wait for ever
    (spool_dir / "tmp" / "leftover").symlink_to(victim)  # written through, it would overwrite the victim
    result = cli("--flush", str(spool_dir), url=reference_server.url)
    assert result.returncode == 0 and b"sent 1" in result.stdout, result.stderr
    assert victim.read_text() == "precious\n" and future.read_text() == "99999999999\n"
    assert entries(spool_dir, "tmp") == []  # the link itself was removed, not what it points to

    (spool_dir / ".lock").unlink()
    (spool_dir / ".lock").symlink_to(victim)
    result = cli("--flush", str(spool_dir), url=reference_server.url)
    assert result.returncode == 74 and "symbolic link" in one_line(result)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("which", ["the spool itself", "tmp", "new"])
def test_spool_folders_that_are_symlinks_are_refused(tmp_path, which):
    spool_dir = tmp_path / "spool"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if which == "the spool itself":
        spool_dir.symlink_to(elsewhere)
        shown = spool_dir
    else:
        for folder in ("", "new", "tmp", "failed"):
            if folder != which:
                (spool_dir / folder).mkdir(mode=0o700)
        (spool_dir / which).symlink_to(elsewhere)
        shown = spool_dir / which
    result = cli("--flush", str(spool_dir), url=dead_url())
    assert result.returncode == 74
    assert one_line(result) == f"gmail.py: spool folder {shown} is a symbolic link: refusing to follow it"
    result = cli("--queue", str(spool_dir), "-s", "x", "you@example.com", url=dead_url(), stdin=b"hi\n")
    assert result.returncode == 75 and "could not be queued" in one_line(result)
    assert list(elsewhere.iterdir()) == []


def test_tmp_leftovers_are_cleaned(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 1)
    crashed, writing = spool_dir / "tmp" / "crashed.1.aa", spool_dir / "tmp" / "being-written.2.bb"
    crashed.write_bytes(b"half an entry")
    writing.write_bytes(b"another process is writing this")
    two_hours_ago = time.time() - 7200
    os.utime(crashed, (two_hours_ago, two_hours_ago))
    assert cli("--flush", str(spool_dir), url=reference_server.url).returncode == 0
    assert entries(spool_dir, "tmp") == [writing.name]


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_never_stops_delivery_of_what_is_queued(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 4)
    server = start_server(server_env(tmp_path, smtp_sink))
    result = cli("--flush", str(spool_dir), url=server.url, file_size_limit=100)  # no entry can be rewritten
    assert result.returncode == 0 and b"sent 4" in result.stdout, result.stderr
    smtp_sink.wait_for(4)
    assert subjects(smtp_sink) == {f"queued {i}": 1 for i in range(4)}
    assert entries(spool_dir) == [] and entries(spool_dir, "tmp") == []


def test_a_full_disk_when_queueing_fails_temporarily_and_leaves_nothing(tmp_path):
    spool_dir = tmp_path / "spool"
    result = cli(
        "--queue", str(spool_dir), "-s", "x", "you@example.com", url=dead_url(), stdin=b"hi\n", file_size_limit=100
    )
    assert result.returncode == 75  # not queued: the caller keeps the message
    assert "could not be queued" in one_line(result) and "File too large" in one_line(result)
    assert entries(spool_dir) == [] and entries(spool_dir, "tmp") == []


def test_a_full_disk_while_backing_off_still_sends_the_rest(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    with gmail.GmailProxy(KEY, dead_url(), queue_dir=str(spool_dir)) as proxy:
        for subject in ("poison-marker", "good 1", "good 2"):
            assert proxy.send_mail(message(subject))
    reference_server.force_status, reference_server.force_if = 500, b"poison-marker"
    result = cli("--flush", str(spool_dir), url=reference_server.url, file_size_limit=100)
    assert result.returncode == 0 and b"sent 2, failed 0, still queued 1" in result.stdout, result.stderr
    assert entries(spool_dir, "tmp") == []


# --------------------------------------------------------------------------- what stops a flush


def test_a_500_for_one_message_backs_off_that_message_alone(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    with gmail.GmailProxy(KEY, dead_url(), queue_dir=str(spool_dir)) as proxy:
        for subject in ("poison-marker", "good 1", "good 2", "good 3"):
            assert proxy.send_mail(message(subject))
    reference_server.force_status, reference_server.force_if = 500, b"poison-marker"
    result = cli("--flush", str(spool_dir), url=reference_server.url)
    assert result.returncode == 0 and b"sent 3, failed 0, still queued 1" in result.stdout, result.stderr
    [line] = cli("--list", str(spool_dir), url=reference_server.url).stdout.decode().splitlines()
    assert "poison-marker" in line and "attempts 1" in line and "500 forced failure" in line
    tried = reference_server.requests
    queue(spool_dir, 1)  # the next flush is not held back by the one message
    result = cli("--flush", str(spool_dir), url=reference_server.url)
    assert result.returncode == 0 and b"sent 1, failed 0, still queued 1" in result.stdout
    assert reference_server.requests == tried + 1  # and the backed-off message waits its turn


def test_a_dripping_proxy_cannot_hold_the_flush(drip_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 2)
    result = cli("--flush", str(spool_dir), "--timeout", "2", url=drip_server.url)
    assert result.returncode == 0, result.stderr  # without a deadline: 120 s of drip per message
    assert drip_server.requests == 1  # the proxy is unavailable: the run ended there
    listing = cli("--list", str(spool_dir), url=drip_server.url).stdout.decode()
    assert "timed out: no complete answer within 2 s" in listing
    with open(spool_dir / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


def test_a_client_key_fixed_after_a_refused_flush_sends_at_once(start_server, smtp_sink, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 2)
    server = start_server(server_env(tmp_path, smtp_sink))
    wrong = tmp_path / "wrong-key"
    wrong.write_text(OTHER_KEY.decode())
    assert cli("--key-file", str(wrong), "--flush", str(spool_dir), url=server.url).returncode == 78
    result = cli("--flush", str(spool_dir), url=server.url)  # the right key, seconds later
    assert result.returncode == 0 and b"sent 2" in result.stdout, result.stderr
    assert subjects(smtp_sink) == {"queued 0": 1, "queued 1": 1}


def test_the_listing_says_when_a_paused_spool_sends_next(reference_server, tmp_path):
    spool_dir = tmp_path / "spool"
    queue(spool_dir, 2)
    reference_server.force_status, reference_server.retry_after = 503, "0"
    assert cli("--flush", str(spool_dir), url=reference_server.url).returncode == 0
    lines = cli("--list", str(spool_dir), url=reference_server.url).stdout.decode().splitlines()
    assert len(lines) == 2 and all("next try in 0s" not in line for line in lines)
