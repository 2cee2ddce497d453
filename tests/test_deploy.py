"""App Engine deployment: app.yaml, the wrapped app, .gcloudignore, and key rotation end to end."""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import webtest
from google.appengine.api import appinfo, wrap_wsgi_app

import mailer
from conftest import KEY, ROOT, form, server_env
from test_mailer import make_message


def load_app_yaml():
    with open(ROOT / "app.yaml") as f:
        return appinfo.LoadSingleAppInfo(f)


def test_app_yaml_is_valid_for_python313_with_bundled_services():
    info = load_app_yaml()
    assert info.runtime == "python313" and info.app_engine_apis is True
    assert all(handler.secure == "always" for handler in info.handlers)
    assert info.instance_class and info.automatic_scaling.max_instances


def test_entrypoint_serves_the_app_it_names_with_a_listed_server():
    words = shlex.split(load_app_yaml().entrypoint)
    words = words[1:] if words[0] == "exec" else words
    assert words[0] == "gunicorn"
    requirements = (ROOT / "requirements.txt").read_text()
    assert "gunicorn" in requirements and "appengine-python-standard" in requirements
    target = words[-1]
    env = {**os.environ, "GAE_ENV": "standard", "GMAIL_SECRET_KEY": "k" * 32}
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    check = subprocess.run([gunicorn, "--chdir", str(ROOT), "--check-config", target], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    broken = subprocess.run([gunicorn, "--chdir", str(ROOT), "--check-config", target + "_missing"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0  # the check really imports what it names
    probe = subprocess.run([sys.executable, "-c", "import mailer, google.appengine.runtime.middlewares as m; "
                            "print(mailer.app.__module__)"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0 and "middlewares" in probe.stdout  # wrapped on App Engine
    plain = subprocess.run([sys.executable, "-c", "import mailer; print(type(mailer.app).__name__)"], cwd=ROOT,
                           env={k: v for k, v in env.items() if k != "GAE_ENV"}, capture_output=True, text=True,
                           timeout=120)
    assert plain.stdout.strip() == "Mailer"  # a plain WSGI callable elsewhere


def test_wrapped_app_answers_like_the_bare_app(mail_stub):
    bare = webtest.TestApp(mailer.make_app([KEY]), lint=True)
    wrapped = webtest.TestApp(wrap_wsgi_app(mailer.make_app([KEY])), lint=True)
    bad = form(make_message().as_bytes(), b"wrong key")
    for app in (bare, wrapped):
        assert app.get("/").json["keys"] == 1
        res = app.post("/", bad, content_type="application/x-www-form-urlencoded", status=400)
        assert res.text == "signature does not match the message under any configured key\n"
    assert mail_stub.sent == []


def gcloud_ignored(path: str) -> bool:
    """Whether .gcloudignore (gitignore syntax, no negations used) leaves `path` out of the upload."""
    patterns = [p.strip() for p in (ROOT / ".gcloudignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    for pattern in patterns:
        directory = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if depth == len(parts) and directory:
                continue
            if fnmatch.fnmatch(prefix, pattern) or ("/" not in pattern and fnmatch.fnmatch(parts[depth - 1], pattern)):
                return True
    return False


@pytest.mark.parametrize("path, ignored", [
    ("keys/GMAIL_SECRET_KEY", False), ("keys/GMAIL_DEFAULT_SENDER", False), ("mailer.py", False),
    ("gmail.py", False), ("app.yaml", False), ("requirements.txt", False),
    ("tests/test_mailer.py", True), (".venv/bin/python", True), ("bench/bench_server.py", True),
    ("outbox/new/1.msg", True), (".git/HEAD", True), ("__pycache__/mailer.cpython-313.pyc", True),
])
def test_gcloudignore_uploads_keys_not_tests(path, ignored):
    assert gcloud_ignored(path) is ignored


def test_key_files_never_enter_git():
    result = subprocess.run(["git", "check-ignore", "-q", "keys/GMAIL_SECRET_KEY"], cwd=ROOT)
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0


# --------------------------------------------------------------------------- keys


@pytest.fixture
def deployment(tmp_path) -> Path:
    """A copy of the server with its own keys/ folder, as it would be deployed."""
    root = tmp_path / "app"
    root.mkdir()
    for name in ("mailer.py", "gmail.py"):
        shutil.copy(ROOT / name, root / name)
    return root


def keys_cli(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "mailer.py"), "keys", *args], capture_output=True, text=True,
                          timeout=60)


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
    old_fingerprint = mailer.key_fingerprint(old)
    assert old_fingerprint in listing and mailer.key_fingerprint(new) + "  " in listing
    result = keys_cli(deployment, "retire", old_fingerprint[:8])  # 4. retire the old key, 5. deploy
    assert result.returncode == 0, result.stderr
    server.stop()
    server = deploy()
    assert post(server.url, form(msg, old)) == 400
    assert post(server.url, form(msg, new)) == 204
    assert len(smtp_sink.wait_for(4)) == 4
    assert keys_cli(deployment, "retire", mailer.key_fingerprint(new)).returncode == 65  # never the last key


def test_blank_and_whitespace_lines_are_never_keys(mail_stub, tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "GMAIL_SECRET_KEY").write_text(f"\n   \n\t\n {KEY.decode()}  \n\n")
    keys = mailer.keys_from_environment({}, root=tmp_path)
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
    assert f"key {mailer.key_fingerprint(b'short')} is only 5 characters" in log
    assert "short\n" not in log and "x" * 40 not in log
