"""`python mailer.py keys new|list|retire` and rotation through real server restarts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import webtest

import mailer
from appengine_mailer.settings import key_fingerprint, keys_from_environment
from conftest import KEY, ROOT, form, server_env
from test_mailer import make_message


@pytest.fixture
def deployment(tmp_path) -> Path:
    """A copy of the server with its own keys/ folder, as it would be deployed."""
    root = tmp_path / "app"
    root.mkdir()
    for name in ("mailer.py", "gmail.py"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "appengine_mailer", root / "appengine_mailer", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def keys_cli(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(root / "mailer.py"), "keys", *args], capture_output=True, text=True, timeout=60
    )


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=60) as res:
            return res.status
    except urllib.error.HTTPError as err:
        return err.code


def test_rotation_end_to_end(deployment, start_server, smtp_sink, tmp_path):
    def new_key() -> bytes:
        result = keys_cli(deployment, "new")
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1].encode()

    def deploy():
        env = server_env(tmp_path, smtp_sink)
        del env["GMAIL_SECRET_KEY"]  # read keys/GMAIL_SECRET_KEY, as on App Engine
        return start_server(env, cwd=deployment, script=deployment / "mailer.py")

    old = new_key()
    key_file = deployment / "keys" / "GMAIL_SECRET_KEY"
    assert key_file.stat().st_mode & 0o777 == 0o600
    msg = make_message().as_bytes()
    server = deploy()
    assert post(server.url, form(msg, old)) == 204

    new = new_key()  # 1. add the new key, 2. deploy
    server.stop()
    server = deploy()
    assert post(server.url, form(msg, old)) == 204  # clients not yet switched
    assert post(server.url, form(msg, new)) == 204  # 3. clients switched

    listing = keys_cli(deployment, "list").stdout
    assert old.decode() not in listing and new.decode() not in listing
    old_fingerprint = key_fingerprint(old)
    assert old_fingerprint in listing and key_fingerprint(new) + "  " in listing
    result = keys_cli(deployment, "retire", old_fingerprint[:8])  # 4. retire the old key, 5. deploy
    assert result.returncode == 0, result.stderr
    server.stop()
    server = deploy()
    assert post(server.url, form(msg, old)) == 400
    assert post(server.url, form(msg, new)) == 204
    assert len(smtp_sink.wait_for(4)) == 4
    assert keys_cli(deployment, "retire", key_fingerprint(new)).returncode == 65  # never the last key


def test_blank_and_whitespace_lines_are_never_keys(mail_stub, tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "GMAIL_SECRET_KEY").write_text(f"\n   \n\t\n {KEY.decode()}  \n\n")
    keys = keys_from_environment({}, root=tmp_path)
    assert keys == [KEY]
    app = webtest.TestApp(mailer.make_app(keys), lint=True)
    msg = make_message().as_bytes()
    for blank in (b"", b"   ", b"\t"):
        app.post("/", form(msg, blank), content_type="application/x-www-form-urlencoded", status=400)
    app.post("/", form(msg, KEY), content_type="application/x-www-form-urlencoded", status=204)


def test_server_warns_about_readable_key_file_and_short_keys(deployment, start_server, tmp_path):
    key_file = deployment / "keys" / "GMAIL_SECRET_KEY"
    key_file.parent.mkdir()
    key_file.write_text("short\n" + "x" * 40 + "\n")
    key_file.chmod(0o644)
    env = server_env(tmp_path)
    del env["GMAIL_SECRET_KEY"]
    server = start_server(env, cwd=deployment, script=deployment / "mailer.py")
    server.stop()
    log = "".join(server.log_lines)
    assert "readable by other users" in log and "chmod 600" in log
    assert f"key {key_fingerprint(b'short')} is only 5 characters" in log
    assert "short\n" not in log and "x" * 40 not in log
