"""The server behind `python mailer.py`: waitress, tuned so slow or hostile clients cannot take it down.

The same command serves the proxy on App Engine (app.yaml's entrypoint), on your
own machine (`make run`) and self-hosted.  waitress reads every request body
completely (bodies over 512 KB go to an anonymous temporary file) before a
worker thread runs the app, so a client that stalls or trickles holds a
connection, never a thread; connections are capped and silent ones are closed.
A body over the proxy's limit is refused from its Content-Length, before a
byte of it is read, even when the client asked for `Expect: 100-continue`.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
from pathlib import Path
from typing import Callable, Optional

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import create_server
from waitress.task import WSGITask
from waitress.utilities import Error, RequestEntityTooLarge

from .form import MAX_BODY_BYTES
from .keys import add_keys_command

EX_OSERR = 71

DEFAULT_THREADS = 8
DEFAULT_CONNECTION_LIMIT = 1000
DEFAULT_TIMEOUT = 30  # seconds a client may stay silent, idle or mid-request
MAX_HEADER_BYTES = 64 * 1024  # a real request's headers take a few hundred bytes
FILES_PER_CONNECTION = 2  # its socket, and the temporary file of a large body
M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept fixed


class BodyTooLarge(Error):
    """waitress's 413, worded as the app words it (and without waitress's signature line)."""

    code = 413
    reason = "Payload Too Large"

    def __init__(self, size: int, limit: int):
        super().__init__(f"request body of {size} bytes is over the {limit}-byte limit")
        self.size, self.limit = size, limit

    def to_response(self, ident=None):
        body = (self.body + "\n").encode("utf-8")
        return f"{self.code} {self.reason}", [("Content-Type", "text/plain; charset=utf-8")], body


class _RequestParser(HTTPRequestParser):
    """waitress's parser, but a request refused from its headers is never asked for its body.

    waitress 3.0 answers `Expect: 100-continue` as soon as the headers are in,
    even for a Content-Length it has just refused, and then reads the whole body
    before saying 413.  Here the refusal goes out at once and the connection
    closes, so a client like curl never sends the 33 MB.
    """

    error: Optional[Error]  # waitress's, set when the request is refused

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if isinstance(self.error, RequestEntityTooLarge):
            self.error = BodyTooLarge(
                self.content_length or self.body_bytes_received, self.adj.max_request_body_size - 1
            )
        if self.error is not None:
            self.expect_continue = False
        return consumed


class _Task(WSGITask):
    """waitress's task, but a 204 keeps the connection open.

    waitress 3.0 closes every HTTP/1.1 response without a Content-Length, a 204
    included, which may not carry one: each message sent would cost a client a
    new connection.  A response without a body needs no length to end it.
    """

    def build_response_header(self):
        if self.has_body or self.version != "1.1" or self.close_on_finish:
            return super().build_response_header()
        if self.request.headers.get("CONNECTION", "").lower() == "close":
            return super().build_response_header()
        self.set_close_on_finish = lambda: None  # this response only
        try:
            return super().build_response_header()
        finally:
            del self.set_close_on_finish


class _Channel(HTTPChannel):
    parser_class = _RequestParser
    task_class = _Task


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The serving options of `python mailer.py` (also used by app.yaml's entrypoint)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="port to listen on (default 8080; 0: any free one)")
    parser.add_argument(
        "--threads",
        type=_positive,
        default=DEFAULT_THREADS,
        help=f"requests worked on at once (default {DEFAULT_THREADS}); sending waits on the network, not the CPU",
    )
    parser.add_argument(
        "--connection-limit",
        type=_at_least(2),
        default=DEFAULT_CONNECTION_LIMIT,
        help=f"open connections at most; more wait in the listen backlog (default {DEFAULT_CONNECTION_LIMIT})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        help=f"seconds a client may stay silent, idle or mid-request, before it is disconnected "
        f"(default {DEFAULT_TIMEOUT})",
    )


def build_parser(root: Path) -> argparse.ArgumentParser:
    """The command line of `python mailer.py` (serving, and the `keys` subcommand)."""
    parser = argparse.ArgumentParser(
        prog="mailer.py",
        description="Serve the appengine-mailer proxy (with waitress).",
        epilog="Keys come from env GMAIL_SECRET_KEY (one per line) or keys/GMAIL_SECRET_KEY (read again "
        "within 2 s of a change); GMAIL_DEFAULT_SENDER is optional; GMAIL_MAX_INFLIGHT_MB bounds the megabytes "
        "of request bodies worked on at once. To deliver through an SMTP relay set "
        "APPENGINE_USE_SMTP_MAIL_SERVICE=true and APPENGINE_SMTP_HOST, APPENGINE_SMTP_PORT (default 587), "
        "APPENGINE_SMTP_USER and APPENGINE_SMTP_PASSWORD; APPENGINE_SMTP_USE_TLS is true by default "
        "(STARTTLS, certificate checked): set it to false only for a relay without STARTTLS. Otherwise "
        "messages land in the Maildir outbox/ (GMAIL_OUTBOX).",
    )
    add_server_options(parser)
    parser.add_argument(
        "--create-dev-key",
        action="store_true",
        help="if no key is configured, create a random one in keys/GMAIL_SECRET_KEY",
    )
    commands = parser.add_subparsers(dest="command", metavar="{keys}")
    add_keys_command(commands, root)
    return parser


def _port(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0 to 65535), not {text!r}")
    return value


def _at_least(least: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        value = int(text) if text.isascii() and text.isdigit() else 0
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, not {text!r}")
        return value

    return check


def _positive(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return value


def _open_files_for(connections: int) -> int:
    """Raise this process's open-file limit to what `connections` need, as far as allowed; return the usable count.

    Each connection takes a socket and, while a large body is buffered, a
    temporary file; out of descriptors, accept() would spin instead of waiting.
    """
    needed = connections * FILES_PER_CONNECTION + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(1, min(connections, (soft - 64) // FILES_PER_CONNECTION))


def return_large_blocks_when_freed() -> bool:
    """Have glibc give every block over 128 KB back to the system as soon as it is freed; True if it could.

    By default glibc raises this threshold (up to 32 MB) each time a large block
    is freed, after which blocks of a message's size are carved from per-thread
    heaps that are seldom given back: after a burst worked on by several threads
    the process keeps each thread's peak (six 20 MB messages one after the
    other left 400 MB resident instead of 70).  Fixing the threshold keeps the
    memory a message took only while it is worked on.
    """
    try:
        return ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):  # not glibc
        return False


def serve(
    application: Callable,
    host: str,
    port: int,
    banner: Callable[[int], str],
    *,
    threads: int = DEFAULT_THREADS,
    connection_limit: int = DEFAULT_CONNECTION_LIMIT,
    timeout: int = DEFAULT_TIMEOUT,
    max_body: int = MAX_BODY_BYTES,
) -> int:
    """Serve `application` with waitress until interrupted; `banner(port)` is printed once listening."""
    return_large_blocks_when_freed()
    usable = _open_files_for(connection_limit)
    if usable < connection_limit:
        print(f"mailer.py: open-file limit allows only {usable} connections, not {connection_limit}", file=sys.stderr)
    try:
        server = create_server(
            application,
            host=host,
            port=port,
            threads=threads,
            connection_limit=usable + 2,  # waitress counts its listening socket and its wake-up pipe too
            channel_timeout=timeout,
            cleanup_interval=max(1, timeout // 3),  # how often silent connections are looked for
            max_request_header_size=MAX_HEADER_BYTES,
            max_request_body_size=max_body + 1,  # waitress refuses at >= this
            asyncore_use_poll=True,  # select() cannot watch descriptors past 1024
            ident="appengine-mailer",
        )
    except (OSError, ValueError) as exc:  # ValueError: a host name that does not resolve
        why = getattr(exc, "strerror", None) or str(exc)
        print(f"mailer.py: cannot listen on {host}:{port}: {why}", file=sys.stderr)
        return EX_OSERR
    server.channel_class = _Channel
    print(banner(server.effective_port), flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def try_it_text(root: Path, host: str, port: int, key_file: Path) -> str:
    """The command `make run` prints: it really sends a test message through this server."""
    return (
        f"Send a test message (it lands in {root / 'outbox'} with the default delivery):\n"
        f"  echo 'Hello from appengine-mailer' | {sys.executable} {root / 'gmail.py'} "
        f"--url http://{host}:{port}/ --key-file {key_file} -s 'Test message' -r sender@example.com you@example.com"
    )
