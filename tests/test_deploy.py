"""App Engine deployment: app.yaml, the wrapped app and what .gcloudignore uploads."""

from __future__ import annotations

import fnmatch
import io
import os
import shlex
import subprocess
import sys

import pytest
import webtest
from google.appengine.api import appinfo, wrap_wsgi_app

import mailer
from appengine_mailer import admission, serve
from appengine_mailer import form as form_module
from conftest import KEY, ROOT, form
from test_mailer import make_message


def load_app_yaml():
    with open(ROOT / "app.yaml") as f:
        return appinfo.LoadSingleAppInfo(f)


def test_app_yaml_is_valid_for_python313_with_bundled_services():
    info = load_app_yaml()
    assert info.runtime == "python313" and info.app_engine_apis is True
    assert all(handler.secure == "always" for handler in info.handlers)
    assert info.instance_class and info.automatic_scaling.max_instances


def entrypoint_words() -> list[str]:
    words = shlex.split(load_app_yaml().entrypoint)
    return words[1:] if words[0] == "exec" else words


def entrypoint_command(port: int) -> list[str]:
    """app.yaml's entrypoint as this machine runs it: `python` is this virtualenv's, $PORT the given port."""
    words = entrypoint_words()
    return [sys.executable, str(ROOT / words[1]), *(word.replace("$PORT", str(port)) for word in words[2:])]


def test_entrypoint_is_python_mailer_py_with_waitress_listed():
    words = entrypoint_words()
    assert words[:2] == ["python", "mailer.py"] and "$PORT" in words
    args = serve.build_parser(ROOT).parse_args([word.replace("$PORT", "8080") for word in words[2:]])
    assert args.command is None and args.host == "0.0.0.0" and args.port == 8080
    requirements = (ROOT / "requirements.txt").read_text()
    assert "waitress" in requirements and "appengine-python-standard" in requirements
    env = {**os.environ, "GAE_ENV": "standard", "GMAIL_SECRET_KEY": "k" * 32}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mailer, google.appengine.runtime.middlewares as m; print(mailer.app.__module__)",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0 and "middlewares" in probe.stdout  # wrapped on App Engine
    plain = subprocess.run(
        [sys.executable, "-c", "import mailer; print(type(mailer.app).__name__)"],
        cwd=ROOT,
        env={k: v for k, v in env.items() if k != "GAE_ENV"},
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    patterns = [
        p.strip() for p in (ROOT / ".gcloudignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
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


@pytest.mark.parametrize(
    "path, ignored",
    [
        ("keys/GMAIL_SECRET_KEY", False),
        ("keys/GMAIL_DEFAULT_SENDER", False),
        ("mailer.py", False),
        ("gmail.py", False),
        ("app.yaml", False),
        ("requirements.txt", False),
        ("appengine_mailer/convert.py", False),
        ("appengine_mailer/sdk.py", False),
        ("tests/test_mailer.py", True),
        (".venv/bin/python", True),
        ("bench/bench_server.py", True),
        ("outbox/new/1.msg", True),
        (".git/HEAD", True),
        ("__pycache__/mailer.cpython-313.pyc", True),
    ],
)
def test_gcloudignore_uploads_keys_not_tests(path, ignored):
    assert gcloud_ignored(path) is ignored


def test_key_files_never_enter_git():
    result = subprocess.run(["git", "check-ignore", "-q", "keys/GMAIL_SECRET_KEY"], cwd=ROOT)
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0


def test_help_without_the_sdk_says_what_to_install_in_one_line():
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "mailer.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78 and result.stdout == ""
    assert result.stderr == (
        "mailer.py: the appengine-mailer server needs the App Engine SDK: run `make run`, "
        "or `pip install '.[server]'` in the project's folder\n"
    )


def test_pinned_sdk_does_not_know_app_engine_bundled_services_yet():
    """app.yaml keeps `app_engine_apis: true`: the pinned SDK's appinfo refuses the newer spelling.

    When this fails, the SDK has learned `app_engine_bundled_services`: switch app.yaml to it.
    """
    text = (ROOT / "app.yaml").read_text().replace("app_engine_apis: true", "app_engine_bundled_services: [mail]")
    with pytest.raises(Exception, match="app_engine_bundled_services"):
        appinfo.LoadSingleAppInfo(io.StringIO(text))


INSTANCE_MEMORY_MB = {"F1": 384, "F2": 768, "F4": 1536, "F4_1G": 3072}
BASELINE_MB, PEAK_PER_BODY_BYTE = 40, 5.2  # measured: bench/README.md, "Admission control"


def test_app_yaml_layout_fits_its_instance_with_margin():
    """Every request App Engine sends gets a thread, and the worst case fits in 80% of the instance."""
    info = load_app_yaml()
    args = serve.build_parser(ROOT).parse_args([word.replace("$PORT", "8080") for word in entrypoint_words()[2:]])
    concurrent = int(info.automatic_scaling.max_concurrent_requests)
    assert args.threads == concurrent
    in_flight = max(admission.DEFAULT_MAX_INFLIGHT_MB, form_module.MAX_BODY_BYTES // admission.MB)
    worst = BASELINE_MB + in_flight * PEAK_PER_BODY_BYTE + concurrent * form_module.MAX_BODY_BYTES // admission.MB
    assert worst <= 0.8 * INSTANCE_MEMORY_MB[info.instance_class]
