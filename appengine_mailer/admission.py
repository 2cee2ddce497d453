"""Admission control: how many megabytes of request bodies one process works on at once.

Working on a message costs a few times its size in memory (bench/README.md has
the figures), so a burst of large messages could take an instance past its
memory even though each one alone fits.  Every POST asks for its Content-Length
here before its body is read; one that would go over the budget waits briefly
for others to finish, then gets 503 with Retry-After, which gmail.py and its
spool honour.  Requests are let in first come, first served, so a large one is
not starved by a stream of small ones, and one larger than the whole budget is
let in alone (the body limit still caps it), never refused for good.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import ServiceUnavailable

MB = 1024 * 1024
DEFAULT_MAX_INFLIGHT_MB = 48  # what app.yaml's F2 layout holds with margin: bench/README.md, "Admission control"
DEFAULT_WAIT_SECONDS = 3.0
RETRY_AFTER_SECONDS = 2


class Admission:
    """A budget of request-body bytes in flight, shared by the threads of one process."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        wait: float = DEFAULT_WAIT_SECONDS,
        retry_after: int = RETRY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if budget_bytes <= 0:
            raise ValueError(f"the in-flight budget must be positive, not {budget_bytes!r}")
        self.budget = budget_bytes
        self.wait = wait
        self.retry_after = retry_after
        self.clock = clock
        self.in_flight = 0  # bytes of the requests let in and not yet finished
        self._tickets = itertools.count()
        self._queue: deque[int] = deque()  # tickets of the requests waiting, oldest first
        self._changed = threading.Condition()

    @contextmanager
    def admit(self, size: int) -> Iterator[None]:
        """Hold `size` bytes of the budget for the duration; raise ServiceUnavailable if they never free up."""
        self._enter(size)
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= size
                self._changed.notify_all()

    def _fits(self, size: int) -> bool:
        return self.in_flight == 0 or self.in_flight + size <= self.budget

    def _enter(self, size: int) -> None:
        with self._changed:
            if not self._queue and self._fits(size):
                self.in_flight += size
                return
            ticket = next(self._tickets)
            self._queue.append(ticket)
            deadline = self.clock() + self.wait
            try:
                while not (self._queue[0] == ticket and self._fits(size)):
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        raise ServiceUnavailable(
                            f"the proxy is busy with {self.in_flight // MB} MB of messages; retry shortly",
                            retry_after=self.retry_after,
                        )
                    self._changed.wait(remaining)
                self.in_flight += size
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now
