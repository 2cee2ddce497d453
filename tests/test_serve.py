"""The real server (`python mailer.py`, and app.yaml's entrypoint run here) under slow clients, crowds and big mail."""

from __future__ import annotations

import http.client
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from urllib.parse import urlsplit

import pytest

import gmail
from conftest import KEY, form, free_port, server_env
from test_deploy import entrypoint_command
from test_mailer import make_message

MB = 1024 * 1024


def big_text_message(size: int, subject: str = "Big text") -> bytes:
    """A plain 8-bit UTF-8 text message of about `size` bytes (its urlencoded form is about 1.4 times that)."""
    line = "Grüße aus Köln, the quick brown fox jumps over the lazy dog. ½ € ✓\n".encode()
    head = (
        f"From: sender@example.com\nTo: rcpt@example.com\nSubject: {subject}\nMIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    ).encode()
    return head + line * (size // len(line))


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", "/", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get(url: str, timeout: float) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def stall(url: str, first_bytes: bytes, stack: ExitStack) -> socket.socket:
    """A connection that sends `first_bytes` and then nothing more (closed when the test ends)."""
    parts = urlsplit(url)
    sock = stack.enter_context(socket.create_connection((parts.hostname, parts.port), timeout=30))
    sock.sendall(first_bytes)
    return sock


@pytest.fixture(params=["python mailer.py", "app.yaml entrypoint"])
def server(request, start_server, smtp_sink, tmp_path):
    """The server in SMTP mode: started as `make run` does, or with app.yaml's command line."""
    env = server_env(tmp_path, smtp_sink)
    if request.param == "python mailer.py":
        started = start_server(env)
    else:
        started = start_server(env, command=entrypoint_command(free_port()))
    started.sink = smtp_sink
    return started


def test_slow_and_stalled_clients_do_not_keep_a_signed_post_waiting(server):
    body_half = b"msg=" + b"a" * (4 * MB)
    with ExitStack() as stack:
        for _ in range(300):  # stalled in the middle of the headers
            stall(server.url, b"POST / HTTP/1.1\r\nHost: proxy\r\nContent-Ty", stack)
        for _ in range(10):  # stalled halfway through an 8 MB body
            head = b"POST / HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            stall(server.url, head + b"Content-Length: %d\r\n\r\n" % (8 * MB) + body_half, stack)
        status, text = post(server.url, form(make_message(Subject="through the crowd").as_bytes()), timeout=5)
        assert (status, text) == (204, b"")
        assert get(server.url, timeout=5) == 200
    [envelope] = server.sink.wait_for(1)
    assert envelope.message["Subject"] == "through the crowd"


def test_hundred_concurrent_small_posts_are_all_sent(smtp_server):
    start = threading.Barrier(100)

    def send(i: int) -> int:
        body = form(make_message(Subject=f"crowd {i}").as_bytes())
        start.wait(30)
        return post(smtp_server.url, body, timeout=60)[0]

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(send, range(100)))
    assert statuses == [204] * 100
    received = smtp_server.sink.wait_for(100, timeout=60)
    assert sorted(envelope.message["Subject"] for envelope in received) == sorted(f"crowd {i}" for i in range(100))


def test_body_over_the_limit_with_expect_100_continue_is_refused_before_it_is_sent(smtp_server):
    parts = urlsplit(smtp_server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (33 * MB)
        )
        answer = b""
        while chunk := sock.recv(65536):  # the server answers and closes without a byte of the body
            answer += chunk
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in head
    assert text == b"request body of 34603008 bytes is over the 33554432-byte limit\n"
    assert post(smtp_server.url, form(make_message().as_bytes()))[0] == 204


def test_one_twenty_megabyte_text_message_takes_at_most_six_times_its_size(smtp_server):
    assert post(smtp_server.url, form(make_message().as_bytes()))[0] == 204  # warm: imports, first connection
    before = smtp_server.peak_rss()
    msg = big_text_message(20 * MB)
    body = gmail.encode_form(msg, KEY)
    assert len(body) < 32 * MB
    assert post(smtp_server.url, body, timeout=120)[0] == 204
    growth = smtp_server.peak_rss() - before
    assert growth <= 6 * len(msg), f"peak RSS grew by {growth / len(msg):.1f} times the message"
    received = smtp_server.sink.wait_for(2, timeout=60)
    assert len(received) == 2 and received[1].message.get_body(("plain",)).get_content().startswith("Grüße aus Köln")


def test_many_messages_share_one_kept_alive_connection(start_server, tmp_path):
    server = start_server(server_env(tmp_path))
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        for _ in range(3):
            conn.request(
                "POST", "/", form(make_message().as_bytes()), {"Content-Type": "application/x-www-form-urlencoded"}
            )
            response = conn.getresponse()
            response.read()
            assert response.status == 204 and response.getheader("Connection") is None
        first_socket = conn.sock
        conn.request("GET", "/")
        conn.getresponse().read()
        assert conn.sock is first_socket  # never reconnected
    finally:
        conn.close()


def test_a_connection_limit_of_two_serves_two_clients(start_server, tmp_path):
    server = start_server(server_env(tmp_path), args=("--connection-limit", "2"))
    assert post(server.url, form(make_message().as_bytes()))[0] == 204


@pytest.mark.parametrize(
    "args, line",
    [
        (["--port", "99999"], "argument --port: must be a port number (0 to 65535), not '99999'"),
        (["--host", "nosuchhost.invalid", "--port", "0"], "mailer.py: cannot listen on nosuchhost.invalid:0: "),
        (["--connection-limit", "1"], "argument --connection-limit: must be a whole number of at least 2, not '1'"),
    ],
)
def test_bad_listening_options_are_one_line(tmp_path, args, line):
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run(
        [sys.executable, str(ROOT / "mailer.py"), *args],
        env=server_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (2, 71) and line in result.stderr and "Traceback" not in result.stderr
