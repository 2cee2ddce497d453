"""Shared fixtures: a real SMTP sink, a recording `mail` stub and real server processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Importing mailer must not file test mail into the repository's outbox.
os.environ.setdefault("GMAIL_OUTBOX", str(ROOT / ".pytest_cache" / "outbox"))

import gmail  # noqa: E402

KEY = b"test-key-0123456789abcdef"
OTHER_KEY = b"another-key-9876543210fedcba"


def sign(msg: bytes, key: bytes = KEY) -> str:
    return gmail.sign_v1(key, msg)


def form(msg: bytes, key: bytes = KEY, **extra) -> bytes:
    """The urlencoded body a client POSTs for msg."""
    return urlencode({"msg": msg, "signature": sign(msg, key), **extra}).encode("ascii")


# --------------------------------------------------------------------------- SMTP sink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Envelope:
    mail_from: str
    rcpt_tos: list
    content: bytes

    @property
    def message(self):
        """The message as a mail client reads it: SMTP's CRLF line ends made local."""
        return message_from_bytes(self.content.replace(b"\r\n", b"\n"), policy=policy.default)


@dataclass
class SMTPSink:
    host: str
    port: int
    received: list = field(default_factory=list)
    delay: float = 0.0  # seconds the server takes over each message

    def wait_for(self, count: int, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)


class _Handler:
    def __init__(self, sink: SMTPSink):
        self.sink = sink

    async def handle_DATA(self, server, session, envelope):
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)
        self.sink.received.append(Envelope(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"


@pytest.fixture
def smtp_sink():
    """A real SMTP server on loopback that keeps every message it is given."""
    from aiosmtpd.controller import Controller

    sink = SMTPSink("127.0.0.1", free_port())
    controller = Controller(_Handler(sink), hostname=sink.host, port=sink.port, data_size_limit=64 * 1024 * 1024)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


# --------------------------------------------------------------------------- recording mail stub


class RecordingMailStub:
    """A `mail` service stub that keeps each request proto, or fails as told."""

    def __init__(self):
        self.sent = []
        self.fail_with = None  # an exception to raise, or callable(request) -> exception|None
        self.lock = threading.Lock()

    def MakeSyncCall(self, service, call, request, response):
        failure = self.fail_with(request) if callable(self.fail_with) else self.fail_with
        if failure is not None:
            raise failure
        copy = type(request)()
        copy.CopyFrom(request)
        with self.lock:
            self.sent.append(copy)


@contextlib.contextmanager
def stub_for(service: str, stub):
    """Register `stub` for an App Engine service for the duration, then put back what was there."""
    from google.appengine.api import apiproxy_stub_map

    previous = apiproxy_stub_map.apiproxy.GetStub(service)
    apiproxy_stub_map.apiproxy.ReplaceStub(service, stub)
    try:
        yield stub
    finally:
        apiproxy_stub_map.apiproxy.ReplaceStub(service, previous)


@pytest.fixture
def mail_stub():
    with stub_for("mail", RecordingMailStub()) as stub:
        yield stub


# --------------------------------------------------------------------------- server process


class ServerProcess:
    """`python mailer.py` running for real, on a free port."""

    def __init__(self, env: dict, cwd: Path = ROOT, args=(), script: Path = ROOT / "mailer.py", command=None):
        self.proc = subprocess.Popen(
            command or [sys.executable, str(script), "--host", "127.0.0.1", "--port", "0", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log_lines: list[str] = []  # standard error, and the JSON log lines on standard output
        self._readers: list[threading.Thread] = []
        line = self.proc.stdout.readline()
        match = re.search(r"http://[0-9.]+:(\d+)/", line)
        if not match:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()!r}")
        self.url = f"http://127.0.0.1:{match.group(1)}/"
        self.banner = line
        for stream in (self.proc.stdout, self.proc.stderr):
            reader = threading.Thread(target=self._collect, args=(stream,), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _collect(self, stream):
        for line in stream:
            self.log_lines.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(5)

    def peak_rss(self) -> int:
        """The most memory the server process has held so far (VmHWM), in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def server_env(tmp_path: Path, smtp: Optional[SMTPSink] = None, keys=(KEY,), **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GMAIL_", "APPENGINE_", "GAE_"))}
    env["GMAIL_SECRET_KEY"] = "\n".join(k.decode() for k in keys)
    env["GMAIL_OUTBOX"] = str(tmp_path / "outbox")
    if smtp is not None:
        env.update(
            APPENGINE_USE_SMTP_MAIL_SERVICE="true",
            APPENGINE_SMTP_HOST=smtp.host,
            APPENGINE_SMTP_PORT=str(smtp.port),
            APPENGINE_SMTP_USE_TLS="false",
        )
    env.update(extra)
    return env


@pytest.fixture
def deployment(tmp_path) -> Path:
    """A copy of the server with its own keys/ folder, as it would be deployed."""
    root = tmp_path / "app"
    root.mkdir()
    for name in ("mailer.py", "gmail.py"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "appengine_mailer", root / "appengine_mailer", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture
def start_server(tmp_path):
    """Start real mailer.py processes; all are stopped at the end of the test."""
    started = []

    def start(env: Optional[dict] = None, **kw) -> ServerProcess:
        server = ServerProcess(env or server_env(tmp_path), **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def smtp_server(start_server, smtp_sink, tmp_path):
    """A real mailer.py in the SDK's SMTP mode, delivering into smtp_sink."""
    server = start_server(server_env(tmp_path, smtp_sink, GMAIL_DEFAULT_SENDER="default@example.com"))
    server.sink = smtp_sink
    return server


@pytest.fixture
def reference_server():
    from reference_server import ReferenceServer

    server = ReferenceServer(KEY)
    yield server
    server.stop()


# --------------------------------------------------------------------------- a server that drips its answer


class DripServer:
    """Takes the request, then answers one byte every `interval` seconds, never finishing the headers.

    A per-operation socket timeout never fires against it; only a deadline for
    the whole exchange does.  With `certificate`, it speaks TLS.
    """

    def __init__(self, interval: float = 0.5, total: int = 240, certificate: Optional[tuple] = None):
        self.interval, self.total = interval, total
        self.requests = 0
        self.context = None
        if certificate:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*certificate)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        scheme = "https" if certificate else "http"
        self.url = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        try:
            conn.settimeout(30)
            if self.context:
                conn = self.context.wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            self.requests += 1
            conn.sendall(b"HTTP/1.1 204 No Content\r\nX-Drip: ")
            for _ in range(self.total):
                if self.stopped.wait(self.interval):
                    return
                conn.sendall(b"a")
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def drip_server():
    server = DripServer()
    yield server
    server.stop()


@pytest.fixture
def self_signed_certificate(tmp_path) -> tuple:
    """A certificate for 127.0.0.1 and its key (PEM files), made with the openssl command."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return str(cert), str(key)
