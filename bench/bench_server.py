"""Server benchmark: mailer.app against the original pipeline and against the least possible work.

Run with `make bench` (or `python bench/bench_server.py`).  In one process, for
messages of about 1 KB, 100 KB and 10 MB (text + HTML + a PDF attachment of that
size, two recipients), it times three pipelines side by side in alternating
rounds, rotating their order, all sending through the same `mail` stub, which only
serializes the request:

- proxy: mailer.app called as a WSGI callable;
- seed:  the original pipeline in Python 3: parse_qs -> email.message_from_bytes
         -> mail.EmailMessage(mime_message=...) -> send();
- floor: HMAC over the message, base64-decoding its attachment, send() of an
         EmailMessage built beforehand.

Each ratio is the median of the per-round ratios, so drift of the machine hits all
three alike.  Peak memory is measured with tracemalloc, per byte of message.
"""

from __future__ import annotations

import argparse
import binascii
import email
import hashlib
import hmac
import io
import os
import statistics
import sys
import time
import tracemalloc
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GMAIL_OUTBOX", str(ROOT / ".pytest_cache" / "bench-outbox"))

from google.appengine.api import apiproxy_stub_map, mail  # noqa: E402

import gmail  # noqa: E402
import mailer  # noqa: E402

KEY = b"benchmark-key-0123456789abcdef"
SIZES = {"1 KB": 1_000, "100 KB": 100_000, "10 MB": 10_000_000}
# (iterations per round, rounds): small messages repeat inside a round to be measurable.
PLAN = {"1 KB": (100, 15), "100 KB": (10, 15), "10 MB": (1, 7)}


class SerializingStub:
    """A `mail` stub that does only what any transport must: serialize the request."""

    def MakeSyncCall(self, service, call, request, response):
        request.SerializeToString()


def build_message(size: int) -> tuple[bytes, bytes]:
    """Return (message bytes, attachment bytes) for a message with a `size`-byte PDF."""
    pdf = b"%PDF-1.4\n" + os.urandom(max(0, size - 9))
    msg = EmailMessage()
    msg["From"] = "Benchmark Sender <sender@example.com>"
    msg["To"] = "First <one@example.com>, second@example.com"
    msg["Subject"] = "Benchmark message"
    msg.set_content("Hello,\n\nthe report is attached.\n")
    msg.add_alternative("<p>Hello,</p><p>the report is <b>attached</b>.</p>", subtype="html")
    msg.add_attachment(pdf, "application", "pdf", filename="report.pdf")
    return msg.as_bytes(), pdf


def wsgi_environ(body: bytes) -> dict:
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "SERVER_NAME": "bench",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }


def make_proxy():
    app = mailer.make_app([KEY])

    def proxy(body: bytes) -> None:
        status = []
        b"".join(app(wsgi_environ(body), lambda s, h: status.append(s)))
        assert status == ["204 No Content"], status

    return proxy


def seed(body: bytes) -> None:
    """The original server's pipeline, translated to Python 3."""
    fields = parse_qs(body.decode("ascii"), encoding="latin-1")
    msg = fields["msg"][0].encode("latin-1")
    signature = fields["signature"][0].encode("ascii")
    expected = gmail.sign_v1(KEY, msg).encode("ascii")
    if not hmac.compare_digest(expected, signature):
        raise ValueError("bad signature")
    mail.EmailMessage(mime_message=email.message_from_bytes(msg)).send()


def make_floor(msg: bytes, pdf: bytes):
    """The least work: authenticate, decode the attachment, send a prebuilt message."""
    prebuilt = mail.EmailMessage(
        sender="Benchmark Sender <sender@example.com>",
        to=["First <one@example.com>", "second@example.com"],
        subject="Benchmark message",
        body="Hello,\n\nthe report is attached.\n",
        html="<p>Hello,</p><p>the report is <b>attached</b>.</p>",
        attachments=[mail.Attachment("report.pdf", pdf)],
    )
    encoded = binascii.b2a_base64(pdf)

    def floor(body: bytes) -> None:
        hmac.new(KEY, msg, hashlib.sha1).digest()
        binascii.a2b_base64(encoded)
        prebuilt.send()

    return floor


def timed(function, body: bytes, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        function(body)
    return (time.perf_counter() - start) / iterations


def peak_memory(function, body: bytes) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    function(body)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (for a smoke test)")
    args = parser.parse_args(argv)
    apiproxy_stub_map.apiproxy.ReplaceStub("mail", SerializingStub())
    proxy = make_proxy()
    rows, worst_seed = [], 0.0
    for label, size in SIZES.items():
        msg, pdf = build_message(size)
        body = urlencode({"msg": msg, "signature": gmail.sign_v1(KEY, msg)}).encode("ascii")
        pipelines = {"proxy": proxy, "seed": seed, "floor": make_floor(msg, pdf)}
        iterations, rounds = PLAN[label]
        if args.quick:
            iterations, rounds = max(1, iterations // 10), 3
        for function in pipelines.values():  # warm up
            function(body)
        times = {name: [] for name in pipelines}
        names = list(pipelines)
        for round_number in range(rounds):
            order = names[round_number % 3 :] + names[: round_number % 3]
            for name in order:
                times[name].append(timed(pipelines[name], body, iterations))
        vs_seed = statistics.median(p / s for p, s in zip(times["proxy"], times["seed"]))
        vs_floor = statistics.median(p / f for p, f in zip(times["proxy"], times["floor"]))
        memory = {name: peak_memory(pipelines[name], body) / len(msg) for name in ("proxy", "seed")}
        worst_seed = max(worst_seed, vs_seed)
        rows.append(
            (
                label,
                len(msg),
                *(statistics.median(times[n]) * 1000 for n in names),
                vs_seed,
                vs_floor,
                memory["proxy"],
                memory["seed"],
            )
        )
    print(
        f"{'message':>8} {'bytes':>10} {'proxy ms':>9} {'seed ms':>9} {'floor ms':>9} {'proxy/seed':>10} "
        f"{'proxy/floor':>11} {'mem proxy':>9} {'mem seed':>9}"
    )
    for label, size, p, s, f, r_seed, r_floor, m_proxy, m_seed in rows:
        print(
            f"{label:>8} {size:>10} {p:>9.2f} {s:>9.2f} {f:>9.2f} {r_seed:>10.2f} {r_floor:>11.2f} "
            f"{m_proxy:>8.2f}x {m_seed:>8.2f}x"
        )
    print(f"worst proxy/seed: {worst_seed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
