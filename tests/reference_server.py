"""A reference proxy written only from the documented interface, not from mailer.py.

POST / with urlencoded `msg` and `signature` = base64(HMAC-SHA1(key, msg)); 204 when
the signature matches, 400 with a reason otherwise (and `X-Appengine-Mailer-Error:
bad-signature` when the signature matches no key); 413 from Content-Length, before
reading, over its size limit.  It records what it accepted and how many connections
it saw, and can be told to answer with another status, to take `delay` seconds over each
request (standing in for the network and the Mail API), and to answer `busy_status` (429 or
503, with Retry-After) to a request that arrives while `busy_limit` others are under way.
`in_flight_seen` is how many requests were under way, itself included, as each arrived.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # clients that open many connections at once are not made to wait for a SYN retry


class ReferenceServer:
    def __init__(self, key: bytes):
        self.key = key
        self.accepted: list[dict] = []
        self.connections = 0
        self.requests = 0
        self.force_status: int | None = None
        self.force_reason = "forced failure"
        self.close_after_each = False
        self.force_times: int | None = None  # answer force_status this many times only (None: always)
        self.drop_times = 0  # close the connection without answering this many times
        self.force_if: bytes | None = None  # answer force_status only to requests whose body holds this
        self.force_headers: dict[str, str] = {}  # sent with force_status, e.g. a Location
        self.force_after = 0  # answer force_status only once this many requests were let through
        self.let_through = 0
        self.retry_after: str | None = None  # sent with every 429 and 503
        self.max_body = 32 * 1024 * 1024
        self.bodies: list[bytes] = []
        self.delay = 0.0  # seconds spent on each request before answering
        self.busy_limit: int | None = None  # more requests than this under way at once: busy_status
        self.busy_status = 429
        self.in_flight = 0
        self.in_flight_seen: list[int] = []
        self.answered: list[int] = []  # the status of each answer, in order
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with server.lock:
                    server.connections += 1

            def log_message(self, *args):
                pass

            def answer(self, status: int, text: str = "", headers: dict | None = None):
                body = text.encode()
                self.send_response(status)
                if body:
                    self.send_header("Content-Type", "text/plain")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                if server.retry_after is not None and status in (429, 503):
                    self.send_header("Retry-After", server.retry_after)
                if server.close_after_each:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.in_flight_seen.append(server.in_flight)
                    busy = server.busy_limit is not None and server.in_flight > server.busy_limit
                answer = None
                try:
                    answer = self.decide(busy)
                finally:
                    with server.lock:  # before answering: the client may send again as soon as it has the answer
                        server.in_flight -= 1
                        if answer is not None:
                            server.answered.append(answer[0])
                if answer is not None:
                    self.answer(*answer)

            def decide(self, busy: bool) -> tuple | None:
                if int(self.headers["Content-Length"]) > server.max_body:
                    self.close_connection = True  # the body is not read
                    return 413, f"request body over the {server.max_body}-byte limit"
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path.split("?")[0] != "/":
                    return 404, "not found"  # the documented interface is POST / alone
                server.bodies.append(body)
                if server.delay:
                    time.sleep(server.delay)
                with server.lock:
                    drop = server.drop_times > 0
                    server.drop_times -= drop
                if drop:
                    self.close_connection = True
                    return None
                if busy:
                    return server.busy_status, "too many requests at once"
                # latin-1 maps each percent-decoded byte to one character and back.
                fields = parse_qs(body.decode("ascii"), keep_blank_values=True, encoding="latin-1")
                forced = server.force_if is None or server.force_if in body
                with server.lock:
                    forced = forced and bool(server.force_status) and server.force_times != 0
                    forced = forced and server.let_through >= server.force_after
                    if forced and server.force_times:
                        server.force_times -= 1
                    server.let_through += not forced
                if forced:
                    return server.force_status, server.force_reason, server.force_headers
                if "msg" not in fields or "signature" not in fields:
                    return 400, "missing parameters"
                msg = fields["msg"][0].encode("latin-1")
                expected = base64.b64encode(hmac.new(server.key, msg, hashlib.sha1).digest())
                if not hmac.compare_digest(expected, fields["signature"][0].strip().encode("latin-1")):
                    return 400, "malformed signature", {"X-Appengine-Mailer-Error": "bad-signature"}
                server.accepted.append({"msg": msg, **{k: v[0] for k, v in fields.items() if k != "msg"}})
                return (204,)

        return Handler
