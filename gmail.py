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

__version__ = "2.0.0"
__all__ = ["GmailProxy", "MessageSendingFailure", "ConfigurationError", "sign_v1", "sign_v2", "main"]

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
EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_SOFTWARE = 0, 64, 65, 66, 70
EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 75, 77, 78


# ---------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------


SIGNATURE_V2_TAG = b"appengine-mailer-v2"
REPLAY_WINDOW_SECONDS = 300


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


def encode_form(msg: bytes, key: bytes, fix_sender: bool = False, *, timestamp: Optional[float] = None,
                signature_v1: bool = True) -> bytes:
    """Return the urlencoded POST body: msg, its signatures (v2, and v1 unless turned off), options.

    Servers that predate v2 ignore its fields and check v1; newer ones check v2
    and refuse a replay of the same request after its window.  The bytes are
    urlencode()'s, built field by field: only msg and the v1 signature need quoting.
    """
    stamp = str(int(time.time() if timestamp is None else timestamp))
    fields = [b"msg=" + quote_plus(msg).encode("ascii")]
    if signature_v1:
        fields.append(b"signature=" + quote_plus(sign_v1(key, msg)).encode("ascii"))
    fields.append(b"timestamp=" + stamp.encode("ascii"))
    fields.append(b"signature_v2=" + sign_v2(key, stamp, fix_sender, msg).encode("ascii"))
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


class GmailProxy:
    """Send messages to an appengine-mailer proxy over one kept-alive HTTP connection."""

    def __init__(self, secret_key: Union[str, bytes, None] = None, proxy_url: Optional[str] = None,
                 fix_sender: bool = False, fail_silently: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 *, signature_v1: bool = True, envdir: str = ENVDIR):
        if isinstance(secret_key, bytes):
            secret_key = secret_key.decode("utf-8")
        key = read_setting("GMAIL_SECRET_KEY", secret_key, envdir=envdir)
        url = read_setting("GMAIL_PROXY_URL", proxy_url, envdir=envdir)
        if not key:
            raise ConfigurationError(f"no secret key: pass one, or set GMAIL_SECRET_KEY (env or {envdir}/)")
        if not url:
            raise ConfigurationError(f"no proxy URL: pass one, or set GMAIL_PROXY_URL (env or {envdir}/)")
        self.key = _first_key(key)
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"GMAIL_PROXY_URL must be an http:// or https:// URL, not {url!r}")
        self.url = url.strip()
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = parts.path or "/"
        self.fix_sender = fix_sender
        self.fail_silently = fail_silently
        self.timeout = timeout
        self.signature_v1 = signature_v1
        self._conn: Optional[http.client.HTTPConnection] = None

    # -- connection -------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._scheme == "https":
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
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
            raise MessageSendingFailure(f"could not reach the proxy at {self._host}: {_describe(exc)}") from exc
        return True

    def close(self) -> None:
        """Close the kept-alive connection, if any; sending again reopens one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "GmailProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- sending ----------------------------------------------------------

    def send_mail(self, msg: Union[Message, bytes, str]) -> bool:
        """Send one message; True when the proxy accepted it.

        Raises MessageSendingFailure on any refusal or network trouble, unless the
        proxy was made with fail_silently=True, in which case it returns False.
        """
        try:
            raw = message_bytes(msg)
            if len(raw) > MAX_MESSAGE_BYTES:
                raise MessageSendingFailure(f"message of {len(raw)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit",
                                            status=413, reason="too large")
            self._post(encode_form(raw, self.key, self.fix_sender, signature_v1=self.signature_v1))
            return True
        except MessageSendingFailure:
            if self.fail_silently:
                return False
            raise

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
                raise MessageSendingFailure(f"the proxy at {self._host} dropped the connection: "
                                            f"{_describe(exc)}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise MessageSendingFailure(f"could not reach the proxy at {self._host}: {_describe(exc)}") from exc
            if 200 <= status < 300:
                return
            if status == 503 and attempt == 1:
                time.sleep(min(retry_after, MAX_RETRY_AFTER_SECONDS))
                continue
            raise MessageSendingFailure(f"the proxy refused the message: {status} {reason}".rstrip(),
                                        status=status, reason=reason)

    def _exchange(self, body: bytes) -> tuple[int, str, float]:
        conn = self._connection()
        conn.request("POST", self._path, body, REQUEST_HEADERS)
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
        head, sep, body = raw[:crlf_end], b"\r\n\r\n", raw[crlf_end + 4:]
    elif header_end != -1:
        head, sep, body = raw[:header_end], b"\n\n", raw[header_end + 2:]
    else:
        head, sep, body = raw, b"\n\n", b""
    message = BytesParser(policy=policy.compat32).parsebytes(head + sep, headersonly=True)
    wanted = recipient.strip().lower()
    where, name = "Bcc", ""
    for header in RECIPIENT_HEADERS:
        for display, address in getaddresses([str(v) for v in message.get_all(header, [])]):
            if address.lower() == wanted:
                where, name = header, display
                break
        else:
            continue
        break
    newline = b"\r\n" if sep == b"\r\n\r\n" else b"\n"
    kept = [line for line in _header_lines(head) if not _is_recipient_header(line)]
    line = f"{where}: {formataddr((name, recipient.strip()))}".encode("utf-8")
    return newline.join(kept + [line]) + sep + body


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
               "Exit status (sysexits.h): 0 sent; 75 temporary failure, retry later (proxy down,\n"
               "timeout, 5xx, 429); 65 message refused; 77 permission refused; 64 usage error;\n"
               "66 input file missing; 78 configuration missing.")
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT", help="send to these addresses")
    mail = parser.add_argument_group("mail(1) options")
    mail.add_argument("-s", dest="subject", metavar="SUBJECT", help="subject of the message")
    mail.add_argument("-c", dest="cc", action="append", default=[], metavar="CC", help="carbon copy to CC")
    mail.add_argument("-b", dest="bcc", action="append", default=[], metavar="BCC", help="blind carbon copy to BCC")
    mail.add_argument("-a", dest="attach", action="append", default=[], metavar="FILE", help="attach FILE")
    mail.add_argument("-r", dest="sender", metavar="FROM",
                      help="From address (without it, the proxy's default sender is used)")
    sendmail = parser.add_argument_group("sendmail options (accepted for MTAs and cron)")
    sendmail.add_argument("-t", dest="from_headers", action="store_true",
                          help="take recipients from the message headers (the default without RECIPIENTs)")
    sendmail.add_argument("-i", dest="ignore_dots", action="store_true", help="ignored (dots are never special)")
    sendmail.add_argument("-o", dest="sendmail_options", action="append", default=[], metavar="OPTION",
                          help="ignored sendmail option, e.g. -oi, -odi, -oem")
    sendmail.add_argument("-f", dest="envelope_sender", metavar="ADDR",
                          help="envelope sender: used as From when the message has none")
    sendmail.add_argument("-F", dest="full_name", metavar="NAME", help="full name for a From made from -f or -r")
    sendmail.add_argument("-B", dest="body_type", metavar="TYPE", help="ignored (8BITMIME is always fine)")
    proxy = parser.add_argument_group("proxy options")
    proxy.add_argument("--url", help="proxy URL (default: GMAIL_PROXY_URL)")
    proxy.add_argument("--key-file", metavar="FILE", help="file holding the secret key (default: GMAIL_SECRET_KEY)")
    proxy.add_argument("--envdir", default=ENVDIR, metavar="DIR",
                       help=f"folder of setting files, used when the environment has none (default {ENVDIR})")
    proxy.add_argument("--fix-sender", action="store_true",
                       help="let the proxy send from its default sender when the From is refused")
    proxy.add_argument("--no-signature-v1", dest="signature_v1", action="store_false",
                       help="send only signature v2 (for proxies that require it; old proxies need v1)")
    proxy.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the proxy")
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
            raise FileNotFoundError(f"cannot read attachment {path}: {exc.strerror}") from None
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
    line = f"From: {formataddr((args.full_name or '', args.envelope_sender))}\n".encode("utf-8")
    return line + raw


def exit_code_for(failure: MessageSendingFailure) -> int:
    """Choose the sysexits code: 75 tells an MTA to keep the message and retry."""
    if failure.temporary:
        return EX_TEMPFAIL
    if failure.status in (401, 403):
        return EX_NOPERM
    return EX_DATAERR


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
        mail_mode = bool(args.subject is not None or args.cc or args.bcc or args.attach or args.sender)
        if mail_mode and not args.recipients:
            raise UsageError("-s, -c, -b, -a and -r need at least one RECIPIENT")
        fix_sender = args.fix_sender or (mail_mode and not (args.sender or args.envelope_sender))
        key = read_setting("GMAIL_SECRET_KEY", key, environ, args.envdir)
        url = read_setting("GMAIL_PROXY_URL", args.url, environ, args.envdir)
        with GmailProxy(key, url, fix_sender=fix_sender, timeout=args.timeout, envdir=args.envdir,
                        signature_v1=args.signature_v1) as proxy:
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
        return EX_OK
    except UsageError as exc:
        print(f"gmail.py: {exc} (see --help)", file=sys.stderr)
        return EX_USAGE
    except ConfigurationError as exc:
        print(f"gmail.py: {exc}", file=sys.stderr)
        return EX_CONFIG
    except FileNotFoundError as exc:
        print(f"gmail.py: {exc}", file=sys.stderr)
        return EX_NOINPUT
    except MessageSendingFailure as exc:
        print(f"gmail.py: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("gmail.py: interrupted, message not sent", file=sys.stderr)
        return EX_TEMPFAIL


def _looks_like_sendmail_call(args) -> bool:
    """Whether recipients came with sendmail's flags (cron, MTAs): stdin is then a whole message."""
    return bool(args.ignore_dots or args.sendmail_options or args.envelope_sender or args.body_type)


if __name__ == "__main__":
    sys.exit(main())
