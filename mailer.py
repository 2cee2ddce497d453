"""appengine-mailer server: send signed RFC 2822 messages through App Engine's Mail API.

Clients POST ``msg`` (the raw message) and ``signature`` (base64 HMAC-SHA1 of the
message under a shared secret) as an urlencoded form to ``/``.  The server checks
the signature against every configured key, converts the message with the stdlib
``email`` package into ``google.appengine.api.mail.EmailMessage`` and calls its
``send()``.  Answers: 204 sent, 400 the client's fault (the body says why),
413/415/405 for requests outside the interface, 503 with Retry-After when the
mail service is in trouble.

``send()`` goes wherever the SDK sends: the Mail API on App Engine, a real SMTP
server with the SDK's SMTP mode (``APPENGINE_USE_SMTP_MAIL_SERVICE=true``), or,
by default elsewhere, an outbox stub that writes each message into a Maildir.

This module is the request flow; each step lives in a module of the
``appengine_mailer`` package, named for what it holds.  Run locally with
``python mailer.py --host 127.0.0.1 --port 8080``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import gmail
from appengine_mailer import keys, serve
from appengine_mailer.admission import DEFAULT_MAX_INFLIGHT_MB, MB, Admission
from appengine_mailer.convert import Outgoing
from appengine_mailer.delivery import configure_delivery, delivery_mode
from appengine_mailer.errors import (
    BadRequest,
    HTTPError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    UnsupportedMediaType,
    http_error_for_send_failure,
)
from appengine_mailer.fastparse import parse_message
from appengine_mailer.form import MAX_BODY_BYTES, body_size, flag, parse_form, read_body
from appengine_mailer.sdk import mail_errors
from appengine_mailer.settings import (
    DEFAULT_MAX_RECIPIENTS,
    EX_CONFIG,
    default_sender_from_environment,
    flag_setting,
    keys_from_environment,
    number_setting,
    on_app_engine,
)
from appengine_mailer.signatures import (
    PENDING,
    SENT,
    InProcessReplayStore,
    MemcacheReplayStore,
    ReplayStore,
    check_signature,
    check_signature_v2,
)

__version__ = gmail.__version__

log = logging.getLogger("appengine_mailer")

HERE = Path(__file__).resolve().parent  # the deployment: keys/ and outbox/ live beside this file


class Mailer:
    """The WSGI callable: POST / sends, GET / reports health."""

    def __init__(
        self,
        keys: list[bytes],
        default_sender: Optional[str] = None,
        *,
        max_body: int = MAX_BODY_BYTES,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        require_signature_v2: bool = False,
        replay_window: int = gmail.REPLAY_WINDOW_SECONDS,
        replay_store: Optional[ReplayStore] = None,
        admission: Optional[Admission] = None,
        clock: Callable[[], float] = time.time,
    ):
        self.keys = [k if isinstance(k, bytes) else k.encode("utf-8") for k in keys]
        self.default_sender = default_sender
        self.max_body = max_body
        self.max_recipients = max_recipients
        self.require_signature_v2 = require_signature_v2
        self.replay_window = replay_window
        self.replay_store = replay_store if replay_store is not None else InProcessReplayStore()
        self.admission = admission if admission is not None else Admission(DEFAULT_MAX_INFLIGHT_MB * MB)
        self.clock = clock

    def __call__(self, environ: dict, start_response: Callable):
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if environ.get("PATH_INFO", "/") not in ("", "/"):
                raise NotFound("not found: the proxy serves only /")
            if method in ("GET", "HEAD"):
                return self._respond(start_response, "200 OK", self.health(), "application/json", method)
            if method != "POST":
                raise MethodNotAllowed(f"method {method} is not allowed: POST a message to /")
            self.handle_post(environ)
        except HTTPError as err:
            return self._respond(
                start_response, err.status, err.reason + "\n", "text/plain; charset=utf-8", method, err.headers
            )
        except Exception as exc:  # a bug: answer without a traceback, whose text could quote the message
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("internal error: %s at %s:%d", type(exc).__name__, Path(frame.filename).name, frame.lineno)
            return self._respond(
                start_response, "500 Internal Server Error", "internal error\n", "text/plain; charset=utf-8", method
            )
        start_response("204 No Content", [])
        return []

    @staticmethod
    def _respond(start_response, status, text, content_type, method, headers=()):
        body = text.encode("utf-8")
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        return [] if method == "HEAD" else [body]

    def health(self) -> str:
        return (
            json.dumps(
                {
                    "service": "appengine-mailer",
                    "version": __version__,
                    "keys": len(self.keys),
                    "default_sender": bool(self.default_sender),
                    "delivery": delivery_mode(),
                    "signature_v2_required": self.require_signature_v2,
                    "replay_window_seconds": self.replay_window,
                }
            )
            + "\n"
        )

    def handle_post(self, environ: dict) -> None:
        content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(
                f"content type {content_type or 'missing'!r}: send application/x-www-form-urlencoded"
            )
        try:
            with self.admission.admit(body_size(environ, self.max_body)):  # 503 when too much is in flight
                self.send(parse_form(read_body(environ, self.max_body)))
        except HTTPError as err:
            log.info("refused: %s (%s) Content-Length=%r", err.status, err.reason, environ.get("CONTENT_LENGTH"))
            raise

    def send(self, form: Mapping[str, bytes]) -> None:
        """Check, convert and send one message; raise HTTPError for any refusal."""
        fix_sender = flag(form, "fix_sender")
        replay_key = self.authenticate(form, fix_sender)
        if replay_key is None:
            self._send_message(form["msg"], fix_sender)
            return
        ttl = int(form["timestamp"]) + self.replay_window - self.clock() + 1
        state = self.replay_store.claim(replay_key, ttl)
        if state == SENT:
            log.info("duplicate: already sent within its window, not sent again")
            return
        if state == PENDING:
            raise ServiceUnavailable("the same request is being sent right now; retry shortly", retry_after=1)
        try:
            self._send_message(form["msg"], fix_sender)
        except BaseException:
            self.replay_store.release(replay_key)  # not sent: a retry must send it
            raise
        self.replay_store.mark_sent(replay_key, ttl)

    def authenticate(self, form: Mapping[str, bytes], fix_sender: bool) -> Optional[str]:
        """Check the request's signature (v2 when present, else v1); return the v2 replay key."""
        if not form.get("msg"):
            raise BadRequest("missing or empty field 'msg'")
        if not self.keys:
            raise ServiceUnavailable("the proxy has no secret key configured (set GMAIL_SECRET_KEY)")
        if form.get("signature_v2"):
            return check_signature_v2(self.keys, form, fix_sender, self.clock(), self.replay_window)
        if not form.get("signature"):
            raise BadRequest("missing or empty field 'signature'")
        if self.require_signature_v2:
            raise BadRequest("this proxy requires signature_v2 (with timestamp); upgrade the client or turn it on")
        check_signature(self.keys, form["msg"], form["signature"])
        return None

    def _send_message(self, msg: bytes, fix_sender: bool) -> None:
        outgoing = Outgoing(parse_message(msg), self.max_recipients)
        sender, reply_to = outgoing.sender, outgoing.reply_to
        if sender is None:
            if not fix_sender:
                raise BadRequest("message has no From address (send with fix_sender to use the default sender)")
            sender = self._default_sender_or_refuse("message has no From address")
        try:
            self._deliver(outgoing, sender, reply_to)
        except mail_errors.InvalidSenderError as exc:
            refusal = http_error_for_send_failure(exc)
            if not fix_sender or not isinstance(refusal, BadRequest):  # only a refused sender falls back
                raise refusal from None
            fallback = self._default_sender_or_refuse(f"sender {sender!r} is not authorized")
            self._deliver(outgoing, fallback, reply_to or sender)
        log.info(
            "sent: size=%d recipients=%d attachments=%d",
            len(msg),
            outgoing.recipient_count,
            len(outgoing.attachments),
        )

    def _default_sender_or_refuse(self, why: str) -> str:
        if not self.default_sender:
            raise BadRequest(f"{why} and the proxy has no default sender (GMAIL_DEFAULT_SENDER)")
        return self.default_sender

    def _deliver(self, outgoing: Outgoing, sender: str, reply_to: Optional[str]) -> None:
        try:
            outgoing.to_email_message(sender, reply_to).send()
        except mail_errors.InvalidSenderError:
            raise
        except Exception as exc:
            raise http_error_for_send_failure(exc) from None


def make_app(keys: Iterable, default_sender: Optional[str] = None, **limits) -> Mailer:
    """Build the WSGI app from explicit settings, for embedding and tests.

    The app sends through whatever `mail` stub is registered in apiproxy_stub_map.
    """
    return Mailer(list(keys), default_sender, **limits)


def app_from_environment(environ: Optional[Mapping[str, str]] = None, root: Path = HERE) -> Mailer:
    """Build the app from the environment and key files, setting up local delivery (see configure_delivery)."""
    environ = os.environ if environ is None else environ
    configure_delivery(environ, root)
    return make_app(
        keys_from_environment(environ, root),
        default_sender_from_environment(environ, root),
        require_signature_v2=flag_setting(environ, "GMAIL_REQUIRE_SIGNATURE_V2"),
        # On App Engine many instances serve one proxy: only memcache is shared by all.
        replay_store=MemcacheReplayStore() if on_app_engine(environ) else InProcessReplayStore(),
        max_recipients=int(number_setting(environ, "GMAIL_MAX_RECIPIENTS", DEFAULT_MAX_RECIPIENTS)),
        admission=Admission(int(number_setting(environ, "GMAIL_MAX_INFLIGHT_MB", DEFAULT_MAX_INFLIGHT_MB) * MB)),
    )


def for_app_engine(application: Mailer) -> Callable:
    """Wrap the app for the bundled services (the Mail API) when running on App Engine."""
    if on_app_engine():
        from google.appengine.api import wrap_wsgi_app

        return wrap_wsgi_app(application)
    return application


app = for_app_engine(app_from_environment())  # what `python mailer.py` serves, and any WSGI server


def main(argv: Optional[list[str]] = None) -> int:
    """`python mailer.py [--host H] [--port P] ...` serves the app; `python mailer.py keys ...` manages keys."""
    args = serve.build_parser(HERE).parse_args(argv)
    if args.command == "keys":
        return keys.keys_command(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    application = app if isinstance(app, Mailer) else app_from_environment()
    key_file = keys.default_key_file(HERE)
    if not application.keys and args.create_dev_key:
        keys.write_key_file(key_file, [keys.new_key()])
        application = app_from_environment()
    if not application.keys:
        print(
            "mailer.py: no secret key configured: set GMAIL_SECRET_KEY (one key per line) "
            "or write keys/GMAIL_SECRET_KEY",
            file=sys.stderr,
        )
        return EX_CONFIG

    def banner(port: int) -> str:
        line = (
            f"appengine-mailer {__version__} on http://{args.host}:{port}/ "
            f"({len(application.keys)} key(s), delivery: {delivery_mode()})"
        )
        return line + ("\n" + serve.try_it_text(HERE, args.host, port, key_file) if args.create_dev_key else "")

    return serve.serve(
        for_app_engine(application),
        args.host,
        args.port,
        banner,
        threads=args.threads,
        connection_limit=args.connection_limit,
        timeout=args.timeout,
        max_body=application.max_body,
    )


if __name__ == "__main__":
    sys.exit(main())
