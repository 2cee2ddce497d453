"""Settings of the server: keys, default sender and options.

Explicit arguments (make_app) come first; the module-level app reads the
environment, then files of the same name in the deployment's keys/ folder and
its root (the original's layout).  A bad setting stops the server with one line
and exit 78 (EX_CONFIG) rather than answering every request with an error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

log = logging.getLogger("appengine_mailer")

MIN_KEY_LENGTH = 16
DEFAULT_MAX_RECIPIENTS = 100
DEFAULT_SMTP_TIMEOUT = 30.0
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
EX_CONFIG = 78


def _setting(name: str, environ: Mapping[str, str], search: Iterable[Path]) -> tuple[Optional[str], Optional[Path]]:
    """Return a setting and the file it came from: the environment first, then the first file found."""
    if environ.get(name):
        return environ[name], None
    for folder in search:
        path = folder / name
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8"), path
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or "not UTF-8 text"
                log.error("cannot read %s (%s): nothing is taken from it until it can be read", path, why)
                return None, path
    return None, None


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SENDER = re.compile(rf"(?:[^@\s]+)?@{_LABEL}(?:\.{_LABEL})*")  # a@example.org, or @example.org for a domain


class Key(bytes):
    """A shared secret, and the senders it may send as: full addresses or @domain (none listed: anyone).

    A bytes subclass, so a Key signs and compares as its secret does; its repr,
    str and format show only the fingerprint, so a key never lands in a log,
    an error message or a traceback.
    """

    senders: tuple[str, ...]

    def __new__(cls, secret: bytes, senders: Iterable[str] = ()) -> Key:
        key = super().__new__(cls, secret)
        key.senders = tuple(sender.strip().lower() for sender in senders)
        return key

    def allows(self, address: str) -> bool:
        """Whether this key may send as `address` (compared case-insensitively)."""
        if not self.senders:
            return True
        address = address.strip().lower()
        return address in self.senders or "@" + address.rpartition("@")[2] in self.senders

    def __repr__(self) -> str:
        return f"Key({key_fingerprint(self)}, senders={list(self.senders)})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(repr(self), spec)

    def line(self) -> bytes:
        """The key as a line of a key file."""
        return b" ".join([bytes(self), *(sender.encode("ascii") for sender in self.senders)])


def parse_key_line(line: str, number: int = 0) -> Optional[Key]:
    """Read "KEY [SENDER ...]"; None (and a warning) for a line that cannot be read safely.

    A line whose scope cannot be read is refused whole: it must never send as
    anyone.  So is a "key" that looks like a sender (a scope wrapped onto a
    line of its own would otherwise become a key that may send as anyone).
    """
    secret, *senders = line.split()
    where = f"line {number} of the keys" if number else "a key"
    if secret.startswith("@") or (_SENDER.fullmatch(secret) and "." in secret.rpartition("@")[2]):
        log.warning("%s is ignored: its key looks like an address; a line is KEY, then its senders", where)
        return None
    key = Key(secret.encode("utf-8"), senders)
    bad = [sender for sender in senders if not (sender.isascii() and _SENDER.fullmatch(sender))]
    if bad:
        log.warning(
            "%s (key %s) is ignored: %r is neither an address nor @domain (keys hold no spaces)",
            where,
            key_fingerprint(key),
            bad[0][:100],
        )
        return None
    return key


def key_lines(text: str) -> list[str]:
    """The lines of a key file: split at line feeds only (str.splitlines() also splits at \\x85, \\x0c,
    U+2028..., which would cut a key from its senders)."""
    return [line.rstrip("\r") for line in text.split("\n")]


def parse_keys(text: Optional[str]) -> list[Key]:
    """Split a key file into keys: one per line, blank lines and outer whitespace ignored, repeats refused."""
    keys: list[Key] = []
    for number, line in enumerate(key_lines(text or ""), 1):
        key = parse_key_line(line, number) if line.strip() else None
        if key is not None and key in keys:
            log.warning("line %d of the keys is ignored: the same key is on an earlier line", number)
        elif key is not None:
            keys.append(key)
    return keys


@functools.lru_cache(maxsize=256)
def _fingerprint(secret: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", secret, b"appengine-mailer key fingerprint", 100_000).hex()[:12]


def key_fingerprint(key: bytes) -> str:
    """A short name for a key that reveals nothing of it, for listings and logs.

    A slow hash (PBKDF2, 100,000 rounds): a plain SHA-256 prefix in a log would
    let anyone who reads the logs test guesses of a short key quickly.
    """
    return _fingerprint(bytes(key))


def keys_from_environment(environ: Optional[Mapping[str, str]], root: Path) -> list[Key]:
    """Read the secret keys: env GMAIL_SECRET_KEY, else keys/, else the original's file names.

    Warns (never failing) about a key file others can read and about short keys.
    """
    environ = os.environ if environ is None else environ
    text, path = _setting("GMAIL_SECRET_KEY", environ, [root / "keys", root])
    if path is not None and text is None:
        return []  # an unreadable key file refuses every request: no older file stands in for it
    if not parse_keys(text):
        text, path = _setting("GMAIL_SECRET_KEYS", {}, [root])
    keys = parse_keys(text)
    try:
        shared = path is not None and path.stat().st_mode & 0o077
    except OSError:
        shared = False
    if shared:
        log.warning("key file %s is readable by other users: run chmod 600 %s", path, path)
    warn_short_keys(keys)
    return keys


def warn_short_keys(keys: Iterable[bytes]) -> None:
    """Log (never fail) for each key too short to resist guessing, by fingerprint."""
    for key in keys:
        if len(key) < MIN_KEY_LENGTH:
            log.warning(
                "key %s is only %d characters long: replace it with `python mailer.py keys new`",
                key_fingerprint(key),
                len(key),
            )


def key_file_paths(root: Path) -> list[Path]:
    """Every file keys_from_environment() may read keys from, in the order it looks."""
    return [root / "keys" / "GMAIL_SECRET_KEY", root / "GMAIL_SECRET_KEY", root / "GMAIL_SECRET_KEYS"]


class KeyFile:
    """The keys in a deployment's key files, read again within seconds of a change, without a restart.

    A request costs one clock read; every `interval` seconds one stat() per
    candidate file tells whether anything changed (modified, replaced, added or
    removed), and only then are the files read again.  `make keys-new` or
    `mailer.py keys retire` on a running server thus takes effect at once.
    """

    def __init__(self, root: Path, interval: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.root = root
        self.interval = interval
        self._clock = clock
        self._paths = key_file_paths(root)
        self._lock = threading.Lock()
        self._stamp = self._read_stamp()
        self._keys = keys_from_environment({}, root)
        self._next_check = clock() + interval

    def _read_stamp(self) -> tuple:
        stamp: list[Optional[tuple[int, ...]]] = []
        for path in self._paths:
            try:
                info = path.stat()
            except OSError:
                stamp.append(None)
            else:
                # ctime and mode too: a chmod that makes the file readable again changes only those.
                stamp.append((info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino, info.st_mode))
        return tuple(stamp)

    def current(self) -> list[Key]:
        """The keys valid now."""
        if self._clock() >= self._next_check:
            with self._lock:
                if self._clock() >= self._next_check:
                    self._reload_if_changed()
                    self._next_check = self._clock() + self.interval
        return self._keys

    def _reload_if_changed(self) -> None:
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._keys = keys_from_environment({}, self.root)
        log.log(
            logging.INFO if self._keys else logging.WARNING,
            "keys reloaded: %d valid (%s)",
            len(self._keys),
            ", ".join(key_fingerprint(k) for k in self._keys) or "none: every request is refused",
        )


KeySource = Union[list[Key], KeyFile]


def key_source(environ: Optional[Mapping[str, str]], root: Path) -> KeySource:
    """Keys from the environment are fixed for the process's life; keys from files follow the files."""
    environ = os.environ if environ is None else environ
    if environ.get("GMAIL_SECRET_KEY"):
        ignored = [path for path in key_file_paths(root) if path.is_file()]
        if ignored:
            log.warning("GMAIL_SECRET_KEY is set in the environment, so the key file %s is not read", ignored[0])
        return keys_from_environment(environ, root)
    return KeyFile(root)


def default_sender_from_environment(environ: Optional[Mapping[str, str]], root: Path) -> Optional[str]:
    """Read the optional default sender the same way as the keys."""
    environ = os.environ if environ is None else environ
    value, _ = _setting("GMAIL_DEFAULT_SENDER", environ, [root / "keys", root])
    return value.strip() or None if value else None


def smtp_mode(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether the SDK will deliver through SMTP instead of the Mail API."""
    environ = os.environ if environ is None else environ
    return environ.get("APPENGINE_USE_SMTP_MAIL_SERVICE") == "true"


def on_app_engine(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process runs on App Engine standard (where the Mail API is real)."""
    environ = os.environ if environ is None else environ
    return environ.get("GAE_ENV", "").startswith("standard")


def flag_setting(environ: Mapping[str, str], name: str) -> bool:
    """A yes/no setting from the environment (true/yes/on/1 mean yes)."""
    return environ.get(name, "").strip().lower() in TRUE_WORDS


def number_setting(environ: Mapping[str, str], name: str, default: float, *, whole: bool = False) -> float:
    """A positive (finite; with `whole`, whole) number from the environment; a bad one stops the server."""
    text = environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = 0
    if not (math.isfinite(value) and value > 0) or (whole and value != int(value)):
        kind = "a positive whole number" if whole else "a positive number"
        print(f"mailer.py: {name} must be {kind}, not {text!r}", file=sys.stderr)
        raise SystemExit(EX_CONFIG)
    return value


def checked_keys(keys: Union[Iterable[Union[bytes, str]], bytes, str]) -> list[Key]:
    """Keys given to make_app: one or several, bytes, str or Key; a blank one refused, a short one warned of."""
    if isinstance(keys, (bytes, str)):
        keys = [keys]
    checked = []
    for number, key in enumerate(keys, 1):
        if isinstance(key, str):
            key = key.encode("utf-8")
        if not isinstance(key, bytes):
            raise TypeError(f"make_app: key #{number} is a {type(key).__name__}, not bytes or str")
        if not isinstance(key, Key):
            key = Key(key)  # may send as anyone; pass a Key to scope it to its senders
        if not key.decode("utf-8", "replace").strip():  # str.strip() knows Unicode spaces such as U+00A0
            raise ValueError(f"make_app: key #{number} is blank: a blank key would let anyone send")
        if len(key) < MIN_KEY_LENGTH:
            log.warning(
                "key %s is only %d characters long: use `python mailer.py keys new`", key_fingerprint(key), len(key)
            )
        checked.append(key)
    if not checked:
        log.warning("make_app: no key given: every request will be refused (503)")
    return checked
