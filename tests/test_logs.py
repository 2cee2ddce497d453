"""One log line per request outcome wherever the app runs, JSON on App Engine, never a key or a body."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import webtest

import mailer
from appengine_mailer import logs
from conftest import KEY, ROOT, form, free_port, server_env
from test_mailer import make_message
from test_mailer_e2e import post

SECRET_BODY = "TOP-SECRET-BODY-TEXT"


def secret_message() -> bytes:
    msg = make_message()
    msg.set_content(SECRET_BODY)
    return msg.as_bytes()


class Entrypoint:
    """app.yaml's entrypoint, run locally with the same command line, its output collected."""

    def __init__(self, env: dict):
        self.port = free_port()
        with open(ROOT / "app.yaml") as f:
            line = next(line for line in f if line.startswith("entrypoint:"))
        command = line.split(":", 1)[1].strip().replace("$PORT", str(self.port))
        bin_dir = str(Path(sys.executable).parent)
        env = {**env, "PORT": str(self.port), "PATH": bin_dir + os.pathsep + env.get("PATH", "")}
        self.proc = subprocess.Popen(
            shlex.split(command), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.output: list[str] = []
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=lambda s=stream: self.output.extend(s), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("entrypoint did not start: " + "".join(self.output)) from None
                time.sleep(0.2)

    def lines_with(self, text: str, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.output) if text in line]
            if found:
                return found
            time.sleep(0.1)
        return []

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def entrypoint():
    started = []

    def start(env):
        started.append(Entrypoint(env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_deployed_entrypoint_logs_one_line_per_outcome(entrypoint, tmp_path):
    server = entrypoint(server_env(tmp_path))
    assert post(server.url, form(secret_message()))[0] == 204
    assert post(server.url, form(secret_message(), b"wrong-key-0123456789"))[0] == 400
    [sent] = server.lines_with("sent: 204")
    assert "recipients=1" in sent
    assert len(server.lines_with("refused: 400 signature does not match")) == 1
    server.stop()
    output = "".join(server.output)
    assert SECRET_BODY not in output and KEY.decode() not in output
    assert "via App Engine Mail API" not in output  # the SDK's line, false in outbox mode


def test_on_app_engine_lines_are_json_for_cloud_logging(entrypoint, tmp_path):
    server = entrypoint({**server_env(tmp_path), "GAE_ENV": "standard"})
    assert post(server.url, form(secret_message(), b"wrong-key-0123456789"))[0] == 400
    [line] = server.lines_with('"outcome": "refused"')
    entry = json.loads(line)
    assert entry["severity"] == "INFO" and entry["status"] == 400
    assert entry["message"].startswith("refused: 400 signature does not match")
    assert SECRET_BODY not in "".join(server.output)


def test_python_mailer_py_logs_outcomes(smtp_server):
    assert post(smtp_server.url, form(secret_message()))[0] == 204
    assert post(smtp_server.url, b"msg=x", timeout=10)[0] == 400
    smtp_server.stop()
    log = "".join(smtp_server.log_lines)
    assert "sent: 204" in log and "refused: 400 missing or empty field 'signature'" in log
    assert SECRET_BODY not in log and KEY.decode() not in log
    assert "Email sent successfully" not in log  # the SDK's own line, which ours replaces


def test_an_embedding_applications_logging_is_used(mail_stub, caplog):
    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)
    app = webtest.TestApp(mailer.make_app([KEY]), lint=True)
    app.post(
        "/", form(b"From: a@example.com\n\nno recipients"), content_type="application/x-www-form-urlencoded", status=400
    )
    [record] = [r for r in caplog.records if r.name == logs.LOGGER_NAME]
    assert record.getMessage().startswith("refused: 400 message has no recipients")
    assert record.fields == {
        "outcome": "refused",
        "status": 400,
        "reason": "message has no recipients in To, Cc or Bcc",
        "size": record.fields["size"],
    }


def test_cloud_logging_formatter_makes_one_json_object_per_line():
    record = logging.LogRecord("appengine_mailer", logging.WARNING, __file__, 1, "a\nb %s", ("c",), None)
    record.fields = {"outcome": "sent", "status": 204}
    line = logs.CloudLoggingFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line) == {
        "severity": "WARNING",
        "message": "a\nb c",
        "logger": "appengine_mailer",
        "outcome": "sent",
        "status": 204,
    }


def call(app, **environ) -> tuple[str, bytes]:
    """Call the WSGI app with a hand-made environ, as a lax server would pass it on."""
    import io

    answer = {}
    base = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "wsgi.input": io.BytesIO(b""),
    }
    body = b"".join(app({**base, **environ}, lambda status, headers: answer.setdefault("status", status)))
    return answer["status"], body


@pytest.mark.parametrize(
    "environ",
    [
        {"CONTENT_LENGTH": "5\n 2026-11-26 INFO appengine_mailer: sent: 204 forged"},
        {"REQUEST_METHOD": "X\x1b[2J\x1b[1;31mFAKE\x07\nsent: 204 forged"},
    ],
)
def test_a_client_cannot_forge_log_lines(mail_stub, caplog, environ):
    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)
    status, _ = call(mailer.make_app([KEY]), **environ)
    assert status.startswith(("400", "405"))
    [record] = [r for r in caplog.records if r.name == logs.LOGGER_NAME]
    line = logs.TEXT_FORMAT % {"asctime": "t", "levelname": "INFO", "name": record.name, "message": record.getMessage()}
    assert "\n" not in line and "\x1b" not in line


def test_a_long_reason_is_cut_in_the_answer_and_the_log(mail_stub, caplog):
    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)
    name = "a" * 100_000 + ".exe"
    msg = make_message()
    msg.add_attachment(b"MZ", "application", "octet-stream", filename=name)
    res = webtest.TestApp(mailer.make_app([KEY])).post(
        "/", form(msg.as_bytes()), content_type="application/x-www-form-urlencoded", status=400
    )
    assert ".exe" in res.text and len(res.text) <= 1001
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


def test_failures_are_warnings_so_severity_filters_see_them(mail_stub, caplog):
    from google.appengine.runtime import apiproxy_errors

    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)
    mail_stub.fail_with = apiproxy_errors.DeadlineExceededError("slow")
    webtest.TestApp(mailer.make_app([KEY])).post(
        "/", form(secret_message()), content_type="application/x-www-form-urlencoded", status=503
    )
    [record] = [r for r in caplog.records if r.name == logs.LOGGER_NAME]
    assert record.levelname == "WARNING" and record.fields["size"] == len(form(secret_message()))
