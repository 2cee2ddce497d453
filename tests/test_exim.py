"""The shipped Exim transport with a real Exim 4: one copy per recipient, queued (not bounced) in an outage
or when the key is wrong."""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import KEY, OTHER_KEY, ROOT, free_port, server_env

EXIM = (
    shutil.which("exim")
    or shutil.which("exim4")
    or next((p for p in ("/usr/sbin/exim4", "/usr/sbin/exim") if os.path.exists(p)), None)
)
EXIM_USER = "Debian-exim"

pytestmark = [
    pytest.mark.skipif(EXIM is None, reason="Exim 4 is not installed (.ci/run installs exim4-daemon-light)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Exim with a test configuration needs root"),
]

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")
# Exim also sets RECIPIENT; the transport must not need it, so gmail runs without it here.
ENV = shutil.which("env") or "/usr/bin/env"


class Exim:
    """A private Exim: own config, spool and logs; the transport is the shipped file, included verbatim."""

    def __init__(self, root: Path):
        self.root = root
        for name in ("spool", "log"):
            (root / name).mkdir()
            shutil.chown(root / name, EXIM_USER, EXIM_USER)
        self.envdir = root / "envdir"
        self.envdir.mkdir()
        self.set_key(KEY)
        shutil.copy(ROOT / "gmail.py", root / "gmail")
        self.config = root / "exim.conf"
        self.config.write_text(
            f"GMAIL_PIPE_COMMAND = {ENV} -u RECIPIENT {PYTHON} {root / 'gmail'} --envdir {self.envdir}\n"
            f"primary_hostname = client.example\n"
            f"spool_directory = {root / 'spool'}\n"
            f"log_file_path = {root / 'log'}/%slog\n"
            f"exim_user = {EXIM_USER}\nexim_group = {EXIM_USER}\n"
            "keep_environment =\n"
            "begin routers\n"
            "smarthost:\n  driver = accept\n  transport = remote_smtp_smarthost\n"
            "begin transports\n"
            f".include {ROOT / '50_exim4_config_gmail_pipe'}\n"
            "begin retry\n* * F,1d,1m\n"
        )

    def set_key(self, key: bytes):
        path = self.envdir / "GMAIL_SECRET_KEY"
        path.write_bytes(key + b"\n")
        path.chmod(0o640)
        shutil.chown(path, group=EXIM_USER)

    def set_proxy_url(self, url: str):
        path = self.envdir / "GMAIL_PROXY_URL"
        path.write_text(url + "\n")
        path.chmod(0o644)

    def run(self, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run([EXIM, "-C", str(self.config), *args], input=stdin, capture_output=True, timeout=120)

    def queue_size(self) -> int:
        return int(self.run("-bpc").stdout.strip())

    def log(self) -> str:
        path = self.root / "log" / "mainlog"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def exim():
    try:
        grp.getgrnam(EXIM_USER)
    except KeyError:
        pytest.skip(f"no {EXIM_USER} user: Exim is not Debian's exim4 package")
    root = Path(tempfile.mkdtemp(prefix="gmail-exim-"))
    root.chmod(0o755)  # the transport runs as Debian-exim and must reach gmail and envdir
    try:
        yield Exim(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


MESSAGE = (
    b"From: Sender <sender@example.com>\nTo: Ann <ann@example.com>\nCc: cc@example.com\n"
    b"Bcc: hidden@example.com\nSubject: via exim\n\nHello through Exim.\n"
)


def delivered_once_each(exim, smtp_sink) -> list:
    """What the sink received once Exim's queue is empty: one copy for each of the three recipients."""
    received = smtp_sink.wait_for(3)
    assert exim.queue_size() == 0, exim.log()
    assert sorted(r for env in received for r in env.rcpt_tos) == [
        "ann@example.com",
        "cc@example.com",
        "hidden@example.com",
    ]
    return received


def test_outage_queues_then_each_recipient_gets_one_copy(exim, start_server, smtp_sink, tmp_path):
    exim.set_proxy_url(f"http://127.0.0.1:{free_port()}/")  # nobody listens there
    result = exim.run("-odf", "-t", stdin=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert exim.queue_size() == 1, exim.log()  # deferred, and no bounce message was queued
    assert "returned 75" in exim.log() and "** " not in exim.log()
    assert smtp_sink.wait_for(1, timeout=0.5) == []

    server = start_server(server_env(tmp_path, smtp_sink))
    exim.set_proxy_url(server.url)
    result = exim.run("-qff")
    assert result.returncode == 0, result.stderr
    received = delivered_once_each(exim, smtp_sink)
    for env in received:
        assert env.message["Subject"] == "via exim"
        assert env.message.get_body(("plain",)).get_content().strip() == "Hello through Exim."
        assert b"hidden@example.com" not in env.content
    by_rcpt = {env.rcpt_tos[0]: env.message for env in received}
    assert by_rcpt["ann@example.com"]["To"] == "Ann <ann@example.com>"
    assert by_rcpt["cc@example.com"]["Cc"] == "cc@example.com"
    assert "To" not in by_rcpt["hidden@example.com"] and "Cc" not in by_rcpt["hidden@example.com"]


def test_wrong_key_is_deferred_not_bounced_then_delivered_once_fixed(exim, start_server, smtp_sink, tmp_path):
    server = start_server(server_env(tmp_path, smtp_sink, keys=(OTHER_KEY,)))  # the proxy holds another key
    exim.set_proxy_url(server.url)
    result = exim.run("-odf", "-t", stdin=MESSAGE)
    assert result.returncode == 0, result.stderr
    log = exim.log()
    assert exim.queue_size() == 1, log  # deferred, and no bounce message was queued
    assert "returned 78" in log and "** " not in log
    assert "does not hold the secret key" in log  # gmail.py's line, in Exim's log (no key in it)
    assert KEY.decode() not in log and OTHER_KEY.decode() not in log
    assert smtp_sink.wait_for(1, timeout=0.5) == []

    exim.set_key(OTHER_KEY)
    result = exim.run("-qff")
    assert result.returncode == 0, result.stderr
    delivered_once_each(exim, smtp_sink)
