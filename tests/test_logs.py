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
