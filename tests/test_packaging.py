"""`pip install` of the project into a fresh virtualenv: modules, package and console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv

from conftest import ROOT

IGNORED = shutil.ignore_patterns(
    ".venv*", ".git", "outbox", "keys", ".pytest_cache", ".hypothesis", "*.egg-info", "build", "dist", "__pycache__"
)


def test_pip_install_then_import_backend_from_site_packages(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{source}[django]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    shutil.rmtree(source)  # nothing may come from the source tree any more
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import gmail, appengine_mailer.django_email_backend as b; "
            "print(gmail.__file__); print(b.__file__); print(b.GmailBackend.__name__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    gmail_file, backend_file, name = probe.stdout.split()
    assert gmail_file.startswith(str(env_dir)) and backend_file.startswith(str(env_dir)) and name == "GmailBackend"
    script = subprocess.run([str(env_dir / "bin" / "gmail"), "--version"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and script.stdout.startswith("gmail.py ")
    assert sys.version_info >= (3, 9)
    # The wheel ships the server package; without the SDK it says in one line what to install.
    server = subprocess.run(
        [str(python), "-c", "import appengine_mailer.convert"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert server.returncode == 1
    assert server.stderr.strip().splitlines()[-1] == (
        "ImportError: the appengine-mailer server needs the App Engine SDK: run `make run`, "
        "or `pip install '.[server]'` in the project's folder"
    )
    assert list(env_dir.glob("lib/python3*/site-packages/appengine_mailer/convert.py"))
