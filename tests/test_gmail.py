"""gmail.py as a library and as a command, against the reference server and the real proxy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from email.message import EmailMessage, Message
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gmail
from conftest import KEY, ROOT, free_port


def readme_message() -> Message:
    msg = Message()
    msg["From"] = "Toby at work <toby@work.example.com>"
    msg["To"] = "Toby at home <toby@home.example.com>"
    msg["Subject"] = "Testing"
    msg.set_payload("This is the body of the message")
    return msg


@pytest.fixture
def lone_client(tmp_path) -> Path:
    """gmail.py copied alone into an empty folder, as users install it."""
    target = tmp_path / "bin" / "gmail"
    target.parent.mkdir()
    shutil.copy(ROOT / "gmail.py", target)
    return target


@pytest.fixture
def clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GMAIL_") and k != "RECIPIENT"}
    env["PYTHONPATH"] = ""
    return env


def run_cli(script: Path, args, env, stdin: bytes = b"", envdir: Path | None = None):
    return subprocess.run(
        [sys.executable, "-I", str(script), *args], input=stdin, env=env, capture_output=True, timeout=60
    )


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/"


# --------------------------------------------------------------------------- library


def test_readme_example(reference_server):
    proxy = gmail.GmailProxy(KEY.decode(), reference_server.url, fail_silently=False)
    assert proxy.send_mail(readme_message()) is True
    [accepted] = reference_server.accepted
    assert accepted["msg"] == readme_message().as_bytes()
    assert "fix_sender" not in accepted


def test_config_from_environment(reference_server, monkeypatch):
    monkeypatch.setenv("GMAIL_SECRET_KEY", KEY.decode())
    monkeypatch.setenv("GMAIL_PROXY_URL", reference_server.url)
    assert gmail.GmailProxy().send_mail(readme_message())


def test_config_from_envdir(reference_server, monkeypatch, tmp_path):
    monkeypatch.delenv("GMAIL_SECRET_KEY", raising=False)
    monkeypatch.delenv("GMAIL_PROXY_URL", raising=False)
    (tmp_path / "GMAIL_SECRET_KEY").write_text(KEY.decode() + "\n")
    (tmp_path / "GMAIL_PROXY_URL").write_text(reference_server.url + "\n")
    assert gmail.GmailProxy(envdir=str(tmp_path)).send_mail(readme_message())


def test_missing_config_names_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv("GMAIL_SECRET_KEY", raising=False)
    monkeypatch.delenv("GMAIL_PROXY_URL", raising=False)
    with pytest.raises(gmail.ConfigurationError, match="GMAIL_SECRET_KEY"):
        gmail.GmailProxy(envdir=str(tmp_path))
    with pytest.raises(gmail.ConfigurationError, match="GMAIL_PROXY_URL"):
        gmail.GmailProxy("key", envdir=str(tmp_path))


def test_refusal_carries_status_and_reason(reference_server):
    reference_server.force_status, reference_server.force_reason = 400, "no recipients in To, Cc or Bcc"
    with pytest.raises(gmail.MessageSendingFailure) as caught:
        gmail.GmailProxy(KEY, reference_server.url).send_mail(readme_message())
    assert caught.value.status == 400 and caught.value.reason == "no recipients in To, Cc or Bcc"
    assert "no recipients" in str(caught.value) and not caught.value.temporary


def test_wrong_key_is_refused(reference_server):
    with pytest.raises(gmail.MessageSendingFailure, match="400 malformed signature"):
        gmail.GmailProxy("wrong", reference_server.url).send_mail(readme_message())


def test_fail_silently_returns_false(reference_server):
    assert gmail.GmailProxy("wrong", reference_server.url, fail_silently=True).send_mail(readme_message()) is False
    assert gmail.GmailProxy(KEY, dead_url(), fail_silently=True).send_mail(readme_message()) is False


def test_unreachable_server_raises_temporary_failure():
    with pytest.raises(gmail.MessageSendingFailure, match="could not reach") as caught:
        gmail.GmailProxy(KEY, dead_url()).send_mail(readme_message())
    assert caught.value.status is None and caught.value.temporary


def test_timeout_raises_temporary_failure():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        proxy = gmail.GmailProxy(KEY, f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=0.5)
        with pytest.raises(gmail.MessageSendingFailure, match="timed out") as caught:
            proxy.send_mail(readme_message())
        assert caught.value.temporary
    finally:
        listener.close()


def test_fix_sender_is_sent(reference_server):
    gmail.GmailProxy(KEY, reference_server.url, fix_sender=True).send_mail(readme_message())
    assert reference_server.accepted[0]["fix_sender"] == "true"


def test_non_ascii_and_8bit_survive_byte_for_byte(reference_server):
    raw = "From: Jürgen <j@example.com>\nTo: r@example.com\nSubject: Grüße\n\n".encode() + b"caf\xe9 \xff\x00\n"
    gmail.GmailProxy(KEY, reference_server.url).send_mail(raw)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Jürgen <j@example.com>", "r@example.com", "Grüße ☃"
    msg.set_content("Ünïcödé body\n", cte="8bit")
    gmail.GmailProxy(KEY, reference_server.url).send_mail(msg)
    assert reference_server.accepted[0]["msg"] == raw
    assert reference_server.accepted[1]["msg"] == msg.as_bytes()


def test_many_messages_one_connection(reference_server):
    with gmail.GmailProxy(KEY, reference_server.url) as proxy:
        for _ in range(20):
            assert proxy.send_mail(readme_message())
    assert len(reference_server.accepted) == 20 and reference_server.connections == 1


def test_reconnects_when_server_closes(reference_server):
    reference_server.close_after_each = True
    with gmail.GmailProxy(KEY, reference_server.url) as proxy:
        for _ in range(5):
            assert proxy.send_mail(readme_message())
    assert len(reference_server.accepted) == 5 and reference_server.connections == 5


def test_https_verifies_certificates():
    proxy = gmail.GmailProxy(KEY, "https://127.0.0.1:1/")
    assert proxy._connection().__class__.__name__ == "HTTPSConnection"
    assert proxy._connection()._context.verify_mode.name == "CERT_REQUIRED"


# --------------------------------------------------------------------------- command line


def cli_env(clean_env, url: str, key: bytes = KEY, **extra) -> dict:
    return {**clean_env, "GMAIL_PROXY_URL": url, "GMAIL_SECRET_KEY": key.decode(), **extra}


def test_cli_help_lists_every_flag(lone_client, clean_env):
    result = run_cli(lone_client, ["--help"], clean_env)
    assert result.returncode == 0
    for flag in ["-s", "-c", "-b", "-a", "-r", "-t", "-i", "-o", "-f", "--url", "--key-file", "--fix-sender"]:
        assert f"{flag} " in result.stdout.decode() or f"{flag}," in result.stdout.decode()


def test_cli_mail_mode_builds_message(lone_client, clean_env, reference_server, tmp_path):
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 \x00\xff")
    result = run_cli(
        lone_client,
        [
            "-s",
            "Weekly report",
            "-c",
            "cc@example.com",
            "-b",
            "bcc@example.com",
            "-a",
            str(report),
            "-r",
            "me@example.com",
            "you@example.com",
        ],
        cli_env(clean_env, reference_server.url),
        stdin="Bonjour, voilà\n".encode(),
    )
    assert result.returncode == 0, result.stderr
    from email import message_from_bytes, policy

    got = message_from_bytes(reference_server.accepted[0]["msg"], policy=policy.default)
    assert got["Subject"] == "Weekly report" and got["From"] == "me@example.com"
    assert got["To"] == "you@example.com" and got["Cc"] == "cc@example.com" and got["Bcc"] == "bcc@example.com"
    assert got.get_body(("plain",)).get_content() == "Bonjour, voilà\n"
    [att] = got.iter_attachments()
    assert att.get_filename() == "report.pdf" and att.get_content() == b"%PDF-1.4 \x00\xff"
    assert "fix_sender" not in reference_server.accepted[0]


def test_cli_without_from_asks_for_default_sender(lone_client, clean_env, reference_server):
    result = run_cli(lone_client, ["-s", "x", "you@example.com"], cli_env(clean_env, reference_server.url), b"hi\n")
    assert result.returncode == 0
    assert reference_server.accepted[0]["fix_sender"] == "true"


def test_cli_sendmail_mode_sends_stdin_exactly(lone_client, clean_env, reference_server):
    raw = b"From: a@example.com\nTo: b@example.com\nSubject: s\n\nbody \xe9\n"
    for flags in ([], ["-t"], ["-i", "-oi", "-odi", "-f", "bounce@example.com"]):
        result = run_cli(lone_client, flags, cli_env(clean_env, reference_server.url), raw)
        assert result.returncode == 0, result.stderr
    assert [a["msg"] for a in reference_server.accepted] == [raw, raw, raw]


def test_cli_sendmail_with_recipient_arguments(lone_client, clean_env, reference_server):
    raw = b"From: a@example.com\nTo: x@example.com, y@example.com\nSubject: s\n\nbody\n"
    result = run_cli(lone_client, ["-i", "y@example.com"], cli_env(clean_env, reference_server.url), raw)
    assert result.returncode == 0, result.stderr
    [accepted] = reference_server.accepted
    assert b"To: y@example.com\n" in accepted["msg"] and b"x@example.com" not in accepted["msg"]


def test_cli_key_file_and_url_override(lone_client, clean_env, reference_server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    env = cli_env(clean_env, dead_url(), b"wrong")
    result = run_cli(
        lone_client,
        ["--url", reference_server.url, "--key-file", str(key_file)],
        env,
        b"From: a@example.com\nTo: b@example.com\n\nx\n",
    )
    assert result.returncode == 0, result.stderr


EXIT_CASES = [
    ("refused 400", 400, 65),
    ("forbidden 403", 403, 77),
    ("server error 500", 500, 75),
    ("unavailable 503", 503, 75),
    ("too many 429", 429, 75),
]


@pytest.mark.parametrize("status, code", [c[1:] for c in EXIT_CASES], ids=[c[0] for c in EXIT_CASES])
def test_cli_exit_codes_for_answers(lone_client, clean_env, reference_server, status, code):
    reference_server.force_status, reference_server.force_reason = status, "because of reasons"
    result = run_cli(lone_client, [], cli_env(clean_env, reference_server.url), b"To: b@example.com\n\nx\n")
    assert result.returncode == code
    stderr = result.stderr.decode()
    assert f"{status} because of reasons" in stderr and "Traceback" not in stderr and stderr.count("\n") == 1


def test_cli_exit_75_when_unreachable(lone_client, clean_env):
    result = run_cli(lone_client, [], cli_env(clean_env, dead_url()), b"To: b@example.com\n\nx\n")
    assert result.returncode == 75 and b"could not reach" in result.stderr and b"Traceback" not in result.stderr


def test_cli_exit_78_without_config(lone_client, clean_env):
    result = run_cli(lone_client, [], clean_env, b"To: b@example.com\n\nx\n")
    if Path("/etc/envdir/GMAIL_SECRET_KEY").exists():
        pytest.skip("this machine has /etc/envdir/GMAIL_SECRET_KEY")
    assert result.returncode == 78 and b"GMAIL_SECRET_KEY" in result.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["-s", "subject only"], ["-t", "x@example.com"], ["--timeout", "x"]])
def test_cli_exit_64_for_usage_errors(lone_client, clean_env, reference_server, args):
    result = run_cli(lone_client, args, cli_env(clean_env, reference_server.url), b"x\n")
    assert result.returncode == 64 and b"see --help" in result.stderr and reference_server.requests == 0


def test_cli_exit_66_for_missing_attachment(lone_client, clean_env, reference_server, tmp_path):
    result = run_cli(
        lone_client,
        ["-s", "x", "-a", str(tmp_path / "nope.pdf"), "y@example.com"],
        cli_env(clean_env, reference_server.url),
        b"x\n",
    )
    assert result.returncode == 66 and b"nope.pdf" in result.stderr and reference_server.requests == 0


def test_cli_empty_stdin_is_refused(lone_client, clean_env, reference_server):
    result = run_cli(lone_client, [], cli_env(clean_env, reference_server.url), b"")
    assert result.returncode == 65 and b"empty" in result.stderr and reference_server.requests == 0


# --------------------------------------------------------------------------- RECIPIENT (Exim)


@pytest.mark.parametrize(
    "recipient, header",
    [
        ("to2@example.com", b"To: Two <to2@example.com>"),
        ("cc@example.com", b"Cc: cc@example.com"),
        ("hidden@example.com", b"Bcc: hidden@example.com"),
    ],
)
def test_recipient_env_names_only_that_recipient(lone_client, clean_env, reference_server, recipient, header):
    raw = b"From: a@example.com\nTo: to1@example.com,\n Two <to2@example.com>\nCc: cc@example.com\nSubject: s\n\nbody\n"
    result = run_cli(lone_client, [], cli_env(clean_env, reference_server.url, RECIPIENT=recipient), raw)
    assert result.returncode == 0, result.stderr
    [accepted] = reference_server.accepted
    head = accepted["msg"].split(b"\n\n")[0]
    others = {b"to1@example.com", b"to2@example.com", b"cc@example.com", b"hidden@example.com"} - {recipient.encode()}
    assert header in head and not any(o in head for o in others)
    assert accepted["msg"].endswith(b"\n\nbody\n") and b"Subject: s" in head


# --------------------------------------------------------------------------- against the real proxy


def test_client_against_real_proxy(smtp_server, lone_client, clean_env):
    with gmail.GmailProxy(KEY, smtp_server.url) as proxy:
        for i in range(3):
            msg = readme_message()
            msg.replace_header("Subject", f"lib {i}")
            assert proxy.send_mail(msg)
    result = run_cli(
        lone_client,
        ["-s", "Grüße", "-r", "me@example.com", "you@example.com"],
        cli_env(clean_env, smtp_server.url),
        "Hallo Welt — ☃\n".encode(),
    )
    assert result.returncode == 0, result.stderr
    received = smtp_server.sink.wait_for(4)
    subjects = sorted(env.message["Subject"] for env in received)
    assert subjects == ["Grüße", "lib 0", "lib 1", "lib 2"]
    cli_msg = next(env for env in received if env.message["Subject"] == "Grüße")
    assert cli_msg.rcpt_tos == ["you@example.com"]
    assert cli_msg.message.get_body(("plain",)).get_content().strip() == "Hallo Welt — ☃"


def test_cli_refused_by_real_proxy_exits_65(smtp_server, lone_client, clean_env):
    result = run_cli(lone_client, [], cli_env(clean_env, smtp_server.url, b"wrong"), b"To: b@example.com\n\nx\n")
    assert result.returncode == 65 and b"signature does not match" in result.stderr


def _old_pythons():
    found = []
    for version in ("3.9", "3.10"):
        candidates = [
            *sorted(Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python")),
            shutil.which(f"python{version}"),
        ]
        path = next(
            (c for c in candidates if c and subprocess.run([str(c), "--version"], capture_output=True).returncode == 0),
            None,
        )
        found.append(
            pytest.param(
                path,
                id=version,
                marks=pytest.mark.skipif(path is None, reason=f"no Python {version} interpreter on this machine"),
            )
        )
    return found


@pytest.mark.parametrize("python", _old_pythons())
def test_cli_runs_on_old_pythons(python, lone_client, clean_env, reference_server):
    raw = b"From: a@example.com\nTo: b@example.com\nSubject: old\n\nbody\n"
    result = subprocess.run(
        [str(python), "-I", str(lone_client), "-i"],
        input=raw,
        env=cli_env(clean_env, reference_server.url),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert reference_server.accepted[0]["msg"] == raw


# --------------------------------------------------------------------------- client form encoding


@settings(max_examples=300)
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_client_form_is_exactly_urlencode(msg, fix_sender, v1):
    fields = {"msg": msg}
    if v1:
        fields["signature"] = gmail.sign_v1(b"k", msg)
    fields["timestamp"] = "1700000000"
    fields["signature_v2"] = gmail.sign_v2(b"k", "1700000000", fix_sender, msg)
    if fix_sender:
        fields["fix_sender"] = "true"
    assert gmail.encode_form(msg, b"k", fix_sender, timestamp=1700000000, signature_v1=v1) == urlencode(fields).encode(
        "ascii"
    )
