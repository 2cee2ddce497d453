"""The local / self-hosted server behind `python mailer.py`.

On App Engine the entrypoint in app.yaml serves mailer:app; this module is for
running the same app anywhere else, and for `make run`.
"""

from __future__ import annotations

import argparse
import socketserver
import sys
from pathlib import Path
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .keys import add_keys_command

EX_OSERR = 71


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # socketserver's default backlog of 5 resets connections when a client opens several at once.
    request_queue_size = 128


def build_parser(root: Path) -> argparse.ArgumentParser:
    """The command line of `python mailer.py` (serving, and the `keys` subcommand)."""
    parser = argparse.ArgumentParser(
        prog="mailer.py",
        description="Serve the appengine-mailer proxy with a threaded stdlib WSGI server.",
        epilog="Keys come from env GMAIL_SECRET_KEY (one per line) or keys/GMAIL_SECRET_KEY (read again "
        "within 2 s of a change); GMAIL_DEFAULT_SENDER is optional. To deliver through an SMTP relay set "
        "APPENGINE_USE_SMTP_MAIL_SERVICE=true and APPENGINE_SMTP_HOST, APPENGINE_SMTP_PORT (default 587), "
        "APPENGINE_SMTP_USER and APPENGINE_SMTP_PASSWORD; APPENGINE_SMTP_USE_TLS is true by default "
        "(STARTTLS, certificate checked): set it to false only for a relay without STARTTLS. Otherwise "
        "messages land in the Maildir outbox/ (GMAIL_OUTBOX).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument(
        "--create-dev-key",
        action="store_true",
        help="if no key is configured, create a random one in keys/GMAIL_SECRET_KEY",
    )
    commands = parser.add_subparsers(dest="command", metavar="{keys}")
    add_keys_command(commands, root)
    return parser


def serve(application: Callable, host: str, port: int, banner: Callable[[int], str]) -> int:
    """Serve `application` until interrupted; `banner(port)` is printed once listening."""
    try:
        server = make_server(
            host, port, application, server_class=ThreadingWSGIServer, handler_class=WSGIRequestHandler
        )
    except OSError as exc:
        print(f"mailer.py: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return EX_OSERR
    print(banner(server.server_port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def try_it_text(root: Path, host: str, port: int, key_file: Path) -> str:
    """The command `make run` prints: it really sends a test message through this server."""
    return (
        f"Send a test message (it lands in {root / 'outbox'} with the default delivery):\n"
        f"  echo 'Hello from appengine-mailer' | {sys.executable} {root / 'gmail.py'} "
        f"--url http://{host}:{port}/ --key-file {key_file} -s 'Test message' -r sender@example.com you@example.com"
    )
