"""Client benchmark: 300 messages through one GmailProxy versus the original client.

The server is the reference proxy from tests/ (HTTP/1.1 keep-alive, checks every
signature), running in its own process.  `batch` sends all messages through one
GmailProxy, all of its features on (v2 and v1 signatures, retry logic);
`seed` does what the original client did: urlencode, sign and open a new
connection per message with urllib.  Rounds alternate, rotating order; the last
line is the median of the per-round ratios batch/seed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import statistics
import subprocess
import sys
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gmail  # noqa: E402

KEY = b"test-key-0123456789abcdef"  # the key tests/reference_server.py is started with below
SERVER = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "tests")!r})
from reference_server import ReferenceServer
server = ReferenceServer({KEY!r})
print(server.url, flush=True)
sys.stdin.read()
"""


def messages(count: int) -> list[EmailMessage]:
    result = []
    for i in range(count):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.com", f"user{i}@example.com", f"Notice {i}"
        msg.set_content(f"Hello user {i},\n\nyour report is ready.\n")
        result.append(msg)
    return result


def batch(url: str, batch_messages) -> None:
    with gmail.GmailProxy(KEY, url) as proxy:
        for msg in batch_messages:
            proxy.send_mail(msg)


def seed(url: str, batch_messages) -> None:
    """The original client: one urllib request, so one new connection, per message."""
    for msg in batch_messages:
        raw = msg.as_string()
        signature = base64.b64encode(hmac.new(KEY, raw.encode(), hashlib.sha1).digest()).strip()
        body = urlencode({"msg": raw, "signature": signature}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as response:
            assert response.status == 204


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        batch_messages = messages(args.messages)
        pipelines = {"batch": batch, "seed": seed}
        for function in pipelines.values():
            function(url, batch_messages[:20])  # warm up
        times = {name: [] for name in pipelines}
        names = list(pipelines)
        for round_number in range(args.rounds):
            for name in names[round_number % 2 :] + names[: round_number % 2]:
                start = time.perf_counter()
                pipelines[name](url, batch_messages)
                times[name].append(time.perf_counter() - start)
        ratio = statistics.median(b / s for b, s in zip(times["batch"], times["seed"]))
        print(
            f"{args.messages} messages: batch {statistics.median(times['batch']) * 1000:.0f} ms, "
            f"seed {statistics.median(times['seed']) * 1000:.0f} ms"
        )
        print(f"client batch/seed: {ratio:.2f}")
    finally:
        server.stdin.close()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
