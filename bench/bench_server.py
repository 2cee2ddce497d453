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

Then memory for four shapes of mail at about 100 KB and 10 MB (a long 8-bit
text body, a quoted-printable HTML body, 100 small attachments, one big
attachment): the tracemalloc peak of one request in this process, and the peak
RSS growth of a real `python mailer.py` process sending it (SMTP mode into a
local sink, and the outbox), both per byte of message.
"""

from __future__ import annotations

import argparse
import binascii
import email
import hashlib
import hmac
import http.client
import io
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
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

# Each request's log line is made, as in production, but goes nowhere: writing thousands of lines to
# a terminal would measure the terminal.
logging.getLogger().addHandler(logging.NullHandler())

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


# --------------------------------------------------------------------------- shapes of mail


def _headers(msg: EmailMessage) -> None:
    msg["From"] = "Benchmark Sender <sender@example.com>"
    msg["To"] = "First <one@example.com>, second@example.com"
    msg["Subject"] = "Benchmark message"


def eight_bit_text(size: int) -> bytes:
    """One long text/plain body, UTF-8 sent as 8-bit (no transfer encoding), as most mail clients write it."""
    line = "Grüße aus Köln, the quick brown fox jumps over the lazy dog. ½ € ✓\n".encode()
    head = (
        b"From: Benchmark Sender <sender@example.com>\nTo: one@example.com\nSubject: Benchmark message\n"
        b"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    )
    return head + line * (size // len(line))


def quoted_printable_html(size: int) -> bytes:
    """A short text body and a long HTML alternative in quoted-printable (a newsletter)."""
    msg = EmailMessage()
    _headers(msg)
    msg.set_content("Hello, see the HTML version.\n")
    row = '<tr><td class="name">Grüße</td><td style="color: #333">quick brown fox = lazy dog</td></tr>\n'
    html = "<html><body><table>\n" + row * (size * 10 // 12 // len(row)) + "</table></body></html>\n"
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    return msg.as_bytes()


def hundred_attachments(size: int) -> bytes:
    msg = EmailMessage()
    _headers(msg)
    msg.set_content("The files are attached.\n")
    for index in range(100):
        msg.add_attachment(os.urandom(size * 3 // 4 // 100), "application", "octet-stream", filename=f"f{index}.bin")
    return msg.as_bytes()


def one_attachment(size: int) -> bytes:
    return build_message(size * 3 // 4)[0]


SHAPES = {
    "8-bit text": eight_bit_text,
    "QP HTML": quoted_printable_html,
    "100 attachments": hundred_attachments,
    "1 attachment": one_attachment,
}
MEMORY_SIZES = {"100 KB": 100_000, "10 MB": 10_000_000}


def form_body(msg: bytes) -> bytes:
    return urlencode({"msg": msg, "signature": gmail.sign_v1(KEY, msg)}).encode("ascii")


def memory_table(sizes: dict) -> list:
    """Rows of (shape, per size: (message bytes, proxy peak per byte, seed peak per byte))."""
    proxy = make_proxy()
    rows = []
    for shape, build in SHAPES.items():
        cells = []
        for size in sizes.values():
            msg = build(size)
            body = form_body(msg)
            proxy(body)  # warm up
            cells.append((len(msg), peak_memory(proxy, body) / len(msg), peak_memory(seed, body) / len(msg)))
        rows.append((shape, cells))
    return rows


# --------------------------------------------------------------------------- peak RSS of the real server


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _post(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def rss_growth(msg: bytes, env: dict) -> tuple[int, int]:
    """Start `python mailer.py`, send one small then `msg`; return (baseline peak RSS, growth) in bytes."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "mailer.py"), "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = int(re.search(r":(\d+)/", server.stdout.readline()).group(1))  # type: ignore[union-attr]
        assert _post(port, form_body(eight_bit_text(1000))) == 204
        baseline = _peak_rss(server.pid)
        assert _post(port, form_body(msg)) == 204
        return baseline, _peak_rss(server.pid) - baseline
    finally:
        server.terminate()
        server.wait()


def rss_table(size: int) -> tuple[list, int]:
    """Rows of (shape, message bytes, growth per byte in SMTP mode, in the outbox); and the baseline."""
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"

    with socket.socket() as probe:  # aiosmtpd needs the port number before it listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = Controller(Sink(), hostname="127.0.0.1", port=port, data_size_limit=256 * 1024 * 1024)
    sink.start()
    rows, baselines = [], []
    try:
        with tempfile.TemporaryDirectory() as outbox:
            plain = {k: v for k, v in os.environ.items() if not k.startswith(("GMAIL_", "APPENGINE_", "GAE_"))}
            plain.update(GMAIL_SECRET_KEY=KEY.decode(), GMAIL_OUTBOX=os.path.join(outbox, "outbox"))
            smtp = dict(
                plain,
                APPENGINE_USE_SMTP_MAIL_SERVICE="true",
                APPENGINE_SMTP_HOST="127.0.0.1",
                APPENGINE_SMTP_PORT=str(port),
                APPENGINE_SMTP_USE_TLS="false",
            )
            for shape, build in SHAPES.items():
                msg = build(size)
                growth = []
                for env in (smtp, plain):
                    baseline, grown = rss_growth(msg, env)
                    baselines.append(baseline)
                    growth.append(grown / len(msg))
                rows.append((shape, len(msg), *growth))
    finally:
        sink.stop()
    return rows, max(baselines)


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
    sizes = {"100 KB": 100_000} if args.quick else MEMORY_SIZES
    print("\npeak memory per message byte (tracemalloc, one request): proxy (seed)")
    print(f"{'shape':>16} " + " ".join(f"{label:>17}" for label in sizes))
    worst_memory = 0.0
    for shape, cells in memory_table(sizes):
        worst_memory = max(worst_memory, *(proxy_peak for _, proxy_peak, _ in cells))
        print(f"{shape:>16} " + " ".join(f"{p:>7.2f}x ({s:>5.1f}x)" for _, p, s in cells))
    rss_size = 1_000_000 if args.quick else 10_000_000
    rss_rows, baseline = rss_table(rss_size)
    print(f"\nserver peak RSS growth per message byte (python mailer.py, baseline {baseline / 1e6:.0f} MB)")
    print(f"{'shape':>16} {'bytes':>10} {'SMTP mode':>10} {'outbox':>10}")
    for shape, size, smtp, outbox in rss_rows:
        print(f"{shape:>16} {size:>10} {smtp:>9.2f}x {outbox:>9.2f}x")
    print(f"worst memory (tracemalloc): {worst_memory:.2f}")
    print(f"worst proxy/seed: {worst_seed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
