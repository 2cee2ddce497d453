#!/usr/bin/env python3
"""gmail.py: send mail through an appengine-mailer proxy.

One stdlib-only file, usable by copying it anywhere with Python 3.9+:

* a library: ``GmailProxy(SECRET_KEY, PROXY_URL).send_mail(message)``, or
  ``send_many(messages)`` for a batch over several connections at once;
* a ``mail(1)``-like command: ``echo body | gmail.py -s Subject you@example.com``;
* ``sendmail(8)`` and ``mailq(1)`` when installed under those names, and an Exim
  pipe transport: ``gmail.py -i -- recipient < message.eml``.

Settings come from arguments, else the environment (GMAIL_PROXY_URL,
GMAIL_SECRET_KEY), else files of those names in /etc/envdir.  The wire protocol
(field names, the signature, the size limit) is defined here once; the server
imports it.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import copy
import errno
import hashlib
import hmac
import http.client
import json
import math
import mimetypes
import os
import socket
import ssl
import stat
import sys
import threading
import time
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import formataddr, getaddresses
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Union
from urllib.parse import quote_plus, urlsplit

try:
    import fcntl
except ImportError:  # not POSIX: everything but the spool still works
    fcntl = None  # type: ignore[assignment]

__version__ = "2.0.0"
__all__ = [
    "ConfigurationError",
    "ConfigurationFailure",
    "GmailProxy",
    "MessageSendingFailure",
    "Outcome",
    "RequestNotVerified",
    "Spool",
    "SpoolBusy",
    "UnsafeSpool",
    "main",
    "sign_v1",
    "sign_v2",
    "verify_request",
]

ENVDIR = "/etc/envdir"
DEFAULT_TIMEOUT = 30.0
# Connections send_many and a spool flush use at once: see bench/README.md for the measurements.
DEFAULT_CONCURRENCY = 8
MAX_SETTING_BYTES = 64 * 1024
MAX_REASON_BYTES = 64 * 1024
MAX_REPORT_BYTES = 1024 * 1024  # a /check report, which lists every attachment and problem
DEFAULT_RETRY_AFTER_SECONDS = 1.0
MAX_RETRY_AFTER_SECONDS = 5.0
REQUEST_HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": f"gmail.py/{__version__}"}
# The server closed or reset the connection after (or while) taking the request.
DROPPED_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

# sysexits.h
EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_IOERR = 0, 64, 65, 66, 74
EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 75, 77, 78


# ---------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------


SIGNATURE_V2_TAG = b"appengine-mailer-v2"
REPLAY_WINDOW_SECONDS = 300
# The proxy refuses (413) a request body over this size before reading it: App Engine's own cap.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES  # a message is never bigger than the request that carries it
# A 400 caused by the client's setup rather than by the message says so in this header, so that
# a client can tell "fix the key, keep the mail" from "this message will never be accepted".
ERROR_HEADER = "X-Appengine-Mailer-Error"
BAD_SIGNATURE = "bad-signature"  # the signature matches none of the proxy's keys
CLOCK_SKEW = "clock-skew"  # the v2 timestamp is outside the replay window: a clock is wrong
NO_DEFAULT_SENDER = "no-default-sender"  # the message needs the proxy's default sender, and it has none


def sign_v1(key: bytes, msg: bytes) -> str:
    """Return the v1 signature: base64(HMAC-SHA1(key, msg)), as the original README defines it."""
    return base64.b64encode(hmac.new(key, msg, hashlib.sha1).digest()).decode("ascii")


def signed_bytes_v2(timestamp: str, fix_sender: bool, msg: bytes) -> bytes:
    """Return the canonical bytes that signature v2 covers.

    The tag, the timestamp and the fix_sender flag ("true"/"false") contain no
    newline, so joining them with LF before the message is unambiguous.
    """
    flag = b"true" if fix_sender else b"false"
    return b"\n".join([SIGNATURE_V2_TAG, timestamp.encode("ascii"), flag, msg])


def sign_v2(key: bytes, timestamp: str, fix_sender: bool, msg: bytes) -> str:
    """Return the v2 signature: lowercase hex HMAC-SHA256 over signed_bytes_v2()."""
    return hmac.new(key, signed_bytes_v2(timestamp, fix_sender, msg), hashlib.sha256).hexdigest()


def encode_form(
    msg: bytes, key: bytes, fix_sender: bool = False, *, timestamp: Optional[float] = None, signature_v1: bool = True
) -> bytes:
    """Return the urlencoded POST body: msg, its signatures (v2, and v1 unless turned off), options.

    Servers that predate v2 ignore its fields and check v1; newer ones check v2
    and refuse a replay of the same request after its window.
    """
    return form_body(msg, **sign_request(msg, key, fix_sender, timestamp=timestamp, signature_v1=signature_v1))


def sign_request(
    msg: bytes, key: bytes, fix_sender: bool = False, *, timestamp: Optional[float] = None, signature_v1: bool = True
) -> dict:
    """Return the signed fields of a request for msg (no secret among them: a spool may keep them)."""
    stamp = str(int(time.time() if timestamp is None else timestamp))
    return {
        "timestamp": stamp,
        "signature": sign_v1(key, msg) if signature_v1 else None,
        "signature_v2": sign_v2(key, stamp, fix_sender, msg),
        "fix_sender": fix_sender,
    }


def form_body(msg: bytes, timestamp: str, signature: Optional[str], signature_v2: str, fix_sender: bool) -> bytes:
    """The bytes urlencode() would give for these fields, built field by field (only msg and v1 need quoting)."""
    fields = [b"msg=" + quote_plus(msg).encode("ascii")]
    if signature is not None:
        fields.append(b"signature=" + quote_plus(signature).encode("ascii"))
    fields.append(b"timestamp=" + timestamp.encode("ascii"))
    fields.append(b"signature_v2=" + signature_v2.encode("ascii"))
    if fix_sender:
        fields.append(b"fix_sender=true")
    return b"&".join(fields)


class RequestNotVerified(ValueError):
    """A signed request (such as a bounce the proxy forwards) failed verification; the message says why."""


def verify_request(form, keys, window: int = REPLAY_WINDOW_SECONDS, *, now: Optional[float] = None) -> bytes:
    """Check a request signed with signature v2 (what the proxy forwards, e.g. bounces); return its msg.

    `form` maps field names to str or bytes (a dict, Django's request.POST, a
    parsed query string's lists); `keys` is one key or several.  Raises
    RequestNotVerified unless the signature matches one of the keys and the
    timestamp is within `window` seconds of `now`.  A repeat within the window
    verifies again: make handling a repeat harmless (the proxy forwards each
    bounce at least once).
    """

    def field(name: str) -> bytes:
        value = form.get(name, b"")
        value = value[-1] if isinstance(value, list) and value else value
        return value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")

    if isinstance(keys, (str, bytes)):
        keys = [keys]
    # Keys as clients read them: outer whitespace (a file's line end) is not part of a key.
    candidates = [(key.encode("utf-8") if isinstance(key, str) else bytes(key)).strip() for key in keys]
    if not candidates or not all(candidates):
        raise ValueError("verify_request needs keys, and a blank key would let anyone sign")
    msg, stamp, signature = field("msg"), field("timestamp"), field("signature_v2").strip().lower()
    if not msg or not signature:
        raise RequestNotVerified("the request has no msg or no signature_v2")
    if not (stamp.isdigit() and len(stamp) <= 12):
        raise RequestNotVerified(f"timestamp {stamp.decode('ascii', 'replace')!r} is not a number of seconds")
    age = (time.time() if now is None else now) - int(stamp)
    if abs(age) > window:
        when = f"{age:.0f} s ago" if age > 0 else f"{-age:.0f} s in the future"
        raise RequestNotVerified(f"the request was signed {when}; requests are valid for {window} s")
    expected = [sign_v2(key, stamp.decode("ascii"), False, msg).encode("ascii") for key in candidates]
    if not any([hmac.compare_digest(digest, signature) for digest in expected]):  # every key, always
        raise RequestNotVerified("the signature does not match under any of the keys")
    return msg


def largest_attachment() -> int:
    """About how many bytes of attachments fit in one request under MAX_REQUEST_BYTES.

    An attachment is base64-encoded (4 characters for 3 bytes, a line break every
    76 characters), then urlencoded: '+' and '/' (2 of every 64 base64 characters,
    for compressed data) and each line break take 3 bytes.  So 57 bytes of
    attachment take 76 + 4.75 + 3 = 83.75 bytes of request: a ratio of 228/335.
    """
    return MAX_REQUEST_BYTES * 228 // 335


def _too_large(size: int, exact: bool = True) -> str:
    """The line that refuses a request of `size` bytes (or more), with the limit and what fits."""
    at_least = "" if exact else "at least "
    return (
        f"message too large: its request would be {at_least}{size} bytes, over the proxy's limit of "
        f"{MAX_REQUEST_BYTES} bytes ({MAX_REQUEST_BYTES >> 20} MiB); attachments of up to about "
        f"{largest_attachment() >> 20} MiB in all fit"
    )


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ConfigurationError(Exception):
    """A setting is missing or unusable; the message names what to set."""


class MessageSendingFailure(Exception):
    """The proxy did not accept the message.

    ``status`` is the HTTP status (None when the proxy could not be reached) and
    ``reason`` the proxy's own explanation.  ``temporary`` says whether trying
    again later may succeed; ``proxy_unavailable`` whether the next message would
    fail the same way right now (a spool flush then stops instead of going on).
    ``retry_after`` is the wait in seconds a 429 or 503 asked for.  On the failure
    that send_many raises, ``outcomes`` holds the Outcome of every message.
    """

    def __init__(self, message: str, status: Optional[int] = None, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after: Optional[float] = None
        self.outcomes: Optional[list[Outcome]] = None

    @property
    def temporary(self) -> bool:
        return self.status is None or self.status >= 500 or self.status in (408, 429)

    @property
    def proxy_unavailable(self) -> bool:
        # Unreachable or timed out, rate limited, or a gateway in front of the proxy with no proxy
        # behind it; any other 5xx is about this message (it backs off alone).
        return self.status is None or self.status in (429, 502, 503, 504)


class ConfigurationFailure(MessageSendingFailure):
    """The proxy refused this client's setup, not the message: a key it does not hold, a clock it
    does not trust, or a URL that redirects.

    Temporary, since fixing the setting makes the same message go through: a spool
    keeps it, the next proxy URL is tried, and the command exits 78, which the
    shipped Exim transport defers instead of bouncing.
    """

    @property
    def temporary(self) -> bool:
        return True

    @property
    def proxy_unavailable(self) -> bool:
        return True


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def find_setting(
    name: str,
    value: Optional[str] = None,
    given_as: str = "",
    environ: Optional[Mapping[str, str]] = None,
    envdir: str = ENVDIR,
) -> tuple[Optional[str], str]:
    """Return a setting and where it came from: `value` (named `given_as`), else env `name`, else envdir/name.

    The second item names what the user set, for error lines: "--url",
    "GMAIL_PROXY_URL" or "/etc/envdir/GMAIL_PROXY_URL".
    """
    if value:
        return value, given_as or name
    environ = os.environ if environ is None else environ
    if environ.get(name, "").strip():
        return environ[name].strip(), name
    path = os.path.join(envdir, name)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_SETTING_BYTES).strip() or None, path
    except FileNotFoundError:
        return None, path
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path} is not UTF-8 text") from None


def read_setting(name: str, value: Optional[str] = None, environ=None, envdir: str = ENVDIR) -> Optional[str]:
    """Return value if given, else env `name`, else the file envdir/name, else None."""
    return find_setting(name, value, "", environ, envdir)[0]


def _first_key(text: str, source: str) -> bytes:
    """Clients sign with the first non-blank line; the server may hold several keys."""
    for line in text.splitlines():
        if line.strip():
            return line.strip().encode("utf-8")
    raise ConfigurationError(f"the secret key from {source} is empty")


def _missing_settings(missing: list[tuple[str, str, str]], envdir: str) -> ConfigurationError:
    """One error naming every missing setting: (what, how to give it, its variable) for each."""
    whats = " and ".join(f"no {what}" for what, _, _ in missing)
    given = " and ".join(option for _, option, _ in missing)
    names = " and ".join(name for _, _, name in missing)
    files = "files" if len(missing) > 1 else "a file"
    return ConfigurationError(f"{whats}: give {given}, or set {names} (in the environment or as {files} in {envdir})")


def message_bytes(msg: Union[Message, bytes, bytearray, str]) -> bytes:
    """Serialize what the caller gave into the exact bytes that are signed and sent."""
    if isinstance(msg, (bytes, bytearray)):
        return bytes(msg)
    if isinstance(msg, str):
        return msg.encode("utf-8")
    if isinstance(msg, Message):
        try:
            return msg.as_bytes()
        except (UnicodeEncodeError, UnicodeDecodeError):
            # Raw non-ASCII header values on a compat32 Message: send them as UTF-8.
            return msg.as_bytes(policy=policy.SMTPUTF8.clone(linesep="\n"))
    raise TypeError(f"send_mail takes an email.message.Message, bytes or str, not {type(msg).__name__}")


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


class Endpoint:
    """One proxy URL, split for http.client; `where` is its host:port for error lines.

    A query (a gateway's token, say) is sent with every request; error lines
    never show it.
    """

    def __init__(self, url: str, source: str = "GMAIL_PROXY_URL"):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts = None
        shown = _without_secrets(url)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"{source} must hold http:// or https:// URLs, not {shown!r}")
        if not url.isascii():
            raise ConfigurationError(f"{source} must be written in ASCII (percent-encode the rest), not {shown!r}")
        if parts.username is not None or parts.password is not None:
            raise ConfigurationError(f"{source} must not hold a user or password ({shown!r})")
        self.url, self.scheme, self.host, self.port = url, parts.scheme, parts.hostname, port
        self.path = parts.path or "/"
        self.query = parts.query
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.where = f"{host}:{port or (443 if self.scheme == 'https' else 80)}"


def _without_secrets(url: str) -> str:
    """A URL as an error line may show it: no user, password or query."""
    head, _, _ = url.partition("?")
    scheme, sep, rest = head.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else head


def parse_proxy_urls(text: str, source: str = "GMAIL_PROXY_URL") -> list:
    """Split GMAIL_PROXY_URL: one URL, or several separated by whitespace or commas (tried in order)."""
    return [Endpoint(url, source) for url in text.replace(",", " ").split()]


class _Deadline:
    """When the exchange under way must be over (time.monotonic()); inf when none is."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = math.inf

    def left(self) -> float:
        """Seconds left, for the next socket operation; socket.timeout once there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return min(left, 1e6)


class _BoundedSocket(socket.socket):
    """A TCP socket whose every send and receive gets only what is left of its deadline.

    A socket timeout alone bounds each wait, so a proxy that drips its answer a
    byte at a time would hold the exchange (and a spool's lock) for ever.
    """

    __slots__ = ("deadline",)
    deadline: _Deadline

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self.settimeout(self.deadline.left())
        return super().recv_into(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self.settimeout(self.deadline.left())
        return super().recv(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        self.settimeout(self.deadline.left())  # sendall's timeout bounds the whole call
        return super().sendall(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        self.settimeout(self.deadline.left())
        return super().send(*args, **kwargs)


class _BoundedTLSSocket(ssl.SSLSocket):
    """The same for TLS (ssl's sendall sends through send(), a chunk at a time)."""

    deadline: Optional[_Deadline] = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.left())

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._arm()
        return super().send(*args, **kwargs)


class _Connection(http.client.HTTPConnection):
    """An HTTP connection that connects, sends and reads within `deadline` (set before each exchange)."""

    def __init__(self, host: str, port: Optional[int], **kwargs: Any):
        self.deadline = _Deadline()
        super().__init__(host, port, **kwargs)

    def connect(self) -> None:
        self.timeout = self.deadline.left()  # connecting (and a TLS handshake) get what is left
        super().connect()
        if isinstance(self.sock, _BoundedTLSSocket):
            self.sock.deadline = self.deadline
        else:
            plain = self.sock
            bounded = _BoundedSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
            bounded.deadline = self.deadline
            self.sock = bounded


class _TLSConnection(_Connection, http.client.HTTPSConnection):
    """The same over TLS, with certificates verified by the default context."""

    def __init__(self, host: str, port: Optional[int]):
        context = ssl.create_default_context()
        context.sslsocket_class = _BoundedTLSSocket
        super().__init__(host, port, context=context)


class _Answer(NamedTuple):
    status: int
    reason: str
    retry_after: float
    location: str
    error: str  # the ERROR_HEADER value: what kind of refusal this is
    body: bytes = b""  # a 2xx answer's body (the /check report)


class Outcome(NamedTuple):
    """What became of one message given to send_many: sent, queued for a later flush, or failed.

    True in a boolean context exactly when send_mail would have returned True: the
    proxy accepted the message (`sent`), or it waits in the spool as entry `queued`.
    `failure` says why it was not sent (also when it was queued); None when sent.
    """

    sent: bool
    queued: Optional[str] = None
    failure: Optional[MessageSendingFailure] = None

    def __bool__(self) -> bool:
        return self.sent or self.queued is not None


class GmailProxy:
    """Send messages to an appengine-mailer proxy over one kept-alive HTTP connection.

    With several proxy URLs, a temporary failure on one tries the next.  With a
    queue_dir, a message that still fails temporarily is spooled there (see
    Spool) instead of failing, and send_mail returns True: it will be sent by a
    later flush.  `last_queued` then names its spool entry and `last_failure`
    says why.  `timeout` bounds each exchange with one proxy URL, from
    connecting to the end of its answer (a retry included).  `given_as` names
    secret_key and proxy_url in error lines (the command line passes its options).
    send_many sends a batch over several connections at once.  A GmailProxy is
    used by one thread at a time: send_many makes its own threads.
    """

    def __init__(
        self,
        secret_key: Union[str, bytes, None] = None,
        proxy_url: Optional[str] = None,
        fix_sender: bool = False,
        fail_silently: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        signature_v1: bool = True,
        queue_dir: Optional[str] = None,
        envdir: str = ENVDIR,
        environ: Optional[Mapping[str, str]] = None,
        given_as: Optional[Mapping[str, str]] = None,
    ):
        if isinstance(secret_key, bytes):
            secret_key = secret_key.decode("utf-8")
        labels = {"secret_key": "secret_key", "proxy_url": "proxy_url", **(given_as or {})}
        key, self.key_source = find_setting("GMAIL_SECRET_KEY", secret_key, labels["secret_key"], environ, envdir)
        url, self.url_source = find_setting("GMAIL_PROXY_URL", proxy_url, labels["proxy_url"], environ, envdir)
        missing = [
            (what, labels[option], name)
            for what, option, name, value in (
                ("secret key", "secret_key", "GMAIL_SECRET_KEY", key),
                ("proxy URL", "proxy_url", "GMAIL_PROXY_URL", url),
            )
            if not value
        ]
        if missing:
            raise _missing_settings(missing, envdir)
        assert key is not None and url is not None
        self.key = _first_key(key, self.key_source)
        self.endpoints = parse_proxy_urls(url, self.url_source)
        if not self.endpoints:
            raise ConfigurationError(f"{self.url_source} holds no URL")
        if not timeout > 0:
            raise ConfigurationError(f"the timeout must be a positive number of seconds, not {timeout!r}")
        self.url = self.endpoints[0].url
        self.fix_sender = fix_sender
        self.fail_silently = fail_silently
        self.timeout = timeout
        self.signature_v1 = signature_v1
        self.spool = Spool(queue_dir) if queue_dir else None
        self.last_queued: Optional[str] = None
        self.last_failure: Optional[MessageSendingFailure] = None
        self._endpoint = self.endpoints[0]
        self._conn: Optional[_Connection] = None
        self._helpers: list[GmailProxy] = []  # idle copies with their own connections, for send_many

    # -- connection -------------------------------------------------------

    def _connection(self) -> _Connection:
        if self._conn is None:
            endpoint = self._endpoint
            if endpoint.scheme == "https":
                self._conn = _TLSConnection(endpoint.host, endpoint.port)
            else:
                self._conn = _Connection(endpoint.host, endpoint.port)
        return self._conn

    def open(self) -> bool:
        """Connect now rather than at the first send; True if a new connection was made.

        Raises MessageSendingFailure when the proxy cannot be reached (or returns
        False with fail_silently).
        """
        if self._conn is not None and self._conn.sock is not None:
            return False
        try:
            conn = self._connection()
            conn.deadline.at = time.monotonic() + self.timeout
            conn.connect()
        except OSError as exc:
            self.close()
            if self.fail_silently:
                return False
            raise MessageSendingFailure(
                f"could not reach the proxy at {self._endpoint.where}: {_describe(exc)}"
            ) from exc
        return True

    def close(self) -> None:
        """Close the kept-alive connections, if any; sending again reopens them."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        helpers, self._helpers = self._helpers, []
        for helper in helpers:
            helper.close()

    def __enter__(self) -> GmailProxy:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- sending ----------------------------------------------------------

    def send_mail(self, msg: Union[Message, bytes, str]) -> bool:
        """Send one message; True when the proxy accepted it (or, with a queue_dir, spooled it).

        Raises MessageSendingFailure on any refusal or network trouble, unless the
        proxy was made with fail_silently=True, in which case it returns False.
        """
        self.last_queued, self.last_failure = None, None
        try:
            raw = message_bytes(msg)
            if len(raw) > MAX_REQUEST_BYTES:  # no need to encode it to know
                raise MessageSendingFailure(_too_large(len(raw), exact=False), status=413, reason="too large")
            try:
                self.send_signed(encode_form(raw, self.key, self.fix_sender, signature_v1=self.signature_v1))
            except MessageSendingFailure as failure:
                if self.spool is None or not failure.temporary:
                    raise
                self.last_queued = _queue_or_fail(self.spool, raw, self.fix_sender, failure)
                self.last_failure = failure
            return True
        except MessageSendingFailure:
            if self.fail_silently:
                return False
            raise

    def check(self, msg: Union[Message, bytes, str]) -> dict:
        """Ask the proxy what sending `msg` would do (POST /check); return its report. Nothing is sent.

        The report says whether it `would_send`, lists every refusal a send
        would get under `problems`, and shows the sender, recipients, dropped
        headers and attachments as the Mail API would deliver them.  Raises
        MessageSendingFailure as send_mail does (fail_silently aside), for
        instance a 400 for a wrong key.
        """
        raw = message_bytes(msg)
        answer = self.send_signed(encode_form(raw, self.key, self.fix_sender, signature_v1=self.signature_v1), "check")
        try:
            report = json.loads(answer.body)
        except ValueError:
            report = None
        if not isinstance(report, dict) or "would_send" not in report:
            raise MessageSendingFailure(
                f"the proxy at {self._endpoint.where} answered /check with {answer.status} but no report",
                status=answer.status,
            )
        return report

    def send_many(
        self, messages: Iterable[Union[Message, bytes, str]], concurrency: Optional[int] = None
    ) -> list[Outcome]:
        """Send many messages over up to `concurrency` kept-alive connections at once (default
        DEFAULT_CONCURRENCY); return one Outcome per message, in the order given.

        Each message gets what send_mail promises: the same signed request (resent
        unchanged when a connection drops or the proxy answers 503, so a v2 proxy
        never sends it twice), failover to the next proxy URL, and with a queue_dir
        a temporary failure queues it.  One request goes first, then up to
        `concurrency` at once.  A 429 or 503 lowers the concurrency for the rest of
        the batch, waits out Retry-After and sends that message again.  A refusal
        of one message never stops the others; an unavailable proxy (unreachable,
        timed out, still 429 or 503 at one connection, 502, 504, or refusing this
        setup) stops the batch: the messages not tried yet get the same failure,
        or are queued.  Queued entries are written in the order given.

        Once every message has been dealt with, the first failure (in the order
        given) is raised, its `outcomes` holding every Outcome, unless the proxy
        was made with fail_silently=True.
        """
        workers = _concurrency(DEFAULT_CONCURRENCY if concurrency is None else concurrency)
        raws = [message_bytes(msg) for msg in messages]
        failures: list[Optional[MessageSendingFailure]] = [None] * len(raws)
        signed: list[Optional[tuple[float, bytes]]] = [None] * len(raws)
        jobs = []
        for index, raw in enumerate(raws):
            if len(raw) > MAX_REQUEST_BYTES:  # no need to encode it to know
                failures[index] = MessageSendingFailure(_too_large(len(raw), exact=False), 413, "too large")
            else:
                jobs.append(index)

        def prepare(index: int) -> bytes:
            stamp, body = signed[index] or (-math.inf, b"")
            if time.time() - stamp > REUSE_SIGNATURE_SECONDS:  # only a long wait makes a body too old to resend
                stamp = time.time()
                body = encode_form(
                    raws[index], self.key, self.fix_sender, timestamp=stamp, signature_v1=self.signature_v1
                )
                signed[index] = (stamp, body)
            return body

        def finish(index: int, failure: Optional[MessageSendingFailure]) -> None:
            failures[index], signed[index] = failure, None

        batch = _Batch(self, workers)
        for index, dealt in zip(jobs, batch.run(jobs, prepare, finish)):
            if not dealt:
                failures[index] = batch.stopped_by
        outcomes = [self._outcome(raw, failure) for raw, failure in zip(raws, failures)]
        first = next((outcome.failure for outcome in outcomes if not outcome), None)
        if first is not None and not self.fail_silently:
            first.outcomes = outcomes
            raise first
        return outcomes

    def _outcome(self, raw: bytes, failure: Optional[MessageSendingFailure]) -> Outcome:
        if failure is None:
            return Outcome(True)
        if self.spool is None or not failure.temporary:
            return Outcome(False, None, failure)
        try:
            return Outcome(False, _queue_or_fail(self.spool, raw, self.fix_sender, failure), failure)
        except MessageSendingFailure as unqueued:
            return Outcome(False, None, unqueued)

    def _borrow(self, count: int) -> list[GmailProxy]:
        """Copies of this proxy, each with its own connection, for a batch's workers (idle ones first)."""
        helpers, self._helpers = self._helpers[:count], self._helpers[count:]
        while len(helpers) < count:
            helper = copy.copy(self)
            helper._conn, helper._helpers, helper.spool = None, [], None
            helpers.append(helper)
        return helpers

    def send_signed(self, body: bytes, route: str = "") -> _Answer:
        """POST a signed form body, trying each proxy URL in turn while failures are temporary.

        The URL that last worked is tried first next time.  A body over the
        proxy's limit is refused here, before anything is sent.  `route` is a
        path below the proxy's URL ("check"); the default is the URL itself.
        """
        if len(body) > MAX_REQUEST_BYTES:
            raise MessageSendingFailure(_too_large(len(body)), status=413, reason="too large")
        failures: list[MessageSendingFailure] = []
        start = self.endpoints.index(self._endpoint)
        for offset in range(len(self.endpoints)):
            endpoint = self.endpoints[(start + offset) % len(self.endpoints)]
            if endpoint is not self._endpoint:
                self.close()
                self._endpoint = endpoint
            try:
                return self._post(body, route)
            except MessageSendingFailure as exc:
                if not exc.temporary:
                    raise
                failures.append(exc)
        # Every URL failed: a setup problem is what the user can act on, so it wins.
        raise next((f for f in failures if isinstance(f, ConfigurationFailure)), failures[-1])

    def _post(self, body: bytes, route: str = "") -> _Answer:
        """POST the signed body to the current URL within one `timeout`; retry it once, unchanged,
        on a dropped connection or a 503 while time is left.

        Resending the same signed request is safe: a v2 server answers a repeat
        of a request it already sent with 204 and does not send it again.
        """
        where = self._endpoint.where
        deadline = time.monotonic() + self.timeout
        for attempt in (1, 2):
            try:
                answer = self._exchange(body, deadline, route)
            except DROPPED_CONNECTION as exc:
                self.close()
                if attempt == 1 and time.monotonic() < deadline:
                    continue
                raise MessageSendingFailure(f"the proxy at {where} dropped the connection: {_describe(exc)}") from exc
            except socket.timeout as exc:
                self.close()
                raise MessageSendingFailure(
                    f"the proxy at {where} timed out: no complete answer within {self.timeout:g} s"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise MessageSendingFailure(f"could not reach the proxy at {where}: {_describe(exc)}") from exc
            if 200 <= answer.status < 300:
                return answer
            if answer.status == 503 and attempt == 1:
                pause = min(answer.retry_after, MAX_RETRY_AFTER_SECONDS)
                if time.monotonic() + pause < deadline:
                    time.sleep(pause)
                    continue
            failure = self._failure(answer, route)
            if answer.status in (429, 503):
                failure.retry_after = answer.retry_after
            raise failure
        raise AssertionError("the second attempt always returns or raises")

    def _exchange(self, body: bytes, deadline: float, route: str = "") -> _Answer:
        conn = self._connection()
        conn.deadline.at = deadline
        endpoint = self._endpoint
        path = endpoint.path.rstrip("/") + "/" + route if route else endpoint.path
        path += "?" + endpoint.query if endpoint.query else ""
        try:
            conn.request("POST", path, body, REQUEST_HEADERS)
        except DROPPED_CONNECTION:
            # A proxy may refuse a body from its Content-Length (413) and close before taking it
            # all: its answer is then waiting to be read, and it is what the user must see.
            try:
                response = conn.getresponse()
            except (OSError, http.client.HTTPException):
                response = None
            if response is None:
                raise
            response.will_close = True
        else:
            response = conn.getresponse()
        text = response.read(MAX_REPORT_BYTES + 1)
        if len(text) > MAX_REPORT_BYTES or response.will_close:
            self.close()
        if 200 <= response.status < 300:
            return _Answer(response.status, "", 0.0, "", "", text[:MAX_REPORT_BYTES])
        return _Answer(
            response.status,
            _one_line(text[:MAX_REASON_BYTES].decode("utf-8", "replace"), 500),
            _retry_after(response.getheader("Retry-After")),
            _one_line(response.getheader("Location") or "", 300),
            _one_line(response.getheader(ERROR_HEADER) or "", 40).lower(),
        )

    def _failure(self, answer: _Answer, route: str = "") -> MessageSendingFailure:
        """Say what a refusal means, and whether it is the message's fault or the setup's."""
        where, status, reason = self._endpoint.where, answer.status, answer.reason
        said = f"{status} {reason}".rstrip()
        if 300 <= status < 400:
            target = repr(answer.location) if answer.location else "an address it does not give"
            return ConfigurationFailure(
                f"the proxy at {where} redirects to {target} ({said}): set {self.url_source} to the URL to use",
                status,
                reason,
            )
        if answer.error == BAD_SIGNATURE:
            return ConfigurationFailure(
                f"the proxy at {where} does not hold the secret key from {self.key_source} ({said})", status, reason
            )
        if answer.error == CLOCK_SKEW:
            return ConfigurationFailure(
                f"the proxy at {where} does not trust this machine's clock ({said})", status, reason
            )
        if answer.error == NO_DEFAULT_SENDER:
            return ConfigurationFailure(
                f"the proxy at {where} has no default sender to send this from ({said}): set GMAIL_DEFAULT_SENDER "
                f"on the proxy, or give the message a From (-r)",
                status,
                reason,
            )
        if status in (404, 405, 415) and not route:  # not the proxy's URL: its path, or not a proxy at all
            return ConfigurationFailure(
                f"the proxy at {where} does not take mail at this URL ({said}): set {self.url_source} to the "
                f"proxy's own URL",
                status,
                reason,
            )
        if status == 413:
            return MessageSendingFailure(
                f"the proxy at {where} refused the message as too large ({said}); attachments of up to about "
                f"{largest_attachment() >> 20} MiB in all fit its usual {MAX_REQUEST_BYTES >> 20} MiB limit",
                status,
                reason,
            )
        if status == 404 and route:
            return MessageSendingFailure(
                f"the proxy at {where} has no /{route} ({said}): it is older than this client", status, reason
            )
        return MessageSendingFailure(f"the proxy at {where} refused the message: {said}", status, reason)


def _concurrency(value: int) -> int:
    """A number of connections at once, checked: a whole number of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"the concurrency must be a whole number of at least 1, not {value!r}")
    return value


class _Batch:
    """Many requests over up to `concurrency` kept-alive connections, each worker thread with its own.

    Slow start: one request goes first, so a proxy that is down, or refuses this
    setup, costs one request rather than one per connection, and the workers
    start at the proxy URL that answered.  Once the proxy has answered anything
    but "unavailable", up to `concurrency` requests go at once.

    Back-pressure: a 429 or a 503 (which send_signed already retried once) means
    "slower": the concurrency drops to half the requests then under way, for the
    rest of the batch (once per wave of requests), every worker waits out the
    Retry-After, and the same request is sent again.  At one connection, or with
    a Retry-After longer than MAX_RETRY_AFTER_SECONDS, the proxy is unavailable.

    An unavailable proxy stops the batch: requests under way finish, no other
    starts, and `stopped_by` says why.
    """

    def __init__(self, proxy: GmailProxy, concurrency: int):
        self.proxy = proxy
        self.limit = concurrency  # requests at once, once the proxy has answered (`opened`)
        self.opened = False
        self.active = 0
        self.wave = 0  # bumped at each lowering: the answers to requests sent before it lower nothing
        self.resume_at = 0.0  # time.monotonic() before which no request starts (Retry-After)
        self.endpoint = proxy._endpoint  # the URL that last worked: where workers send
        self.stopped_by: Optional[MessageSendingFailure] = None
        self.error: Optional[BaseException] = None  # raised by prepare or finish: ends the batch, then raised
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()

    def run(
        self,
        jobs: list,
        prepare: Callable[[Any], Optional[bytes]],
        finish: Callable[[Any, Optional[MessageSendingFailure]], None],
    ) -> list[bool]:
        """Send each job; return, for each, whether it was dealt with (False: not tried, the batch stopped).

        prepare(job) gives the body to send (again, after back-pressure), or None
        when the job needs no request; finish(job, failure) is then told, once,
        how the proxy answered (failure None: accepted).  Both run in the workers.
        """
        self._pending.extend(range(len(jobs)))
        dealt = [False] * len(jobs)
        count = min(self.limit, len(jobs))
        if count <= 1:
            self._work(self.proxy, jobs, dealt, prepare, finish)
        else:
            helpers = self.proxy._borrow(count - 1)
            threads = [
                threading.Thread(target=self._work, args=(worker, jobs, dealt, prepare, finish), daemon=True)
                for worker in (self.proxy, *helpers)
            ]
            for thread in threads:
                thread.start()
            try:
                for thread in threads:
                    thread.join()
            except BaseException as exc:  # interrupted: requests under way finish, no other starts
                with self._cond:
                    self.error = self.error or exc
                    self._cond.notify_all()
                raise
            self.proxy._helpers.extend(helpers)
        self._use(self.proxy, self.endpoint)
        if self.error is not None:
            raise self.error
        return dealt

    def _work(self, worker: GmailProxy, jobs: list, dealt: list, prepare: Callable, finish: Callable) -> None:
        holding = False
        try:
            while True:
                with self._cond:
                    index = self._take()
                    if index is None:
                        return
                    holding, wave = True, self.wave
                failure = None
                body = prepare(jobs[index])
                if body is not None:
                    self._use(worker, self.endpoint)
                    try:
                        worker.send_signed(body)
                    except MessageSendingFailure as exc:
                        failure = exc
                with self._cond:
                    self.active -= 1
                    holding = False
                    again = body is not None and self._again(worker, failure, wave)
                    if again:
                        self._pending.appendleft(index)  # oldest first still
                    self._cond.notify_all()
                if not again:
                    dealt[index] = True
                    if body is not None:
                        finish(jobs[index], failure)
        except BaseException as exc:
            with self._cond:
                self.active -= holding
                self.error = self.error or exc
                self._cond.notify_all()

    def _take(self) -> Optional[int]:
        """Wait (holding the lock) for a job and a free connection; None when none is left or the batch stopped."""
        while self.stopped_by is None and self.error is None and (self._pending or self.active):
            pause = self.resume_at - time.monotonic()
            if self._pending and pause <= 0 and self.active < (self.limit if self.opened else 1):
                self.active += 1
                return self._pending.popleft()
            self._cond.wait(pause if pause > 0 else None)
        return None

    def _again(self, worker: GmailProxy, failure: Optional[MessageSendingFailure], wave: int) -> bool:
        """Take in one answer (holding the lock); True when the request is to be sent again, slower."""
        if failure is None or not failure.proxy_unavailable:
            self.opened = True  # the proxy answers
            if failure is None:
                self.endpoint = worker._endpoint
            return False
        wait = DEFAULT_RETRY_AFTER_SECONDS if failure.retry_after is None else failure.retry_after
        lower = (self.limit if self.opened else 1) > 1 or wave != self.wave  # sent when more were under way
        if failure.status in (429, 503) and lower and wait <= MAX_RETRY_AFTER_SECONDS and self.stopped_by is None:
            if wave == self.wave:
                self.limit = max(1, min(self.limit, self.active + 1) // 2)
                self.wave += 1
            self.resume_at = max(self.resume_at, time.monotonic() + wait)
            return True
        if self.stopped_by is None:
            self.stopped_by = failure
        return False

    @staticmethod
    def _use(worker: GmailProxy, endpoint: Endpoint) -> None:
        if worker._endpoint is not endpoint:
            worker.close()
            worker._endpoint = endpoint


def _queue_or_fail(spool: Spool, raw: bytes, fix_sender: bool, failure: Exception) -> str:
    """Spool a message that could not be sent; return its entry name.

    If it cannot be queued either, the caller must keep the message: raise the
    original kind of failure, saying both things.
    """
    try:
        return spool.add(raw, fix_sender, str(failure))
    except OSError as exc:
        text = f"{failure}; and it could not be queued in {spool.path}: {_describe(exc)}"
        if isinstance(failure, MessageSendingFailure):
            raise type(failure)(text, failure.status, failure.reason) from exc
        raise ConfigurationError(text) from exc


def _one_line(text: str, limit: int) -> str:
    """Text from the network as one printable line of at most `limit` characters."""
    return " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 4]).split())[:limit]


def _retry_after(value: Optional[str]) -> float:
    """Seconds from a Retry-After header (a number; an HTTP date counts as the default)."""
    try:
        seconds = float(value) if value else DEFAULT_RETRY_AFTER_SECONDS
    except ValueError:
        return DEFAULT_RETRY_AFTER_SECONDS
    return max(0.0, seconds) if math.isfinite(seconds) else DEFAULT_RETRY_AFTER_SECONDS


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------
# Spool: nothing is lost through an outage
# ---------------------------------------------------------------------------

FIRST_RETRY_SECONDS = 60
MAX_RETRY_SECONDS = 4 * 3600
DEFAULT_MAX_AGE_SECONDS = 5 * 24 * 3600
# A stored signature is resent unchanged while the server still accepts it, so a
# message whose 204 was lost is answered from the server's memory, not sent again.
REUSE_SIGNATURE_SECONDS = REPLAY_WINDOW_SECONDS - 60
# tmp/ holds a file only while it is written; one older than this is a crash's leftover.
TMP_MAX_AGE_SECONDS = 3600
MAX_META_BYTES = 64 * 1024
MAX_ENTRY_BYTES = MAX_REQUEST_BYTES + MAX_META_BYTES

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW | _O_CLOEXEC
# Never follow a link; never block on a pipe someone put there.
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
SPOOL_SUPPORTED = bool(
    fcntl is not None and _O_NOFOLLOW and hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd
)
_META_NUMBERS = ("queued_at", "next_try")


class SpoolBusy(Exception):
    """Another flush holds the spool's lock."""


class UnsafeSpool(OSError):
    """The spool's folder is not this user's alone (exit 74): others could read or plant messages."""


class DamagedEntry(Exception):
    """A file in the spool is not an entry gmail.py can send; the message says what is wrong."""


class _Folders(NamedTuple):
    """The spool's open folders: every operation is relative to them, so nothing is reached through a link."""

    root: int
    new: int
    tmp: int
    failed: int


class Spool:
    """A Maildir-style queue of messages waiting for the proxy, flushed oldest first.

    Each entry is one file in new/: a JSON line of bookkeeping (queued time,
    size, attempts, next try, last error, and the signed fields of the last
    attempt), then the message.  Files are written to tmp/ (created exclusively,
    never through a link), fsynced and renamed, so a crash never leaves half an
    entry; an entry is deleted only after the proxy accepted it.  Refused,
    expired or damaged entries move to failed/ with a .reason file.  The folders
    must belong to this user and be writable by nobody else (else UnsafeSpool).
    No secret key is ever written here; file names come from the time and pid.
    """

    def __init__(self, path):
        if not SPOOL_SUPPORTED:
            raise ConfigurationError("the spool needs a POSIX system (fcntl, O_NOFOLLOW, dir_fd)")
        self.path = os.path.abspath(path)
        self.new, self.tmp, self.failed = (os.path.join(self.path, d) for d in ("new", "tmp", "failed"))
        self.stopped_by: Optional[MessageSendingFailure] = None

    # -- folders and files ---------------------------------------------------

    @contextlib.contextmanager
    def _folders(self, create: bool = True) -> Iterator[Optional[_Folders]]:
        """Open (and make, 0700) the spool's folders after checking they are this user's alone.

        Without create, a spool that does not exist yet gives None.
        """
        opened: list[int] = []
        try:
            if create:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                opened.append(self._open_folder(self.path, None, create))
            except FileNotFoundError:
                if create:
                    raise
            if not opened:
                yield None
                return
            for name in ("new", "tmp", "failed"):
                opened.append(self._open_folder(name, opened[0], True))
            yield _Folders(*opened)
        finally:
            for fd in opened:
                os.close(fd)

    def _open_folder(self, name: str, parent: Optional[int], create: bool) -> int:
        shown = name if parent is None else os.path.join(self.path, name)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR) and _is_link(name, parent):
                raise UnsafeSpool(f"spool folder {shown} is a symbolic link: refusing to follow it") from None
            raise OSError(exc.errno, exc.strerror, shown) from None
        info = os.fstat(fd)
        problem = None
        if info.st_uid != os.geteuid():
            problem = f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
        elif info.st_mode & 0o022:
            problem = f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 700 {shown}"
        if problem:
            os.close(fd)
            raise UnsafeSpool(f"spool folder {shown} {problem}: refusing to use it")
        return fd

    def _put(self, folders: _Folders, folder: int, name: str, data: bytes, sync: bool = False) -> None:
        """Write a file atomically: exclusively created in tmp/ under a fresh name, fsynced, renamed.

        A failed write (a full disk) leaves nothing behind in tmp/.
        """
        temporary = f"{name}.{os.getpid()}.{os.urandom(6).hex()}"
        fd = os.open(temporary, _CREATE_FLAGS, 0o600, dir_fd=folders.tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temporary, name, src_dir_fd=folders.tmp, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folders.tmp)
            raise
        if sync:
            os.fsync(folder)

    def _read_small(self, folder: int, name: str, limit: int) -> Optional[bytes]:
        """A small bookkeeping file's bytes, or None if it is missing or not a plain file."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=folder)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read(limit)

    def _load(self, folder: int, name: str) -> tuple[dict, bytes]:
        """Read one entry without following a link or blocking; raise DamagedEntry if it is not sendable."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=folder)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise DamagedEntry("a symbolic link, not a spool entry (not followed)") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise DamagedEntry("not a regular file")
            if info.st_size > MAX_ENTRY_BYTES:
                raise DamagedEntry(f"{info.st_size} bytes, more than any spool entry holds")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(MAX_ENTRY_BYTES + 1)
        finally:
            os.close(fd)
        end = data.find(b"\n", 0, MAX_META_BYTES)
        if end == -1:
            raise DamagedEntry("no bookkeeping line: not a gmail.py spool entry")
        try:
            meta = json.loads(data[:end])
        except (ValueError, RecursionError):
            raise DamagedEntry("its first line is not gmail.py's bookkeeping") from None
        problem = _bookkeeping_problem(meta)
        if problem:
            raise DamagedEntry(f"incomplete bookkeeping: {problem}")
        raw = data[end + 1 :]
        if "size" in meta and len(raw) != meta["size"]:
            raise DamagedEntry(f"truncated: {len(raw)} of its {meta['size']} bytes")
        if not raw.strip():
            raise DamagedEntry("no message")
        return meta, raw

    @staticmethod
    def _names(folder: int, skip_reasons: bool = False) -> list:
        return sorted(
            n for n in os.listdir(folder) if not n.startswith(".") and not (skip_reasons and n.endswith(".reason"))
        )

    def names(self) -> list:
        """The entries waiting in new/, oldest first."""
        with self._folders(create=False) as folders:
            return self._names(folders.new) if folders else []

    # -- queueing ------------------------------------------------------------

    def add(self, raw: bytes, fix_sender: bool, reason: str) -> str:
        """Queue a message; return its entry name."""
        name = f"{time.time_ns():020d}.{os.getpid()}.{os.urandom(4).hex()}"
        meta = {
            "queued_at": time.time(),
            "size": len(raw),
            "attempts": 0,
            "next_try": 0,
            "last_error": reason,
            "fix_sender": fix_sender,
            "signed": None,
        }
        with self._folders() as folders:
            assert folders is not None
            self._put(folders, folders.new, name, _entry(meta, raw), sync=True)
        return name

    # -- flushing ------------------------------------------------------------

    def flush(
        self, proxy: GmailProxy, max_age: float = DEFAULT_MAX_AGE_SECONDS, concurrency: int = DEFAULT_CONCURRENCY
    ) -> dict:
        """Send what is due, oldest first, over up to `concurrency` connections at once; return counts by outcome.

        A temporary failure backs that message off (1 minute, doubling, at most 4
        hours).  If the proxy itself is unavailable (unreachable, 429 or 503 even at
        one connection, 502, 504) the run ends there, `stopped_by` says why, and the
        next flush waits as long; a failure of one message (a 500) lets the run go
        on.  As in GmailProxy.send_many, one message goes first, and a 429 or 503
        lowers the concurrency before it ends the run.  A refusal of this client's
        setup (ConfigurationFailure) ends the run without a back-off, so the first
        flush after the fix sends everything.  Damaged entries move to failed/ and
        the rest still flows.  Raises SpoolBusy if another flush is running.
        """
        self.stopped_by = None
        workers = _concurrency(concurrency)
        report = {"sent": 0, "failed": 0, "deferred": 0, "waiting": 0}
        with self._folders() as folders, self._locked(folders):
            assert folders is not None
            self._clean_tmp(folders)
            now = time.time()
            names = self._names(folders.new)
            if now < self._retry_at(folders):
                report["waiting"] = len(names)
                return report
            jobs = [_FlushJob(name) for name in names]
            batch = _Batch(proxy, workers)
            dealt = batch.run(
                jobs,
                lambda job: self._prepare(folders, proxy, job, now, max_age),
                lambda job, failure: self._finish(folders, job, failure),
            )
            for job, done in zip(jobs, dealt):
                outcome = job.outcome if done else "waiting"  # not tried: the run stopped
                if outcome:
                    report[outcome] += 1
            self.stopped_by = batch.stopped_by
            if self.stopped_by is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink("retry-at", dir_fd=folders.root)
            else:
                stopper = next((job for job in jobs if job.failure is self.stopped_by), None)
                if stopper is not None and stopper.meta and stopper.meta["next_try"] > now:
                    self._put_if_possible(folders, folders.root, "retry-at", b"%.0f\n" % stopper.meta["next_try"])
        return report

    @contextlib.contextmanager
    def _locked(self, folders: Optional[_Folders]) -> Iterator[None]:
        assert folders is not None and fcntl is not None
        try:
            fd = os.open(".lock", os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=folders.root)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise UnsafeSpool(f"{self.path}/.lock is a symbolic link: refusing to follow it") from None
            raise OSError(exc.errno, exc.strerror, os.path.join(self.path, ".lock")) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SpoolBusy(f"another flush of {self.path} is running") from None
            yield
        finally:
            os.close(fd)

    def _prepare(
        self, folders: _Folders, proxy: GmailProxy, job: _FlushJob, now: float, max_age: float
    ) -> Optional[bytes]:
        """The request for an entry that is due, or None (an entry gone, damaged, expired or backed off).

        Its signed fields are reused while the proxy still accepts them, else signed
        afresh and recorded before sending, so a rerun resends these exact bytes.
        """
        if job.meta is None:
            try:
                job.meta, job.raw = self._load(folders.new, job.name)
            except FileNotFoundError:
                return None  # sent by a flush that ran before us
            except DamagedEntry as damage:
                job.outcome = "failed" if self._set_aside(folders, job.name, f"damaged spool entry: {damage}") else None
                return None
            queued_at, last_error = job.meta["queued_at"], job.meta["last_error"]
            if now - queued_at > max_age:
                reason = f"expired: queued {(now - queued_at) / 86400:.1f} days ago; last error: {last_error}"
                job.outcome = "failed" if self._set_aside(folders, job.name, reason) else None
            elif job.meta["next_try"] > now:
                job.outcome = "waiting"
            if job.outcome:
                job.raw = b""
                return None
        meta, raw = job.meta, job.raw
        signed = meta["signed"]
        if not signed or time.time() - int(signed["timestamp"]) > REUSE_SIGNATURE_SECONDS:
            signed = sign_request(raw, proxy.key, meta["fix_sender"], signature_v1=proxy.signature_v1)
            meta["signed"] = signed
            # Recorded before sending, so a rerun resends these exact bytes.  On a full disk it
            # is sent all the same: delivering beats the small risk of a duplicate after a crash.
            self._put_if_possible(folders, folders.new, job.name, _entry(meta, raw))
        return form_body(raw, signed["timestamp"], signed["signature"], signed["signature_v2"], signed["fix_sender"])

    def _finish(self, folders: _Folders, job: _FlushJob, failure: Optional[MessageSendingFailure]) -> None:
        """Settle an entry the proxy answered for: deleted once accepted, set aside if refused, else backed off."""
        meta, raw = job.meta, job.raw
        assert meta is not None
        job.failure, job.raw = failure, b""
        if failure is None:
            os.unlink(job.name, dir_fd=folders.new)
            job.outcome = "sent"
        elif not failure.temporary:
            self._set_aside(folders, job.name, str(failure))
            job.outcome = "failed"
        else:
            meta["last_error"] = str(failure)
            if isinstance(failure, ConfigurationFailure):
                meta["signed"] = None  # refused for its key or clock, so never sent: sign afresh after the fix
            if not isinstance(failure, ConfigurationFailure):  # no back-off: the fix should take effect at once
                meta["attempts"] += 1
                delay = min(FIRST_RETRY_SECONDS * 2 ** min(meta["attempts"] - 1, 20), MAX_RETRY_SECONDS)
                meta["next_try"] = time.time() + delay
            self._put_if_possible(folders, folders.new, job.name, _entry(meta, raw))
            job.outcome = "deferred"

    def _set_aside(self, folders: _Folders, name: str, reason: str) -> int:
        """Move an entry (whatever it is: never followed) to failed/ with its reason; 1 if it moved."""
        # On a full disk the reason may not be written; the entry is still set aside.
        self._put_if_possible(folders, folders.failed, name + ".reason", reason.encode("utf-8") + b"\n")
        try:
            os.rename(name, name, src_dir_fd=folders.new, dst_dir_fd=folders.failed)
        except OSError:
            return 0  # it stays in new/, and the next flush tries again; the rest still flows
        return 1

    def _put_if_possible(self, folders: _Folders, folder: int, name: str, data: bytes) -> None:
        """Write bookkeeping that delivery does not depend on: a full disk must not stop a flush."""
        try:
            self._put(folders, folder, name, data)
        except OSError:
            pass

    def _clean_tmp(self, folders: _Folders) -> None:
        """Remove tmp/ leftovers: files a crash or a full disk left, and anything that is not a plain file."""
        now = time.time()
        for name in os.listdir(folders.tmp):
            try:
                info = os.stat(name, dir_fd=folders.tmp, follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or now - info.st_mtime > TMP_MAX_AGE_SECONDS:
                    os.unlink(name, dir_fd=folders.tmp)
            except OSError:
                pass  # gone already, or a folder: harmless

    def _retry_at(self, folders: _Folders) -> float:
        text = self._read_small(folders.root, "retry-at", 64) or b"0"
        try:
            when = float(text)
        except ValueError:
            return 0.0
        return when if math.isfinite(when) else 0.0

    # -- listing -------------------------------------------------------------

    def describe(self) -> list:
        """One line per queued or failed message: what it is and why it is there."""
        now = time.time()
        lines = []
        with self._folders(create=False) as folders:
            if folders is None:
                return []
            paused_until = self._retry_at(folders)  # after the proxy was unavailable, no entry goes before
            for name in self._names(folders.new):
                try:
                    meta, raw = self._load(folders.new, name)
                except FileNotFoundError:
                    continue
                except DamagedEntry as damage:
                    lines.append(f"queued {name}  damaged: {damage} (the next flush moves it to failed/)")
                    continue
                wait = max(0, max(meta["next_try"], paused_until) - now)
                why = f"attempts {meta['attempts']}, next try in {wait:.0f}s, last error: {meta['last_error']}"
                lines.append(f"queued {name}  {_summary(meta, raw, now)}: {why}")
            for name in self._names(folders.failed, skip_reasons=True):
                reason = self._read_small(folders.failed, name + ".reason", MAX_REASON_BYTES)
                why = _one_line(reason.decode("utf-8", "replace"), 1000) if reason else "no reason recorded"
                try:
                    meta, raw = self._load(folders.failed, name)
                except (OSError, DamagedEntry):
                    lines.append(f"failed {name}: {why}")
                    continue
                lines.append(f"failed {name}  {_summary(meta, raw, now)}: {why}")
        return lines


class _FlushJob:
    """One spool entry on its way through a flush: what was read, and what became of it."""

    __slots__ = ("failure", "meta", "name", "outcome", "raw")

    def __init__(self, name: str):
        self.name = name
        self.meta: Optional[dict] = None
        self.raw = b""  # the message, only while it is being sent
        self.outcome: Optional[str] = None  # the report's key for it: sent, failed, deferred, waiting
        self.failure: Optional[MessageSendingFailure] = None


def _is_link(name: str, folder: Optional[int]) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _entry(meta: dict, raw: bytes) -> bytes:
    return json.dumps(meta).encode("ascii") + b"\n" + raw


def _bookkeeping_problem(meta: Any) -> Optional[str]:
    """What is missing or wrong in an entry's bookkeeping line, or None if it is sendable."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    missing = [field for field in (*_META_NUMBERS, "attempts", "last_error", "fix_sender") if field not in meta]
    if missing:
        return "no " + ", ".join(missing)
    for field in _META_NUMBERS:
        value = meta.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{field} is {value!r}, not a time"
    for field, kind in (("attempts", int), ("last_error", str), ("fix_sender", bool)):
        value = meta.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{field} is {value!r}, not {kind.__name__}"
    if "size" in meta and (isinstance(meta["size"], bool) or not isinstance(meta["size"], int)):
        return f"size is {meta['size']!r}"
    signed = meta.get("signed", False)
    if signed is None:
        return None
    if not isinstance(signed, dict) or set(signed) != {"timestamp", "signature", "signature_v2", "fix_sender"}:
        return "signed is not the fields of a signed request"
    stamp, v1, v2 = signed["timestamp"], signed["signature"], signed["signature_v2"]
    if not (isinstance(stamp, str) and stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        return f"signed timestamp is {stamp!r}"
    if not (v1 is None or (isinstance(v1, str) and v1.isascii() and len(v1) < 100)):
        return "signed signature is not a v1 signature"
    if not (isinstance(v2, str) and len(v2) == 64 and all(c in "0123456789abcdef" for c in v2)):
        return "signed signature_v2 is not a v2 signature"
    if not isinstance(signed["fix_sender"], bool):
        return "signed fix_sender is not true or false"
    return None


def _summary(meta: dict, raw: bytes, now: float) -> str:
    head = BytesParser(policy=policy.compat32).parsebytes(_split_head(raw)[0] + b"\n\n", headersonly=True)
    subject = _one_line(str(head.get("Subject", "")), 60)
    to = _one_line(", ".join(str(v) for name in RECIPIENT_HEADERS for v in head.get_all(name, [])) or "?", 100)
    return f"age {(now - meta['queued_at']) / 60:.0f} min  to {to}  subject {subject!r}"


# ---------------------------------------------------------------------------
# Envelope recipients (sendmail's arguments, Exim's $pipe_addresses or RECIPIENT)
# ---------------------------------------------------------------------------

RECIPIENT_HEADERS = ("To", "Cc", "Bcc")


def _split_head(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a message into its header block, the blank line after it, and the body."""
    header_end = raw.find(b"\n\n")
    crlf_end = raw.find(b"\r\n\r\n")
    if crlf_end != -1 and (header_end == -1 or crlf_end < header_end):
        return raw[:crlf_end], b"\r\n\r\n", raw[crlf_end + 4 :]
    if header_end != -1:
        return raw[:header_end], b"\n\n", raw[header_end + 2 :]
    return raw, b"\n\n", b""


def _has_sender(raw: bytes) -> bool:
    """Whether the message has a From with a full address (cron's "root (Cron Daemon)" has none)."""
    head = BytesParser(policy=policy.compat32).parsebytes(_split_head(raw)[0] + b"\n\n", headersonly=True)
    return any("@" in address for _, address in getaddresses([str(v) for v in head.get_all("From", [])]))


def _without_header(raw: bytes, name: str) -> bytes:
    """The message without its `name` headers (folded lines included)."""
    head, sep, body = _split_head(raw)
    kept = [line for line in _header_lines(head) if line.split(b":", 1)[0].strip().lower() != name.lower().encode()]
    return (b"\r\n" if sep == b"\r\n\r\n" else b"\n").join(kept) + sep + body


def for_one_recipient(raw: bytes, recipient: str) -> bytes:
    """Rewrite To/Cc/Bcc so that the proxy sends this message to `recipient` alone.

    The proxy sends to every header recipient, so an MTA delivering one envelope
    recipient at a time must name only that one.  The recipient keeps the header
    (and display name) it had; one not named in the headers (a Bcc that the MTA
    already removed) becomes a Bcc, so other recipients are never revealed.
    """
    head, sep, body = _split_head(raw)
    message = BytesParser(policy=policy.compat32).parsebytes(head + sep, headersonly=True)
    wanted = recipient.strip().lower()
    where, name = next(
        (
            (header, display)
            for header in RECIPIENT_HEADERS
            for display, address in getaddresses([str(v) for v in message.get_all(header, [])])
            if address.lower() == wanted
        ),
        ("Bcc", ""),
    )
    newline = b"\r\n" if sep == b"\r\n\r\n" else b"\n"
    kept = [line for line in _header_lines(head) if not _is_recipient_header(line)]
    line = f"{where}: {formataddr((name, recipient.strip()))}".encode()
    return newline.join([*kept, line]) + sep + body


def _header_lines(head: bytes) -> list[bytes]:
    """Split a header block into logical headers, folded continuation lines kept with theirs."""
    lines: list[bytes] = []
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b"\n" + line
        else:
            lines.append(line)
    return [line.replace(b"\n", b"\r\n") if b"\r\n" in head else line for line in lines]


def _is_recipient_header(line: bytes) -> bool:
    name = line.split(b":", 1)[0].strip().lower()
    return name in (b"to", b"cc", b"bcc")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class UsageError(Exception):
    """The command line is wrong (exit 64)."""


class InputError(Exception):
    """A file named on the command line cannot be read (exit 66)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


EXIT_STATUS_HELP = """\
Exit status (sysexits.h):
  0   sent; or, with --queue, queued for a later --flush
  75  try again later: proxy unreachable or timed out, 5xx, 429
  78  configuration: a setting missing or unusable, a key or a clock the proxy
      refuses, a URL that redirects (the Exim transport defers it too; --queue
      keeps the message)
  65  the proxy refused the message (4xx), or it is over the size limit
  77  the proxy answered 401 or 403
  64  bad command line    66  an attachment cannot be read    74  spool unusable"""

SETTINGS_HELP = f"""\
Settings: --url and --key-file, else the environment variables GMAIL_PROXY_URL
and GMAIL_SECRET_KEY, else the files of those names in --envdir (default
{ENVDIR}).  The spool: --queue, else GMAIL_SPOOL_DIR (environment, then file)."""


def build_parser(personality: str = "gmail") -> argparse.ArgumentParser:
    """The command line for gmail.py, or for sendmail(8) and mailq(1) when installed under those names."""
    if personality == "gmail":
        parser = _Parser(
            prog="gmail.py",
            description="Send mail through an appengine-mailer proxy, like mail(1) or sendmail(8).\n\n"
            "With RECIPIENTs, the body is read from standard input and a message is built,\n"
            "sent from -r, or without -r from the proxy's default sender.  With sendmail's\n"
            "-i, -o, -f or -B, standard input is instead a whole message for the RECIPIENTs.\n"
            "Without RECIPIENTs, a whole RFC 2822 message is read from standard input.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=SETTINGS_HELP + "\n\n"
            "Recipients: the RECIPIENT arguments, or with -t the message's To, Cc and Bcc.\n"
            "Only when neither is given is the environment variable RECIPIENT used (one\n"
            "address; older Exim transports set it); without it, the message's headers.\n"
            "Installed under the name sendmail or mailq, it behaves as those (see README).\n\n" + EXIT_STATUS_HELP,
        )
    else:
        parser = _Parser(
            prog=personality,
            description="gmail.py as sendmail(8): standard input is the whole message, the arguments are\n"
            "its envelope recipients (or -t: the message's To, Cc and Bcc).  A message without\n"
            "From is sent from the proxy's default sender.  As mailq, or with -bp, it lists the spool.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=SETTINGS_HELP + "\n\n" + EXIT_STATUS_HELP,
        )
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="send to these addresses")
    if personality == "gmail":
        mail = parser.add_argument_group("mail(1) options")
        mail.add_argument("-s", dest="subject", metavar="SUBJECT", help="subject of the message")
        mail.add_argument("-c", dest="cc", action="append", default=[], metavar="CC", help="carbon copy to CC")
        mail.add_argument("-b", dest="bcc", action="append", default=[], metavar="BCC", help="blind carbon copy to BCC")
        mail.add_argument("-a", dest="attach", action="append", default=[], metavar="FILE", help="attach FILE")
        mail.add_argument(
            "-r", dest="sender", metavar="FROM", help="From address (without it, the proxy's default sender is used)"
        )
        parser.set_defaults(mode="m")
    else:
        parser.set_defaults(subject=None, cc=[], bcc=[], attach=[], sender=None)
    sendmail = parser.add_argument_group("sendmail options (accepted for MTAs and cron)")
    sendmail.add_argument(
        "-t",
        dest="from_headers",
        action="store_true",
        help="take recipients from the message's To, Cc and Bcc headers",
    )
    sendmail.add_argument("-i", dest="ignore_dots", action="store_true", help="ignored (dots are never special)")
    sendmail.add_argument(
        "-o",
        dest="sendmail_options",
        action="append",
        default=[],
        metavar="OPTION",
        help="ignored sendmail option, e.g. -oi, -odi, -oem",
    )
    sendmail.add_argument(
        "-f", dest="envelope_sender", metavar="ADDR", help="envelope sender: used as From when the message has none"
    )
    sendmail.add_argument("-F", dest="full_name", metavar="NAME", help="full name for a From made from -f or -r")
    sendmail.add_argument("-B", dest="body_type", metavar="TYPE", help="ignored (8BITMIME is always fine)")
    if personality != "gmail":
        sendmail.add_argument("-r", dest="envelope_sender", metavar="ADDR", help="the same as -f")
        sendmail.add_argument(
            "-b",
            dest="mode",
            choices=("m", "p"),
            default="p" if personality == "mailq" else "m",
            help="-bm: send (the default); -bp: list the spool, as mailq does",
        )
        sendmail.add_argument("-v", dest="verbose", action="store_true", help="ignored")
        sendmail.add_argument("-N", dest="dsn", metavar="DSN", help="ignored (the proxy sends no DSNs)")
    proxy = parser.add_argument_group("proxy options")
    proxy.add_argument(
        "--url", help="proxy URL, or several separated by commas, tried in turn (default: GMAIL_PROXY_URL)"
    )
    proxy.add_argument("--key-file", metavar="FILE", help="file holding the secret key (default: GMAIL_SECRET_KEY)")
    proxy.add_argument(
        "--envdir",
        default=ENVDIR,
        metavar="DIR",
        help=f"folder of setting files, used when the environment has none (default {ENVDIR})",
    )
    proxy.add_argument(
        "--fix-sender", action="store_true", help="let the proxy send from its default sender when the From is refused"
    )
    proxy.add_argument(
        "--check",
        action="store_true",
        help="send nothing: print what the proxy would do with the message (exit 0 if it would send it, 65 if not)",
    )
    proxy.add_argument("--json", action="store_true", help="with --check: print the proxy's report as JSON")
    proxy.add_argument(
        "--no-signature-v1",
        dest="signature_v1",
        action="store_false",
        help="send only signature v2 (for proxies that require it; old proxies need v1)",
    )
    proxy.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help="seconds each proxy URL gets for the whole exchange: connect, send, answer (default 30)",
    )
    proxy.add_argument(
        "--concurrency",
        type=_connections,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"with --flush or several recipients: send up to N messages at once (default {DEFAULT_CONCURRENCY}); "
        "a busy proxy (429, 503) gets fewer",
    )
    spool = parser.add_argument_group("spool (a local queue for outages)")
    spool.add_argument(
        "--queue",
        dest="queue_dir",
        metavar="DIR",
        help="when the proxy fails temporarily or refuses the setup, queue the message in DIR and exit 0",
    )
    spool.add_argument(
        "--flush",
        dest="flush_dir",
        nargs="?",
        const="",
        metavar="DIR",
        help="send what is queued in DIR (default: the spool), oldest first (run it from cron)",
    )
    spool.add_argument(
        "--list",
        dest="list_dir",
        nargs="?",
        const="",
        metavar="DIR",
        help="show what is queued or failed in DIR (default: the spool), and why",
    )
    spool.add_argument(
        "--max-age",
        type=float,
        default=DEFAULT_MAX_AGE_SECONDS / 86400,
        metavar="DAYS",
        help="with --flush: give up on messages queued longer than this (default 5)",
    )
    proxy.add_argument("--version", action="version", version=f"gmail.py {__version__}")
    return parser


def _seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(text)
    return value


_seconds.__name__ = "seconds"  # argparse says "invalid seconds value"


def _connections(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_connections.__name__ = "number of connections"


def _personality(program: str) -> str:
    """sendmail or mailq when installed under that name (a link or a copy), else gmail."""
    name = os.path.basename(program or "")
    for personality in ("sendmail", "mailq"):
        if name == personality or name.startswith(personality + "."):
            return personality
    return "gmail"


def _read_stdin(stdin) -> bytes:
    data = stdin.read(MAX_MESSAGE_BYTES + 1)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageSendingFailure(_too_large(len(data), exact=False), status=413, reason="too large")
    return data


def _decode_body(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def build_message(args, body: bytes) -> EmailMessage:
    """Build the message mail(1) would send from the options and the body text."""
    msg = EmailMessage()
    sender = args.sender or args.envelope_sender
    if sender:
        msg["From"] = formataddr((args.full_name, sender)) if args.full_name else sender
    msg["To"] = ", ".join(args.recipients)
    if args.cc:
        msg["Cc"] = ", ".join(args.cc)
    if args.bcc:
        msg["Bcc"] = ", ".join(args.bcc)
    msg["Subject"] = args.subject or ""
    msg.set_content(_decode_body(body))
    total = 0
    for path in args.attach:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MESSAGE_BYTES + 1)
        except OSError as exc:
            raise InputError(f"cannot read attachment {path}: {exc.strerror}") from None
        total += len(data)
        if total * 4 // 3 > MAX_REQUEST_BYTES:  # base64 alone would be over the limit: stop reading
            raise MessageSendingFailure(_too_large(total * 4 // 3, exact=False), status=413, reason="too large")
        kind, _ = mimetypes.guess_type(path)
        maintype, _, subtype = (kind or "application/octet-stream").partition("/")
        msg.add_attachment(data, maintype, subtype, filename=os.path.basename(path))
    return msg


def _with_from(raw: bytes, args) -> bytes:
    """Give a sendmail-mode message a From from -f/-F when it has none.

    A From without a full address (cron writes "root (Cron Daemon)"; sendmail
    would add its host name) counts as none: the proxy refuses it.
    """
    if _has_sender(raw):
        return raw
    raw = _without_header(raw, "From")
    if not args.envelope_sender:
        return raw
    return f"From: {formataddr((args.full_name or '', args.envelope_sender))}\n".encode() + raw


COMMAND_LINE_ERRORS = (UsageError, ConfigurationError, InputError, MessageSendingFailure, OSError, KeyboardInterrupt)


def exit_code_for(error: BaseException) -> int:
    """Choose the sysexits code for a failure: 75 and 78 tell an MTA to keep the message and retry."""
    if isinstance(error, ConfigurationFailure):
        return EX_CONFIG
    if isinstance(error, MessageSendingFailure):
        if error.temporary:
            return EX_TEMPFAIL
        return EX_NOPERM if error.status in (401, 403) else EX_DATAERR
    codes = {
        UsageError: EX_USAGE,
        ConfigurationError: EX_CONFIG,
        InputError: EX_NOINPUT,
        OSError: EX_IOERR,
        KeyboardInterrupt: EX_TEMPFAIL,
    }
    return next(code for kind, code in codes.items() if isinstance(error, kind))


def error_line(error: BaseException) -> str:
    """The one line of standard error that says what went wrong."""
    if isinstance(error, UsageError):
        return f"gmail.py: {error} (see --help)"
    if isinstance(error, KeyboardInterrupt):
        return "gmail.py: interrupted, message not sent"
    if isinstance(error, OSError) and error.filename:
        return f"gmail.py: {error.filename}: {error.strerror}"  # the spool's folder cannot be made or written
    return f"gmail.py: {error}"


def main(argv: Optional[list] = None, stdin=None, environ=None, prog: Optional[str] = None) -> int:
    """Run the command line; return the exit status (never raise for expected failures).

    `prog` is the name it was called by (default sys.argv[0]): sendmail and mailq
    behave as those commands.
    """
    environ = os.environ if environ is None else environ
    stdin = stdin if stdin is not None else sys.stdin.buffer
    personality = _personality(prog if prog is not None else sys.argv[0])
    try:
        args = build_parser(personality).parse_args(argv)
        return _run(args, personality, stdin, environ)
    except COMMAND_LINE_ERRORS as exc:
        print(error_line(exc), file=sys.stderr)
        return exit_code_for(exc)


def _run(args, personality: str, stdin, environ: Mapping[str, str]) -> int:
    mail_mode = bool(args.subject is not None or args.cc or args.bcc or args.attach or args.sender)
    if args.from_headers and args.recipients:
        raise UsageError("give recipients either with -t or as arguments, not both")
    if mail_mode and not args.recipients:
        raise UsageError("-s, -c, -b, -a and -r need at least one RECIPIENT")
    spool_dir, _ = find_setting("GMAIL_SPOOL_DIR", args.queue_dir, "--queue", environ, args.envdir)
    if args.list_dir is not None or args.mode == "p":
        return _list(args.list_dir or spool_dir)
    if args.flush_dir is not None and (args.recipients or mail_mode or args.queue_dir):
        raise UsageError("--flush sends what is queued: give it no message, recipients or --queue")
    if args.json and not args.check:
        raise UsageError("--json goes with --check")
    if args.check and (args.flush_dir is not None or args.queue_dir):
        raise UsageError("--check sends nothing: give it no --flush or --queue")
    key = None
    if args.key_file:
        try:
            with open(args.key_file, encoding="utf-8") as f:
                key = f.read(MAX_SETTING_BYTES)
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigurationError(f"cannot read key file {args.key_file}: {why}") from None
    settings = {
        "secret_key": key,
        "proxy_url": args.url,
        "timeout": args.timeout,
        "envdir": args.envdir,
        "environ": environ,
        "signature_v1": args.signature_v1,
        "given_as": {"secret_key": "--key-file", "proxy_url": "--url"},
    }
    if args.flush_dir is not None:
        flush_dir = args.flush_dir or spool_dir
        if not flush_dir:
            raise UsageError("--flush needs a spool: give DIR, or set GMAIL_SPOOL_DIR")
        spool = Spool(flush_dir)
        with GmailProxy(**settings) as proxy:
            return _flush(spool, proxy, args.max_age * 86400, args.concurrency)
    messages, fix_sender = _messages(args, personality, mail_mode, stdin, environ)
    if args.check:
        with GmailProxy(**settings, fix_sender=fix_sender) as proxy:
            reports = [proxy.check(raw) for raw in messages]
        for report in reports:
            _print(json.dumps(report, indent=2) if args.json else describe_report(report))
        return EX_OK if all(report.get("would_send") for report in reports) else EX_DATAERR
    try:
        proxy = GmailProxy(**settings, fix_sender=fix_sender, queue_dir=spool_dir)
    except ConfigurationError as exc:
        if not spool_dir:
            raise
        spool = Spool(spool_dir)  # kept until the setting is fixed; --flush then sends it
        for raw in messages:
            _said_queued(spool, _queue_or_fail(spool, raw, fix_sender, exc), exc)
        return EX_OK
    with proxy:
        try:
            outcomes = proxy.send_many(messages, args.concurrency)  # one copy per envelope recipient
        except MessageSendingFailure as failure:
            _said(proxy, failure.outcomes or [], failure)
            raise  # the first failure decides the exit status
        _said(proxy, outcomes)
    return EX_OK


def _messages(args, personality: str, mail_mode: bool, stdin, environ: Mapping[str, str]) -> tuple[list, bool]:
    """The messages to send (one per envelope recipient) and whether the proxy's default sender may be used."""
    sendmail_call = personality != "gmail" or _looks_like_sendmail_call(args)
    if args.recipients and (mail_mode or not sendmail_call):
        raw = message_bytes(build_message(args, _read_stdin(stdin)))  # mail(1)
        return [raw], args.fix_sender or not (args.sender or args.envelope_sender)
    envelope = list(args.recipients)
    if not envelope and not args.from_headers:
        if environ.get("RECIPIENT", "").strip():
            envelope = [environ["RECIPIENT"].strip()]  # an MTA that names the recipient only there
        elif personality == "sendmail":
            raise UsageError("no recipients: give them as arguments, or -t to take them from the message")
    raw = _with_from(_read_stdin(stdin), args)
    if not raw.strip():
        raise MessageSendingFailure("the message on standard input is empty", status=400)
    # sendmail gives a message without From one from the user; the proxy's default sender is the nearest.
    fix_sender = args.fix_sender or not _has_sender(raw)
    return [for_one_recipient(raw, recipient) for recipient in envelope] or [raw], fix_sender


def _print(text: str) -> None:
    """Print what the proxy sent back, whatever the terminal's encoding (never a traceback)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))


def describe_report(report: dict) -> str:
    """A /check report as a person reads it."""
    lines = [f"would send: {'yes' if report.get('would_send') else 'no'} (delivery: {report.get('delivery', '?')})"]
    lines.append(f"from: {report.get('sender') or '(none)'}")
    for kind, addresses in (report.get("recipients") or {}).items():
        if addresses:
            lines.append(f"{kind}: {', '.join(addresses)}")
    if report.get("subject"):
        lines.append(f"subject: {report['subject']}")
    for attachment in report.get("attachments") or []:
        lines.append(
            f"attachment: {attachment.get('name')} ({attachment.get('content_type')}, {attachment.get('size')} bytes)"
        )
    if report.get("headers_dropped"):
        lines.append(f"headers dropped: {', '.join(report['headers_dropped'])}")
    for title in ("problems", "warnings", "notes"):
        if report.get(title):
            lines.append(f"{title}:")
            lines.extend(f"  - {item}" for item in report[title])
    return "\n".join(lines)


def _said_queued(spool: Spool, name: str, why: Optional[BaseException]) -> None:
    print(f"gmail.py: not sent ({why}); queued in {spool.path} as {name} for gmail.py --flush", file=sys.stderr)


def _said(proxy: GmailProxy, outcomes: list, raised: Optional[MessageSendingFailure] = None) -> None:
    """A line for each copy queued, and for each other failure than the one raised (main prints that one)."""
    told = {id(raised)}
    for outcome in outcomes:
        if outcome.queued and proxy.spool:
            _said_queued(proxy.spool, outcome.queued, outcome.failure)
        elif not outcome and id(outcome.failure) not in told:
            told.add(id(outcome.failure))
            print(error_line(outcome.failure), file=sys.stderr)


def _list(spool_dir: Optional[str]) -> int:
    if not spool_dir:
        print("nothing queued: no spool is configured (give --list DIR or --queue DIR, or set GMAIL_SPOOL_DIR)")
        return EX_OK
    print("\n".join(Spool(spool_dir).describe()) or f"nothing queued in {spool_dir}")
    return EX_OK


def _flush(spool: Spool, proxy: GmailProxy, max_age: float, concurrency: int = DEFAULT_CONCURRENCY) -> int:
    """Flush the spool; quiet unless something was sent or failed (or the setup is wrong), so it suits cron."""
    try:
        report = spool.flush(proxy, max_age, concurrency)
    except SpoolBusy:
        return EX_OK  # the running flush will do the work
    waiting = report["waiting"] + report["deferred"]
    if report["sent"] or report["failed"]:
        print(f"gmail.py: sent {report['sent']}, failed {report['failed']}, still queued {waiting} ({spool.path})")
    if report["failed"]:
        print(f"gmail.py: {report['failed']} message(s) moved to {spool.failed} (see gmail.py --list)", file=sys.stderr)
    if isinstance(spool.stopped_by, ConfigurationFailure):
        print(f"gmail.py: {spool.stopped_by}; {waiting} message(s) kept in {spool.path}", file=sys.stderr)
        return EX_CONFIG
    return EX_OK


def _looks_like_sendmail_call(args) -> bool:
    """Whether recipients came with sendmail's flags (cron, MTAs): stdin is then a whole message."""
    return bool(args.ignore_dots or args.sendmail_options or args.envelope_sender or args.body_type)


if __name__ == "__main__":
    sys.exit(main())
