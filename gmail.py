#!/usr/bin/env python3
"""gmail.py: send mail through an appengine-mailer proxy.

One stdlib-only file, usable by copying it anywhere with Python 3.9+:

* a library: ``GmailProxy(SECRET_KEY, PROXY_URL).send_mail(message)``;
* a ``mail(1)``-like command: ``echo body | gmail.py -s Subject you@example.com``;
* a sendmail-like command and Exim pipe transport: ``gmail.py < message.eml``.

Settings come from arguments, else the environment (GMAIL_PROXY_URL,
GMAIL_SECRET_KEY), else files of those names in /etc/envdir.  The wire protocol
(field names and the signature) is defined here once; the server imports it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import mimetypes
import os
import socket
import ssl
import sys
import time
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import formataddr, getaddresses
from typing import Optional, Union
from urllib.parse import quote_plus, urlsplit

try:
    import fcntl
except ImportError:  # not POSIX: everything but the spool's flush still works
    fcntl = None  # type: ignore[assignment]

__version__ = "2.0.0"
__all__ = [
    "ConfigurationError",
    "GmailProxy",
    "MessageSendingFailure",
    "Spool",
    "SpoolBusy",
    "main",
    "sign_v1",
    "sign_v2",
]

ENVDIR = "/etc/envdir"
DEFAULT_TIMEOUT = 30.0
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_REASON_BYTES = 64 * 1024
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
# A 400 caused by the client's setup rather than by the message says so in this header, so that
# a client can tell "fix the key, keep the mail" from "this message will never be accepted".
ERROR_HEADER = "X-Appengine-Mailer-Error"
BAD_SIGNATURE = "bad-signature"  # the signature matches none of the proxy's keys
CLOCK_SKEW = "clock-skew"  # the v2 timestamp is outside the replay window: a clock is wrong


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


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ConfigurationError(Exception):
    """A setting is missing or unusable; the message names what to set."""


class MessageSendingFailure(Exception):
    """The proxy did not accept the message.

    ``status`` is the HTTP status (None when the proxy could not be reached) and
    ``reason`` the proxy's own explanation.  ``temporary`` says whether trying
    again later may succeed.
    """

    def __init__(self, message: str, status: Optional[int] = None, reason: str = ""):
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def temporary(self) -> bool:
        return self.status is None or self.status >= 500 or self.status in (408, 429)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def read_setting(name: str, value: Optional[str] = None, environ=None, envdir: str = ENVDIR) -> Optional[str]:
    """Return value if given, else env `name`, else the file envdir/name, else None."""
    if value:
        return value
    environ = os.environ if environ is None else environ
    if environ.get(name, "").strip():
        return environ[name].strip()
    try:
        with open(os.path.join(envdir, name), encoding="utf-8") as f:
            return f.read(64 * 1024).strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {os.path.join(envdir, name)}: {exc.strerror}") from None


def _first_key(text: str) -> bytes:
    """Clients sign with the first non-blank line; the server may hold several keys."""
    for line in text.splitlines():
        if line.strip():
            return line.strip().encode("utf-8")
    raise ConfigurationError("the secret key is empty: set GMAIL_SECRET_KEY")


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
    """One proxy URL, split for http.client."""

    def __init__(self, url: str):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"GMAIL_PROXY_URL must hold http:// or https:// URLs, not {url!r}")
        self.url, self.scheme, self.host, self.port = url, parts.scheme, parts.hostname, port
        self.path = parts.path or "/"


def parse_proxy_urls(text: str) -> list:
    """Split GMAIL_PROXY_URL: one URL, or several separated by whitespace or commas (tried in order)."""
    return [Endpoint(url) for url in text.replace(",", " ").split()]


class GmailProxy:
    """Send messages to an appengine-mailer proxy over one kept-alive HTTP connection.

    With several proxy URLs, a temporary failure on one tries the next.  With a
    queue_dir, a message that still fails temporarily is spooled there (see
    Spool) instead of failing, and send_mail returns True: it will be sent by a
    later flush.  `last_queued` then names its spool entry.
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
    ):
        if isinstance(secret_key, bytes):
            secret_key = secret_key.decode("utf-8")
        key = read_setting("GMAIL_SECRET_KEY", secret_key, envdir=envdir)
        url = read_setting("GMAIL_PROXY_URL", proxy_url, envdir=envdir)
        if not key:
            raise ConfigurationError(f"no secret key: pass one, or set GMAIL_SECRET_KEY (env or {envdir}/)")
        if not url:
            raise ConfigurationError(f"no proxy URL: pass one, or set GMAIL_PROXY_URL (env or {envdir}/)")
        self.key = _first_key(key)
        self.endpoints = parse_proxy_urls(url)
        if not self.endpoints:
            raise ConfigurationError("GMAIL_PROXY_URL holds no URL")
        self.url = self.endpoints[0].url
        self.fix_sender = fix_sender
        self.fail_silently = fail_silently
        self.timeout = timeout
        self.signature_v1 = signature_v1
        self.spool = Spool(queue_dir) if queue_dir else None
        self.last_queued: Optional[str] = None
        self._endpoint = self.endpoints[0]
        self._conn: Optional[http.client.HTTPConnection] = None

    # -- connection -------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            endpoint = self._endpoint
            if endpoint.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    endpoint.host, endpoint.port, timeout=self.timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=self.timeout)
        return self._conn

    def open(self) -> bool:
        """Connect now rather than at the first send; True if a new connection was made.

        Raises MessageSendingFailure when the proxy cannot be reached (or returns
        False with fail_silently).
        """
        if self._conn is not None and self._conn.sock is not None:
            return False
        try:
            self._connection().connect()
        except OSError as exc:
            self.close()
            if self.fail_silently:
                return False
            raise MessageSendingFailure(
                f"could not reach the proxy at {self._endpoint.host}: {_describe(exc)}"
            ) from exc
        return True

    def close(self) -> None:
        """Close the kept-alive connection, if any; sending again reopens one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

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
        self.last_queued = None
        try:
            raw = message_bytes(msg)
            if len(raw) > MAX_MESSAGE_BYTES:
                raise MessageSendingFailure(
                    f"message of {len(raw)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
                    status=413,
                    reason="too large",
                )
            try:
                self.send_signed(encode_form(raw, self.key, self.fix_sender, signature_v1=self.signature_v1))
            except MessageSendingFailure as failure:
                if self.spool is None or not failure.temporary:
                    raise
                try:
                    self.last_queued = self.spool.add(raw, self.fix_sender, str(failure))
                except OSError as exc:  # not queued: the caller must keep the message, so fail as before
                    raise MessageSendingFailure(
                        f"{failure}; and it could not be queued in {self.spool.path}: {exc.strerror}"
                    ) from exc
            return True
        except MessageSendingFailure:
            if self.fail_silently:
                return False
            raise

    def send_signed(self, body: bytes) -> None:
        """POST a signed form body, trying each proxy URL in turn while failures are temporary.

        The URL that last worked is tried first next time.
        """
        failure: Optional[MessageSendingFailure] = None
        start = self.endpoints.index(self._endpoint)
        for offset in range(len(self.endpoints)):
            endpoint = self.endpoints[(start + offset) % len(self.endpoints)]
            if endpoint is not self._endpoint:
                self.close()
                self._endpoint = endpoint
            try:
                self._post(body)
                return
            except MessageSendingFailure as exc:
                if not exc.temporary:
                    raise
                failure = exc
        assert failure is not None  # there is always at least one endpoint
        raise failure

    def _post(self, body: bytes) -> None:
        """POST the signed body; retry it once, unchanged, on a dropped connection or a 503.

        Resending the same signed request is safe: a v2 server answers a repeat
        of a request it already sent with 204 and does not send it again.
        """
        for attempt in (1, 2):
            try:
                status, reason, retry_after = self._exchange(body)
            except DROPPED_CONNECTION as exc:
                self.close()
                if attempt == 1:
                    continue
                raise MessageSendingFailure(
                    f"the proxy at {self._endpoint.host} dropped the connection: {_describe(exc)}"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise MessageSendingFailure(
                    f"could not reach the proxy at {self._endpoint.host}: {_describe(exc)}"
                ) from exc
            if 200 <= status < 300:
                return
            if status == 503 and attempt == 1:
                time.sleep(min(retry_after, MAX_RETRY_AFTER_SECONDS))
                continue
            raise MessageSendingFailure(
                f"the proxy refused the message: {status} {reason}".rstrip(), status=status, reason=reason
            )

    def _exchange(self, body: bytes) -> tuple[int, str, float]:
        conn = self._connection()
        conn.request("POST", self._endpoint.path, body, REQUEST_HEADERS)
        response = conn.getresponse()
        text = response.read(MAX_REASON_BYTES + 1)
        if len(text) > MAX_REASON_BYTES or response.will_close:
            self.close()
        if 200 <= response.status < 300:
            return response.status, "", 0.0
        reason = " ".join(text[:MAX_REASON_BYTES].decode("utf-8", "replace").split())[:500]
        return response.status, reason, _retry_after(response.getheader("Retry-After"))


def _retry_after(value: Optional[str]) -> float:
    """Seconds from a Retry-After header (a number; an HTTP date counts as the default)."""
    try:
        return max(0.0, float(value)) if value else DEFAULT_RETRY_AFTER_SECONDS
    except ValueError:
        return DEFAULT_RETRY_AFTER_SECONDS


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


class SpoolBusy(Exception):
    """Another flush holds the spool's lock."""


class Spool:
    """A Maildir-style queue of messages waiting for the proxy, flushed oldest first.

    Each entry is one file in new/: a JSON line of bookkeeping (queued time,
    attempts, next try, last error, and the signed fields of the last attempt),
    then the message.  Files are written to tmp/, fsynced and renamed, so a crash
    never leaves half an entry; an entry is deleted only after the proxy accepted
    it.  Refused or expired messages move to failed/ with a .reason file.  No
    secret key is ever written here; file names come from the time and pid.
    """

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.new, self.tmp, self.failed = (os.path.join(self.path, d) for d in ("new", "tmp", "failed"))

    def _ensure(self) -> None:
        for folder in (self.path, self.new, self.tmp, self.failed):
            os.makedirs(folder, mode=0o700, exist_ok=True)

    def add(self, raw: bytes, fix_sender: bool, reason: str) -> str:
        """Queue a message; return its entry name."""
        self._ensure()
        name = f"{time.time_ns():020d}.{os.getpid()}.{os.urandom(4).hex()}"
        meta = {
            "queued_at": time.time(),
            "attempts": 0,
            "next_try": 0,
            "last_error": reason,
            "fix_sender": fix_sender,
            "signed": None,
        }
        self._write(name, meta, raw)
        return name

    def _write(self, name: str, meta: dict, raw: bytes) -> None:
        tmp = os.path.join(self.tmp, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(json.dumps(meta).encode("ascii") + b"\n" + raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, os.path.join(self.new, name))

    def _read(self, folder: str, name: str) -> tuple[dict, bytes]:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read(MAX_MESSAGE_BYTES + 64 * 1024)
        head, _, raw = data.partition(b"\n")
        meta = json.loads(head)
        if not isinstance(meta, dict) or not all(
            isinstance(meta.get(k), (int, float)) for k in ("queued_at", "attempts", "next_try")
        ):
            raise ValueError("not gmail.py's bookkeeping")
        return meta, raw

    def names(self, folder: Optional[str] = None) -> list:
        try:
            return sorted(n for n in os.listdir(folder or self.new) if not n.endswith(".reason"))
        except FileNotFoundError:
            return []

    def _fail(self, name: str, reason: str) -> None:
        with open(os.path.join(self.failed, name + ".reason"), "w", encoding="utf-8") as f:
            f.write(reason + "\n")
        os.replace(os.path.join(self.new, name), os.path.join(self.failed, name))

    @property
    def _retry_at_file(self) -> str:
        return os.path.join(self.path, "retry-at")

    def flush(self, proxy: GmailProxy, max_age: float = DEFAULT_MAX_AGE_SECONDS) -> dict:
        """Send what is due, oldest first, over proxy's connection; return counts by outcome.

        A temporary failure backs the message off (1 minute, doubling, at most 4
        hours) and ends the run: the proxy is down, and the next flush waits as
        long.  Raises SpoolBusy if another flush is running.
        """
        if fcntl is None:
            raise ConfigurationError("the spool needs a POSIX system (fcntl)")
        self._ensure()
        report = {"sent": 0, "failed": 0, "deferred": 0, "waiting": 0}
        with open(os.path.join(self.path, ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SpoolBusy(f"another flush of {self.path} is running") from None
            now = time.time()
            names = self.names()
            if now < self._retry_at():
                report["waiting"] = len(names)
                return report
            for index, name in enumerate(names):
                try:
                    meta, raw = self._read(self.new, name)
                except FileNotFoundError:
                    continue
                except ValueError:  # damaged: set it aside, never block the queue
                    self._fail(name, "unreadable spool entry: its first line is not gmail.py's bookkeeping")
                    report["failed"] += 1
                    continue
                if now - meta["queued_at"] > max_age:
                    self._fail(
                        name,
                        f"expired: queued {(now - meta['queued_at']) / 86400:.1f} days ago; "
                        f"last error: {meta['last_error']}",
                    )
                    report["failed"] += 1
                    continue
                if meta["next_try"] > now:
                    report["waiting"] += 1
                    continue
                outcome = self._send(proxy, name, meta, raw, now)
                report[outcome] += 1
                if outcome == "deferred":
                    report["waiting"] += len(names) - index - 1  # those not looked at yet
                    break
            else:
                self._clear_retry_at()
        return report

    def _send(self, proxy: GmailProxy, name: str, meta: dict, raw: bytes, now: float) -> str:
        signed = meta.get("signed")
        if not signed or now - int(signed["timestamp"]) > REUSE_SIGNATURE_SECONDS:
            signed = sign_request(raw, proxy.key, meta["fix_sender"], signature_v1=proxy.signature_v1)
            meta["signed"] = signed
            self._write(name, meta, raw)  # recorded before sending: a rerun resends these exact bytes
        try:
            proxy.send_signed(form_body(raw, **signed))
        except MessageSendingFailure as failure:
            if not failure.temporary:
                self._fail(name, str(failure))
                return "failed"
            meta["attempts"] += 1
            delay = min(FIRST_RETRY_SECONDS * 2 ** (meta["attempts"] - 1), MAX_RETRY_SECONDS)
            meta["next_try"] = now + delay
            meta["last_error"] = str(failure)
            self._write(name, meta, raw)
            self._set_retry_at(now + delay)
            return "deferred"
        os.unlink(os.path.join(self.new, name))
        return "sent"

    def _retry_at(self) -> float:
        try:
            with open(self._retry_at_file) as f:
                return float(f.read(64) or 0)
        except (FileNotFoundError, ValueError):
            return 0.0

    def _set_retry_at(self, when: float) -> None:
        with open(self._retry_at_file, "w") as f:
            f.write(f"{when:.0f}\n")

    def _clear_retry_at(self) -> None:
        try:
            os.unlink(self._retry_at_file)
        except FileNotFoundError:
            pass

    def describe(self) -> list:
        """One line per queued or failed message: what it is and why it is there."""
        now = time.time()
        lines = []
        for folder, state in ((self.new, "queued"), (self.failed, "failed")):
            for name in self.names(folder):
                try:
                    meta, raw = self._read(folder, name)
                except FileNotFoundError:
                    continue
                except ValueError:
                    meta, raw = {"queued_at": now, "attempts": 0, "next_try": 0, "last_error": "unreadable"}, b""
                head = BytesParser(policy=policy.compat32).parsebytes(raw, headersonly=True)
                subject = " ".join(str(head.get("Subject", "")).split())[:60]
                if state == "queued":
                    wait = max(0, meta["next_try"] - now)
                    why = f"attempts {meta['attempts']}, next try in {wait:.0f}s, last error: {meta['last_error']}"
                else:
                    with open(os.path.join(folder, name + ".reason"), encoding="utf-8") as f:
                        why = f.read().strip()
                age = (now - meta["queued_at"]) / 60
                lines.append(f"{state} {name}  age {age:.0f} min  to {head.get('To', '?')}  subject {subject!r}: {why}")
        return lines


# ---------------------------------------------------------------------------
# Envelope recipients (Exim's RECIPIENT, sendmail's arguments)
# ---------------------------------------------------------------------------

RECIPIENT_HEADERS = ("To", "Cc", "Bcc")


def for_one_recipient(raw: bytes, recipient: str) -> bytes:
    """Rewrite To/Cc/Bcc so that the proxy sends this message to `recipient` alone.

    The proxy sends to every header recipient, so an MTA delivering one envelope
    recipient at a time must name only that one.  The recipient keeps the header
    (and display name) it had; one not named in the headers (a Bcc that the MTA
    already removed) becomes a Bcc, so other recipients are never revealed.
    """
    header_end = raw.find(b"\n\n")
    crlf_end = raw.find(b"\r\n\r\n")
    if crlf_end != -1 and (header_end == -1 or crlf_end < header_end):
        head, sep, body = raw[:crlf_end], b"\r\n\r\n", raw[crlf_end + 4 :]
    elif header_end != -1:
        head, sep, body = raw[:header_end], b"\n\n", raw[header_end + 2 :]
    else:
        head, sep, body = raw, b"\n\n", b""
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gmail.py",
        description="Send mail through an appengine-mailer proxy, like mail(1) or sendmail(8).\n\n"
        "With recipients, the body is read from standard input and a message is built.\n"
        "Without recipients, a whole RFC 2822 message is read from standard input and sent\n"
        "to the recipients in its To, Cc and Bcc headers (sendmail -t).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configuration: --url and --key-file, else env GMAIL_PROXY_URL and GMAIL_SECRET_KEY,\n"
        "else the files /etc/envdir/GMAIL_PROXY_URL and /etc/envdir/GMAIL_SECRET_KEY.\n"
        "If RECIPIENT is set (Exim's pipe transport sets it), the message goes to that\n"
        "recipient alone.\n\n"
        "Exit status (sysexits.h): 0 sent (or queued with --queue); 75 temporary failure,\n"
        "retry later (proxy down, timeout, 5xx, 429); 65 message refused; 77 permission\n"
        "refused; 64 usage error; 66 input file missing; 74 spool not writable;\n"
        "78 configuration missing.",
    )
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="send to these addresses")
    mail = parser.add_argument_group("mail(1) options")
    mail.add_argument("-s", dest="subject", metavar="SUBJECT", help="subject of the message")
    mail.add_argument("-c", dest="cc", action="append", default=[], metavar="CC", help="carbon copy to CC")
    mail.add_argument("-b", dest="bcc", action="append", default=[], metavar="BCC", help="blind carbon copy to BCC")
    mail.add_argument("-a", dest="attach", action="append", default=[], metavar="FILE", help="attach FILE")
    mail.add_argument(
        "-r", dest="sender", metavar="FROM", help="From address (without it, the proxy's default sender is used)"
    )
    sendmail = parser.add_argument_group("sendmail options (accepted for MTAs and cron)")
    sendmail.add_argument(
        "-t",
        dest="from_headers",
        action="store_true",
        help="take recipients from the message headers (the default without RECIPIENTs)",
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
        "--no-signature-v1",
        dest="signature_v1",
        action="store_false",
        help="send only signature v2 (for proxies that require it; old proxies need v1)",
    )
    proxy.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the proxy")
    spool = parser.add_argument_group("spool (a local queue for outages)")
    spool.add_argument(
        "--queue",
        dest="queue_dir",
        metavar="DIR",
        help="when the proxy fails temporarily, queue the message in DIR and exit 0",
    )
    spool.add_argument(
        "--flush", dest="flush_dir", metavar="DIR", help="send what is queued in DIR, oldest first (run it from cron)"
    )
    spool.add_argument("--list", dest="list_dir", metavar="DIR", help="show what is queued or failed in DIR, and why")
    spool.add_argument(
        "--max-age",
        type=float,
        default=DEFAULT_MAX_AGE_SECONDS / 86400,
        metavar="DAYS",
        help="with --flush: give up on messages queued longer than this (default 5)",
    )
    proxy.add_argument("--version", action="version", version=f"gmail.py {__version__}")
    return parser


def _read_stdin(stdin) -> bytes:
    data = stdin.read(MAX_MESSAGE_BYTES + 1)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageSendingFailure(f"message is over the {MAX_MESSAGE_BYTES}-byte limit", status=413)
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
    for path in args.attach:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MESSAGE_BYTES + 1)
        except OSError as exc:
            raise InputError(f"cannot read attachment {path}: {exc.strerror}") from None
        kind, _ = mimetypes.guess_type(path)
        maintype, _, subtype = (kind or "application/octet-stream").partition("/")
        msg.add_attachment(data, maintype, subtype, filename=os.path.basename(path))
    return msg


def _with_from(raw: bytes, args) -> bytes:
    """Give a sendmail-mode message a From from -f/-F when it has none."""
    if not args.envelope_sender:
        return raw
    head = raw.split(b"\n\n", 1)[0]
    if any(line.lower().startswith(b"from:") for line in head.replace(b"\r\n", b"\n").split(b"\n")):
        return raw
    line = f"From: {formataddr((args.full_name or '', args.envelope_sender))}\n".encode()
    return line + raw


COMMAND_LINE_ERRORS = (UsageError, ConfigurationError, InputError, MessageSendingFailure, OSError, KeyboardInterrupt)


def exit_code_for(error: BaseException) -> int:
    """Choose the sysexits code for a failure: 75 tells an MTA to keep the message and retry."""
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


def main(argv: Optional[list] = None, stdin=None, environ=None) -> int:
    """Run the command line; return the exit status (never raise for expected failures)."""
    environ = os.environ if environ is None else environ
    stdin = stdin if stdin is not None else sys.stdin.buffer
    try:
        args = build_parser().parse_args(argv)
        if args.from_headers and args.recipients:
            raise UsageError("give recipients either with -t or as arguments, not both")
        key = None
        if args.key_file:
            try:
                with open(args.key_file, encoding="utf-8") as f:
                    key = f.read(64 * 1024)
            except OSError as exc:
                raise ConfigurationError(f"cannot read key file {args.key_file}: {exc.strerror}") from None
        if args.list_dir:
            print("\n".join(Spool(args.list_dir).describe()) or f"nothing queued in {args.list_dir}")
            return EX_OK
        mail_mode = bool(args.subject is not None or args.cc or args.bcc or args.attach or args.sender)
        if mail_mode and not args.recipients:
            raise UsageError("-s, -c, -b, -a and -r need at least one RECIPIENT")
        if args.flush_dir and (args.recipients or mail_mode or args.queue_dir):
            raise UsageError("--flush sends what is queued: give it no message, recipients or --queue")
        fix_sender = args.fix_sender or (mail_mode and not (args.sender or args.envelope_sender))
        key = read_setting("GMAIL_SECRET_KEY", key, environ, args.envdir)
        url = read_setting("GMAIL_PROXY_URL", args.url, environ, args.envdir)
        with GmailProxy(
            key,
            url,
            fix_sender=fix_sender,
            timeout=args.timeout,
            envdir=args.envdir,
            signature_v1=args.signature_v1,
            queue_dir=args.queue_dir,
        ) as proxy:
            if args.flush_dir:
                return _flush(Spool(args.flush_dir), proxy, args.max_age * 86400)
            if args.recipients and (mail_mode or not _looks_like_sendmail_call(args)):
                raw = message_bytes(build_message(args, _read_stdin(stdin)))
                envelope = []
            else:
                raw = _with_from(_read_stdin(stdin), args)
                envelope = list(args.recipients)
            if environ.get("RECIPIENT"):
                envelope = [environ["RECIPIENT"]]
            if not raw.strip():
                raise MessageSendingFailure("the message on standard input is empty", status=400)
            for recipient in envelope or [None]:
                proxy.send_mail(for_one_recipient(raw, recipient) if recipient else raw)
                if proxy.last_queued:
                    print(
                        f"gmail.py: the proxy is unavailable; queued in {args.queue_dir} as {proxy.last_queued} "
                        f"for gmail.py --flush",
                        file=sys.stderr,
                    )
        return EX_OK
    except COMMAND_LINE_ERRORS as exc:
        print(error_line(exc), file=sys.stderr)
        return exit_code_for(exc)


def _flush(spool: Spool, proxy: GmailProxy, max_age: float) -> int:
    """Flush the spool; quiet unless something was sent or failed, so it suits cron."""
    try:
        report = spool.flush(proxy, max_age)
    except SpoolBusy:
        return EX_OK  # the running flush will do the work
    if report["sent"] or report["failed"]:
        print(
            f"gmail.py: sent {report['sent']}, failed {report['failed']}, "
            f"still queued {report['waiting'] + report['deferred']}"
            f" ({spool.path})"
        )
    if report["failed"]:
        print(f"gmail.py: {report['failed']} message(s) moved to {spool.failed} (see gmail.py --list)", file=sys.stderr)
    return EX_OK


def _looks_like_sendmail_call(args) -> bool:
    """Whether recipients came with sendmail's flags (cron, MTAs): stdin is then a whole message."""
    return bool(args.ignore_dots or args.sendmail_options or args.envelope_sender or args.body_type)


if __name__ == "__main__":
    sys.exit(main())
