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
from typing import Callable, Iterable, Mapping, Optional, Union

import gmail

try:
    from appengine_mailer import bounce, keys, logs, relay, serve
    from appengine_mailer.admission import DEFAULT_MAX_INFLIGHT_MB, MB, Admission
    from appengine_mailer.check import dry_run
    from appengine_mailer.convert import Outgoing, address_of, choose_sender, default_sender_or_refuse
    from appengine_mailer.delivery import configure_delivery, delivery_mode
    from appengine_mailer.errors import (
        BadRequest,
        Forbidden,
        HTTPError,
        MethodNotAllowed,
        NotFound,
        ServiceUnavailable,
        UnauthorizedSender,
        UnsupportedMediaType,
        http_error_for_send_failure,
    )
    from appengine_mailer.fastparse import parse_message
    from appengine_mailer.form import MAX_BODY_BYTES, body_size, flag, parse_form, read_body
    from appengine_mailer.settings import (
        DEFAULT_MAX_RECIPIENTS,
        EX_CONFIG,
        Key,
        KeySource,
        checked_keys,
        default_sender_from_environment,
        flag_setting,
        key_source,
        number_setting,
        on_app_engine,
    )
    from appengine_mailer.signatures import (
        PENDING,
        SENT,
        InProcessReplayStore,
        MemcacheReplayStore,
        ReplayStore,
        check_senders_allowed,
        check_signature,
        check_signature_v2,
    )
except ImportError as missing:  # run as a command without the SDK: one line that says what to install
    if __name__ != "__main__":
        raise
    print(f"mailer.py: {missing}", file=sys.stderr)
    sys.exit(78)  # EX_CONFIG: the installation is incomplete

__version__ = gmail.__version__

HERE = Path(__file__).resolve().parent  # the deployment: keys/ and outbox/ live beside this file
MAX_REASON = 1000  # characters of a refusal's reason sent back (one may quote a long file name)
# What a route's handler returns: the log verdict, a note, fields to log, and a JSON report (None: 204).
Handled = tuple[str, str, dict, Optional[dict]]


class Mailer:
    """The WSGI callable: POST / sends, POST /check reports without sending, GET / reports health.

    App Engine's bounce notifications arrive at POST /_ah/bounce (see appengine_mailer.bounce).
    """

    def __init__(
        self,
        keys: KeySource,
        default_sender: Optional[str] = None,
        *,
        max_body: int = MAX_BODY_BYTES,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        require_signature_v2: bool = False,
        replay_window: int = gmail.REPLAY_WINDOW_SECONDS,
        replay_store: Optional[ReplayStore] = None,
        bounce_url: Optional[str] = None,
        admission: Optional[Admission] = None,
        clock: Callable[[], float] = time.time,
    ):
        self._keys = keys
        self.default_sender = default_sender
        self.max_body = max_body
        self.max_recipients = max_recipients
        self.require_signature_v2 = require_signature_v2
        self.replay_window = replay_window
        self.replay_store = replay_store if replay_store is not None else InProcessReplayStore()
        self.bounce_url = bounce_url
        self.admission = admission if admission is not None else Admission(DEFAULT_MAX_INFLIGHT_MB * MB)
        self.clock = clock
        self._routes = {"/": self.handle_send, "/check": self.handle_check, "/_ah/bounce": self.handle_bounce}

    @property
    def keys(self) -> list[Key]:
        """The keys valid now (a key file is re-read within seconds of a change)."""
        return self._keys if isinstance(self._keys, list) else self._keys.current()

    def __call__(self, environ: dict, start_response: Callable):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        length = environ.get("CONTENT_LENGTH", "")
        size = int(length) if length.isascii() and length.isdigit() else None
        try:
            handler = self._routes.get(path)
            if handler is None:
                raise NotFound("not found: the proxy serves /, /check and /_ah/bounce")
            if method in ("GET", "HEAD") and path == "/":
                return self._respond(start_response, "200 OK", self.health(), "application/json", method)
            if method != "POST":
                raise MethodNotAllowed(f"method {method[:20]!r} is not allowed: POST to {path}")
            with self.admission.admit(body_size(environ, self.max_body)):  # 503 when too much is in flight
                verdict, note, fields, report = handler(environ)
        except HTTPError as err:
            failed = err.status.startswith("5")
            logs.outcome(
                logging.WARNING if failed else logging.INFO,
                "failed" if failed else "refused",
                err.status,
                err.reason,
                size=size,
            )
            reason = err.reason if len(err.reason) <= MAX_REASON else err.reason[: MAX_REASON - 1] + "…"
            return self._respond(
                start_response, err.status, reason + "\n", "text/plain; charset=utf-8", method, err.headers
            )
        except Exception as exc:  # a bug: answer without a traceback, whose text could quote the message
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            logs.outcome(logging.ERROR, "failed", "500", f"internal error: {where}", size=size)
            return self._respond(
                start_response, "500 Internal Server Error", "internal error\n", "text/plain; charset=utf-8", method
            )
        if report is not None:
            logs.outcome(logging.INFO, verdict, "200", note, size=size, **fields)
            return self._respond(start_response, "200 OK", json.dumps(report) + "\n", "application/json", method)
        logs.outcome(logging.INFO, verdict, "204", note, size=size, **fields)
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
                    "bounces_forwarded": bool(self.bounce_url),
                }
            )
            + "\n"
        )

    # -- POST /: send -------------------------------------------------------

    def handle_send(self, environ: dict) -> Handled:
        fields = self.send(self._read_form(environ))
        return "sent", fields.pop("note", ""), fields, None

    def _read_form(self, environ: dict) -> dict[str, bytes]:
        content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(
                f"content type {content_type or 'missing'!r}: send application/x-www-form-urlencoded"
            )
        return parse_form(read_body(environ, self.max_body))

    def send(self, form: Mapping[str, bytes]) -> dict:
        """Check, convert and send one message; return what to log of it, or raise HTTPError for any refusal."""
        fix_sender = flag(form, "fix_sender")
        replay_key, key = self.authenticate(form, fix_sender)
        if replay_key is None:
            return self._send_message(form["msg"], fix_sender, key)
        ttl = int(form["timestamp"]) + self.replay_window - self.clock() + 1
        state = self.replay_store.claim(replay_key, ttl)
        if state == SENT:
            return {"note": "duplicate of a request already sent within its window, not sent again"}
        if state == PENDING:
            raise ServiceUnavailable("the same request is being sent right now; retry shortly", retry_after=1)
        try:
            outcome = self._send_message(form["msg"], fix_sender, key)
        except BaseException:
            self.replay_store.release(replay_key)  # not sent: a retry must send it
            raise
        self.replay_store.mark_sent(replay_key, ttl)
        return outcome

    def authenticate(self, form: Mapping[str, bytes], fix_sender: bool) -> tuple[Optional[str], bytes]:
        """Check the request's signature (v2 when present, else v1); return the v2 replay key and the key used."""
        if not form.get("msg"):
            raise BadRequest("missing or empty field 'msg'")
        keys = self.keys
        if not keys:
            raise ServiceUnavailable("the proxy has no secret key configured (set GMAIL_SECRET_KEY)")
        if form.get("signature_v2"):
            return check_signature_v2(keys, form, fix_sender, self.clock(), self.replay_window)
        if not form.get("signature"):
            raise BadRequest("missing or empty field 'signature'")
        if self.require_signature_v2:
            raise BadRequest("this proxy requires signature_v2 (with timestamp); upgrade the client or turn it on")
        return None, check_signature(keys, form["msg"], form["signature"])

    def _send_message(self, msg: bytes, fix_sender: bool, key: bytes) -> dict:
        outgoing = Outgoing(parse_message(msg), self.max_recipients)
        sender = choose_sender(outgoing, fix_sender, self.default_sender)
        check_senders_allowed(key, outgoing.identities(sender))
        try:
            self._deliver(outgoing, sender, outgoing.reply_to)
        except UnauthorizedSender:
            if not fix_sender:
                raise
            fallback = default_sender_or_refuse(self.default_sender, f"sender {sender!r} is not authorized")
            check_senders_allowed(key, [address_of(fallback)])
            self._deliver(outgoing, fallback, outgoing.reply_to or sender)
        outcome: dict = {"recipients": outgoing.recipient_count, "attachments": len(outgoing.attachments)}
        if outgoing.headers_dropped:
            outcome["headers_dropped"] = ",".join(outgoing.headers_dropped)[:200]
        refused = relay.log_refused_recipients(outgoing.recipient_count)
        if refused:
            outcome["relay_refused"] = refused
        return outcome

    def _deliver(self, outgoing: Outgoing, sender: str, reply_to: Optional[str]) -> None:
        """Send through the SDK; every failure becomes the HTTPError the client gets."""
        relay.take_refused()
        try:
            outgoing.to_email_message(sender, reply_to).send()
        except Exception as exc:
            raise http_error_for_send_failure(exc) from None

    # -- POST /check: what a send would do ----------------------------------

    def handle_check(self, environ: dict) -> Handled:
        """Authenticate like a send (same 4xx for a bad signature), then report instead of sending."""
        form = self._read_form(environ)
        fix_sender = flag(form, "fix_sender")
        _, key = self.authenticate(form, fix_sender)
        report = dry_run(
            form["msg"],
            key=key,
            fix_sender=fix_sender,
            default_sender=self.default_sender,
            max_recipients=self.max_recipients,
            delivery=delivery_mode(),
        )
        fields = {"would_send": report["would_send"], "problems": len(report["problems"])}
        return "checked", "", fields, report

    # -- POST /_ah/bounce: App Engine's bounce notifications ----------------

    def handle_bounce(self, environ: dict) -> Handled:
        if not on_app_engine():
            raise Forbidden("bounce notifications are taken only on App Engine, from App Engine itself")
        raw_path = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or "/_ah/bounce").split("?")[0]
        if raw_path != "/_ah/bounce":  # app.yaml's login: admin guards this spelling of the path, no other
            raise NotFound("not found: the proxy serves /, /check and /_ah/bounce")
        report = bounce.report(bounce.read_notification(environ, self.max_body))
        if not self.bounce_url:
            return "bounce", bounce.describe(report) + " (GMAIL_BOUNCE_URL is not set: logged only)", {}, None
        keys = self.keys
        if not keys:
            raise ServiceUnavailable("the proxy has no secret key to sign the bounce with (set GMAIL_SECRET_KEY)")
        bounce.forward(report, self.bounce_url, keys[0])
        return "bounce", f"{bounce.describe(report)} forwarded to {bounce.where(self.bounce_url)}", {}, None


def make_app(
    keys: Union[Iterable[Union[bytes, str]], bytes, str], default_sender: Optional[str] = None, **limits
) -> Mailer:
    """Build the WSGI app from explicit settings, for embedding and tests.

    `keys` is one key or several (bytes or str).  A blank key would let anyone
    sign, so it is refused (ValueError); a short one is logged as a warning.
    The app sends through whatever `mail` stub is registered in apiproxy_stub_map.
    """
    return Mailer(checked_keys(keys), default_sender, **limits)


def app_from_environment(environ: Optional[Mapping[str, str]] = None, root: Path = HERE) -> Mailer:
    """Build the app from the environment and key files, setting up local delivery (see configure_delivery)."""
    environ = os.environ if environ is None else environ
    configure_delivery(environ, root)
    return Mailer(
        key_source(environ, root),
        default_sender_from_environment(environ, root),
        require_signature_v2=flag_setting(environ, "GMAIL_REQUIRE_SIGNATURE_V2"),
        # On App Engine many instances serve one proxy: only memcache is shared by all.
        replay_store=MemcacheReplayStore() if on_app_engine(environ) else InProcessReplayStore(),
        max_recipients=int(number_setting(environ, "GMAIL_MAX_RECIPIENTS", DEFAULT_MAX_RECIPIENTS, whole=True)),
        bounce_url=bounce.url_from_environment(environ),
        admission=Admission(int(number_setting(environ, "GMAIL_MAX_INFLIGHT_MB", DEFAULT_MAX_INFLIGHT_MB) * MB)),
    )


def for_app_engine(application: Mailer) -> Callable:
    """The app wrapped for the bundled services (the Mail API, memcache) when it runs on App Engine."""
    if on_app_engine():
        from google.appengine.api import wrap_wsgi_app

        return wrap_wsgi_app(application)
    return application


logs.configure()
proxy = app_from_environment()  # the Mailer itself, for its settings
app = for_app_engine(proxy)  # what `python mailer.py` (waitress) or any WSGI server serves


def main(argv: Optional[list[str]] = None) -> int:
    """`python mailer.py [--host H] [--port P] ...` serves the app; `python mailer.py keys ...` manages keys."""
    args = serve.build_parser(HERE).parse_args(argv)
    if args.command == "keys":
        return keys.keys_command(args)
    application = proxy
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
