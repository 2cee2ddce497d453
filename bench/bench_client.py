"""Client benchmark: gmail.py against the floor of one connection, and send_many against one connection.

The server is the reference proxy from tests/ (HTTP/1.1 keep-alive, checks every
signature), running in its own process; a second one takes `--delay` seconds
(20 ms) over each request, standing in for the network and the Mail API.

One connection, no delay (`--messages`, 300):
  `bare`       an http.client keep-alive loop doing only the protocol's work:
               serialize, sign (v1 + v2), urlencode, POST, read the answer;
  `send_mail`  a send_mail loop over one GmailProxy, all of its features on;
  `many(1)`    send_many(concurrency=1);
  `seed`       the original client: urlencode, sign and open a new connection
               per message with urllib.
Several connections, 20 ms per request (`--batch`, 500 messages):
  `send_mail`  the send_mail loop again, and send_many at concurrency 1, 2, 4, 6, 8
               (the default), 16 and 32.
Several connections to the real proxy (`python mailer.py`, delivering into its
Maildir outbox) on this machine, no delay (`--proxy-batch`, 300 messages): where
the proxy's own work, not the wait, sets the pace.

Rounds alternate and rotate the order; each ratio is the median of per-round
ratios, measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gmail  # noqa: E402

KEY = b"test-key-0123456789abcdef"  # the key tests/reference_server.py is started with below
SERVER = """
import sys
sys.path.insert(0, {tests!r})
from reference_server import ReferenceServer
server = ReferenceServer({key!r})
server.delay = {delay!r}
print(server.url, flush=True)
sys.stdin.read()
"""
CONCURRENCIES = tuple(sorted({2, 4, 6, gmail.DEFAULT_CONCURRENCY, 16, 32}))


def messages(count: int) -> list[EmailMessage]:
    result = []
    for i in range(count):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.com", f"user{i}@example.com", f"Notice {i}"
        msg.set_content(f"Hello user {i},\n\nyour report is ready.\n")
        result.append(msg)
    return result


def bare(url: str, batch_messages) -> None:
    """The floor of one kept-alive connection: the protocol's work and nothing else."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        for msg in batch_messages:
            conn.request("POST", parts.path, gmail.encode_form(msg.as_bytes(), KEY), gmail.REQUEST_HEADERS)
            response = conn.getresponse()
            response.read()
            assert response.status == 204
    finally:
        conn.close()


def send_mail(url: str, batch_messages) -> None:
    with gmail.GmailProxy(KEY, url) as proxy:
        for msg in batch_messages:
            proxy.send_mail(msg)


def send_many(concurrency: int):
    def run(url: str, batch_messages) -> None:
        with gmail.GmailProxy(KEY, url) as proxy:
            assert all(proxy.send_many(batch_messages, concurrency))

    return run


def seed(url: str, batch_messages) -> None:
    """The original client: one urllib request, so one new connection, per message."""
    for msg in batch_messages:
        raw = msg.as_string()
        signature = base64.b64encode(hmac.new(KEY, raw.encode(), hashlib.sha1).digest()).strip()
        body = urlencode({"msg": raw, "signature": signature}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=30) as response:
            assert response.status == 204


def measure(pipelines: dict, url: str, batch_messages, rounds: int) -> dict:
    """Seconds per run of each pipeline, per round, in alternating and rotating order."""
    for function in pipelines.values():
        function(url, batch_messages[:20])  # warm up
    times: dict = {name: [] for name in pipelines}
    names = list(pipelines)
    for round_number in range(rounds):
        shift = round_number % len(names)
        order = names[shift:] + names[:shift]
        if round_number % 2:
            order.reverse()
        for name in order:
            start = time.perf_counter()
            pipelines[name](url, batch_messages)
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict, numerator: str, denominator: str) -> float:
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def start_server(delay: float) -> tuple:
    code = SERVER.format(tests=str(ROOT / "tests"), key=KEY, delay=delay)
    server = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return server, server.stdout.readline().strip()


def start_proxy(outbox: str) -> tuple:
    """The real proxy, `python mailer.py`, on a free port, delivering into `outbox`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GMAIL_", "APPENGINE_", "GAE_"))}
    env.update(GMAIL_SECRET_KEY=KEY.decode(), GMAIL_OUTBOX=outbox)
    command = [sys.executable, str(ROOT / "mailer.py"), "--host", "127.0.0.1", "--port", "0"]
    server = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    match = re.search(r"http://127\.0\.0\.1:\d+/", server.stdout.readline())
    if not match:
        server.kill()
        raise RuntimeError("mailer.py did not start")
    return server, match.group(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300, help="messages per run over one connection")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batch", type=int, default=500, help="messages per run with the delay")
    parser.add_argument("--batch-rounds", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds the delayed server takes per request")
    parser.add_argument("--proxy-batch", type=int, default=300, help="messages per run through the real proxy")
    parser.add_argument("--proxy-rounds", type=int, default=9)
    args = parser.parse_args(argv)
    fast, fast_url = start_server(0.0)
    slow, slow_url = start_server(args.delay)
    outbox = tempfile.TemporaryDirectory()
    proxy, proxy_url = start_proxy(os.path.join(outbox.name, "outbox"))
    try:
        pipelines = {"bare": bare, "send_mail": send_mail, "many(1)": send_many(1), "seed": seed}
        times = measure(pipelines, fast_url, messages(args.messages), args.rounds)
        medians = ", ".join(f"{name} {statistics.median(t) * 1000:.0f}" for name, t in times.items())
        print(f"one connection, no delay, {args.messages} messages (median ms): {medians}")
        floor = {
            "send_mail/bare": ratio(times, "send_mail", "bare"),
            "many(1)/bare": ratio(times, "many(1)", "bare"),
            "batch/seed": ratio(times, "send_mail", "seed"),
        }
        print("  " + "   ".join(f"{name} {value:.2f}" for name, value in floor.items()))

        pipelines = {"send_mail": send_mail, "many(1)": send_many(1)}
        pipelines.update({f"many({n})": send_many(n) for n in CONCURRENCIES})
        times = measure(pipelines, slow_url, messages(args.batch), args.batch_rounds)
        medians = ", ".join(f"{name} {statistics.median(t):.2f}" for name, t in times.items())
        print(f"{args.delay * 1000:g} ms per request, {args.batch} messages (median s): {medians}")
        scaling = [f"many({n})/many(1) {ratio(times, f'many({n})', 'many(1)'):.3f}" for n in CONCURRENCIES]
        print(f"  many(1)/send_mail {ratio(times, 'many(1)', 'send_mail'):.3f}   " + "   ".join(scaling))
        default = f"many({gmail.DEFAULT_CONCURRENCY})"
        many_1 = ratio(times, "many(1)", "send_mail")
        limits = {f"many({n})/many(1)": ratio(times, f"many({n})", "many(1)") for n in CONCURRENCIES}

        pipelines = {"many(1)": send_many(1), **{f"many({n})": send_many(n) for n in CONCURRENCIES}}
        times = measure(pipelines, proxy_url, messages(args.proxy_batch), args.proxy_rounds)
        medians = ", ".join(f"{name} {statistics.median(t):.2f}" for name, t in times.items())
        print(f"the real proxy on this machine, {args.proxy_batch} messages (median s): {medians}")
        print(
            "  " + "   ".join(f"many({n})/many(1) {ratio(times, f'many({n})', 'many(1)'):.3f}" for n in CONCURRENCIES)
        )
        print(
            f"client send_mail/bare: {floor['send_mail/bare']:.2f}  many(1)/send_mail: {many_1:.2f}  "
            f"{default}/many(1): {limits[default + '/many(1)']:.2f}  batch/seed: {floor['batch/seed']:.2f}"
        )
    finally:
        for server in (fast, slow):
            server.stdin.close()
            server.wait(10)
        proxy.terminate()
        proxy.wait(10)
        outbox.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
