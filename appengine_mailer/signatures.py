"""Who may send: v1/v2 signature checks, and the replay stores that make v2 idempotent.

The wire format (what is signed, and how) is defined once in gmail.py, which
clients and server share.  Every configured key is tried with
hmac.compare_digest, so the time taken does not tell which key matched.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence

import gmail

from .errors import BadRequest, Forbidden
from .settings import Key, key_fingerprint

log = logging.getLogger("appengine_mailer")

SENT, PENDING = "sent", "pending"
# A 400 about the client's setup (its key, its clock) rather than the message says so in a header:
# clients keep such mail for later instead of bouncing it.
BAD_SIGNATURE_HEADERS = ((gmail.ERROR_HEADER, gmail.BAD_SIGNATURE),)
CLOCK_SKEW_HEADERS = ((gmail.ERROR_HEADER, gmail.CLOCK_SKEW),)


def check_signature(keys: Sequence[bytes], msg: bytes, signature: bytes) -> bytes:
    """Accept a v1 request if its signature matches any configured key; return that key."""
    return _match_any(keys, lambda key: gmail.sign_v1(key, msg), signature.strip())


def _match_any(keys: Sequence[bytes], expected_for: Callable[[bytes], str], given: bytes) -> bytes:
    # Every key is tried, so the time taken does not tell which one matched.
    matches = [hmac.compare_digest(expected_for(key).encode("ascii"), given) for key in keys]
    if not any(matches):
        raise BadRequest("signature does not match the message under any configured key", BAD_SIGNATURE_HEADERS)
    return keys[matches.index(True)]


def check_signature_v2(
    keys: Sequence[bytes], form: Mapping[str, bytes], fix_sender: bool, now: float, window: int
) -> tuple[str, bytes]:
    """Accept a v2 request: signature over tag, timestamp, fix_sender and msg, within the window.

    Returns the signature, which names this exact request for the replay store, and the key that signed it.
    """
    raw_stamp = form.get("timestamp", b"")
    if not (raw_stamp.isascii() and raw_stamp.isdigit() and len(raw_stamp) <= 12):
        raise BadRequest(
            f"timestamp {raw_stamp.decode('ascii', 'replace')!r} is not a whole number of "
            f"seconds since 1970 (signature_v2 needs one)"
        )
    stamp = raw_stamp.decode("ascii")
    signature = form["signature_v2"].strip().lower()
    key = _match_any(keys, lambda key: gmail.sign_v2(key, stamp, fix_sender, form["msg"]), signature)
    age = now - int(stamp)
    if age > window:
        raise BadRequest(
            f"request expired: signed at {stamp}, server time is {int(now)} (requests are valid for {window} s)",
            CLOCK_SKEW_HEADERS,
        )
    if age < -window:
        raise BadRequest(
            f"request is from the future: signed at {stamp}, server time is {int(now)}; check the client's clock",
            CLOCK_SKEW_HEADERS,
        )
    return signature.decode("ascii"), key


def check_senders_allowed(key: bytes, senders: Iterable[str]) -> None:
    """Refuse (403) the first sender outside the scope of the key that signed the request."""
    if not isinstance(key, Key):
        return
    for sender in senders:
        if not key.allows(sender):
            raise Forbidden(
                f"the key {key_fingerprint(key)} may not send as {sender!r}: it may send only as "
                f"{', '.join(key.senders)}"
            )


# ---------------------------------------------------------------------------
# Replay stores: each sent v2 request is remembered for its window
# ---------------------------------------------------------------------------


class ReplayStore(Protocol):
    """Where accepted v2 requests are remembered: claim before sending, then mark sent or release."""

    def claim(self, key: str, ttl: float) -> Optional[str]: ...

    def mark_sent(self, key: str, ttl: float) -> None: ...

    def release(self, key: str) -> None: ...


class InProcessReplayStore:
    """Remember requests in this process, at most `max_entries` of them, oldest forgotten first.

    For a single-process server; every entry expires with its request's window.
    """

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, key: str, ttl: float) -> Optional[str]:
        """Mark `key` pending and return None, or return its state if it is already known."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[1] > now:
                return entry[0]
            self._entries.pop(key, None)
            while len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
            self._entries[key] = (PENDING, now + ttl)
        return None

    def mark_sent(self, key: str, ttl: float) -> None:
        with self._lock:
            self._entries[key] = (SENT, self._clock() + ttl)

    def release(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class MemcacheReplayStore:
    """Remember requests in App Engine's bundled memcache, shared by every instance."""

    NAMESPACE = "appengine-mailer-replay"

    def __init__(self) -> None:
        from google.appengine.api import memcache

        self._memcache = memcache

    def claim(self, key: str, ttl: float) -> Optional[str]:
        if self._memcache.add(key, PENDING, time=max(1, int(ttl)), namespace=self.NAMESPACE):
            return None
        state = self._memcache.get(key, namespace=self.NAMESPACE)
        if state is None:
            # Memcache is unavailable or just evicted it: send rather than refuse mail.
            log.warning("replay store unavailable; sending without the duplicate check")
        return state

    def mark_sent(self, key: str, ttl: float) -> None:
        self._memcache.set(key, SENT, time=max(1, int(ttl)), namespace=self.NAMESPACE)

    def release(self, key: str) -> None:
        self._memcache.delete(key, namespace=self.NAMESPACE)
