"""gmail.py as a library and as a command, against the reference server and the real proxy."""

from __future__ import annotations

import http.client
import json
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


def test_missing_config_names_every_missing_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("GMAIL_SECRET_KEY", raising=False)
    monkeypatch.delenv("GMAIL_PROXY_URL", raising=False)
    with pytest.raises(gmail.ConfigurationError) as caught:
        gmail.GmailProxy(envdir=str(tmp_path))
    assert str(caught.value) == (
        "no secret key and no proxy URL: give secret_key and proxy_url, or set GMAIL_SECRET_KEY and "
        f"GMAIL_PROXY_URL (in the environment or as files in {tmp_path})"
    )
    with pytest.raises(gmail.ConfigurationError, match="no proxy URL: give proxy_url, or set GMAIL_PROXY_URL") as one:
        gmail.GmailProxy("key", envdir=str(tmp_path))
    assert "secret" not in str(one.value)


def test_refusal_carries_status_and_reason(reference_server):
    reference_server.force_status, reference_server.force_reason = 400, "no recipients in To, Cc or Bcc"
    with pytest.raises(gmail.MessageSendingFailure) as caught:
        gmail.GmailProxy(KEY, reference_server.url).send_mail(readme_message())
    assert caught.value.status == 400 and caught.value.reason == "no recipients in To, Cc or Bcc"
    assert "no recipients" in str(caught.value) and not caught.value.temporary


def test_wrong_key_is_a_configuration_failure(reference_server):
    with pytest.raises(gmail.ConfigurationFailure) as caught:
        gmail.GmailProxy("wrong", reference_server.url).send_mail(readme_message())
    where = reference_server.url.split("/")[2]
    assert str(caught.value) == (
        f"the proxy at {where} does not hold the secret key from secret_key (400 malformed signature)"
    )
    assert caught.value.status == 400 and caught.value.temporary  # fixing the key makes it go through


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
    assert isinstance(proxy._connection(), http.client.HTTPSConnection)
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


MARKED = {gmail.ERROR_HEADER: gmail.BAD_SIGNATURE}
EXIT_CASES = [
    ("refused 400", 400, {}, 65),
    ("bad signature 400", 400, MARKED, 78),
    ("clock skew 400", 400, {gmail.ERROR_HEADER: gmail.CLOCK_SKEW}, 78),
    ("too large 413", 413, {}, 65),
    ("forbidden 403", 403, {}, 77),
    ("server error 500", 500, {}, 75),
    ("bad gateway 502", 502, {}, 75),
    ("unavailable 503", 503, {}, 75),
    ("too many 429", 429, {}, 75),
    ("moved 301", 301, {"Location": "https://proxy.example/"}, 78),
    ("found 302", 302, {"Location": "https://proxy.example/"}, 78),
    ("temporary redirect 307", 307, {"Location": "https://proxy.example/"}, 78),
    ("permanent redirect 308", 308, {"Location": "https://proxy.example/"}, 78),
]


@pytest.mark.parametrize("status, headers, code", [c[1:] for c in EXIT_CASES], ids=[c[0] for c in EXIT_CASES])
def test_cli_exit_codes_for_answers(lone_client, clean_env, reference_server, status, headers, code):
    reference_server.force_status, reference_server.force_reason = status, "because of reasons"
    reference_server.force_headers, reference_server.retry_after = headers, "0"
    result = run_cli(lone_client, [], cli_env(clean_env, reference_server.url), b"To: b@example.com\n\nx\n")
    assert result.returncode == code
    stderr = result.stderr.decode()
    assert f"{status} because of reasons" in stderr and "Traceback" not in stderr and stderr.count("\n") == 1
    assert reference_server.url.split("/")[2] in stderr  # host:port of the proxy that answered


def test_cli_exit_75_when_unreachable(lone_client, clean_env):
    result = run_cli(lone_client, [], cli_env(clean_env, dead_url()), b"To: b@example.com\n\nx\n")
    assert result.returncode == 75 and b"could not reach" in result.stderr and b"Traceback" not in result.stderr


def test_cli_exit_78_without_config_names_every_missing_setting(lone_client, clean_env, tmp_path):
    result = run_cli(lone_client, ["--envdir", str(tmp_path)], clean_env, b"To: b@example.com\n\nx\n")
    assert result.returncode == 78
    assert result.stderr.decode() == (
        "gmail.py: no secret key and no proxy URL: give --key-file and --url, or set GMAIL_SECRET_KEY and "
        f"GMAIL_PROXY_URL (in the environment or as files in {tmp_path})\n"
    )


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
    result = run_cli(lone_client, [], cli_env(clean_env, smtp_server.url), b"From: a@example.com\n\nno To\n")
    assert result.returncode == 65 and b"400" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("use_key_file", [False, True], ids=["key from the environment", "key from --key-file"])
def test_cli_wrong_key_at_real_proxy_is_a_configuration_error(
    smtp_server, lone_client, clean_env, tmp_path, use_key_file
):
    key_file = tmp_path / "key"
    key_file.write_text("wrong-key\n")
    args = ["--key-file", str(key_file)] if use_key_file else []
    env = cli_env(clean_env, smtp_server.url, b"wrong-key")
    result = run_cli(lone_client, args, env, b"From: a@example.com\nTo: b@example.com\n\nx\n")
    assert result.returncode == 78, result.stderr
    [line] = result.stderr.decode().splitlines()
    where = smtp_server.url.split("/")[2]
    source = "--key-file" if use_key_file else "GMAIL_SECRET_KEY"
    assert line.startswith(f"gmail.py: the proxy at {where} does not hold the secret key from {source} (400 ")
    assert "wrong-key" not in line and smtp_server.sink.wait_for(1, timeout=0.5) == []


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


# --------------------------------------------------------------------------- mail(1) as users type it


def test_mail_without_r_is_sent_from_the_proxys_default_sender(smtp_server, lone_client, clean_env):
    result = run_cli(lone_client, ["admin@example.com"], cli_env(clean_env, smtp_server.url), b"hi\n")
    assert result.returncode == 0, result.stderr
    [env] = smtp_server.sink.wait_for(1)
    assert env.rcpt_tos == ["admin@example.com"] and env.message["From"] == "default@example.com"
    assert env.message.get_body(("plain",)).get_content() == "hi\n"


@pytest.mark.parametrize(
    "args",
    [["-s", "s", "-r", "a@example.com", "intended@example.com"], ["-i", "intended@example.com"]],
    ids=["mail(1)", "sendmail-style"],
)
def test_recipients_on_the_command_line_beat_RECIPIENT(smtp_server, lone_client, clean_env, args):
    env = cli_env(clean_env, smtp_server.url, RECIPIENT="other@example.com")
    raw = b"From: a@example.com\nTo: intended@example.com\nSubject: s\n\nbody\n"
    result = run_cli(lone_client, args, env, raw)
    assert result.returncode == 0, result.stderr
    [received] = smtp_server.sink.wait_for(1)
    assert received.rcpt_tos == ["intended@example.com"]


def test_t_beats_RECIPIENT(lone_client, clean_env, reference_server):
    raw = b"From: a@example.com\nTo: x@example.com, y@example.com\n\nbody\n"
    result = run_cli(lone_client, ["-t"], cli_env(clean_env, reference_server.url, RECIPIENT="z@example.com"), raw)
    assert result.returncode == 0, result.stderr
    assert [a["msg"] for a in reference_server.accepted] == [raw]


def test_help_says_when_RECIPIENT_is_used_and_every_exit_code(lone_client, clean_env):
    text = " ".join(run_cli(lone_client, ["--help"], clean_env).stdout.decode().split())
    assert "Only when neither is given is the environment variable RECIPIENT used" in text
    for code in ("0", "75", "78", "65", "77", "64", "66", "74"):
        assert f" {code} " in text


def test_explicit_url_and_queue_beat_the_environment(lone_client, clean_env, reference_server, tmp_path):
    env = cli_env(clean_env, "http://not a url/", GMAIL_SPOOL_DIR=str(tmp_path / "env-spool"))
    result = run_cli(lone_client, ["--url", dead_url(), "--queue", str(tmp_path / "mine"), "x@example.com"], env, b"x")
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(tmp_path / "mine" / "new")) == 1 and not (tmp_path / "env-spool").exists()


# --------------------------------------------------------------------------- installed as sendmail and mailq

CRON_MESSAGE = (
    b"From: root (Cron Daemon)\nTo: root@example.com\nSubject: Cron <root@host> backup\n"
    b"Content-Type: text/plain; charset=UTF-8\n\nbackup done\n"
)


@pytest.fixture
def sendmail(lone_client) -> Path:
    """gmail installed as sendmail: a symbolic link, as update-alternatives makes it."""
    link = lone_client.parent / "sendmail"
    link.symlink_to(lone_client.name)
    return link


@pytest.fixture
def mailq(lone_client) -> Path:
    """gmail installed as mailq: a copy under that name."""
    copy = lone_client.parent / "mailq"
    shutil.copy(lone_client, copy)
    return copy


def test_sendmail_sends_standard_input_as_the_message_to_the_argument(smtp_server, sendmail, clean_env):
    raw = b"From: app@example.com\nTo: Ann <ann@example.com>, bob@example.com\nSubject: report\n\nThe report.\n"
    result = run_cli(sendmail, ["ann@example.com"], cli_env(clean_env, smtp_server.url), raw)
    assert result.returncode == 0, result.stderr
    [env] = smtp_server.sink.wait_for(1)
    assert env.rcpt_tos == ["ann@example.com"] and env.message["Subject"] == "report"  # not wrapped in a new one
    assert env.message["From"] == "app@example.com" and env.message["To"] == "Ann <ann@example.com>"
    assert env.message.get_body(("plain",)).get_content() == "The report.\n" and b"bob@" not in env.content


def test_sendmail_t_takes_recipients_from_the_headers(smtp_server, sendmail, clean_env):
    raw = b"From: app@example.com\nTo: a@example.com\nCc: b@example.com\nSubject: t\n\nx\n"
    result = run_cli(sendmail, ["-t", "-i"], cli_env(clean_env, smtp_server.url), raw)
    assert result.returncode == 0, result.stderr
    [env] = smtp_server.sink.wait_for(1)
    assert sorted(env.rcpt_tos) == ["a@example.com", "b@example.com"]


def test_sendmail_as_debian_cron_calls_it(smtp_server, sendmail, clean_env):
    args = ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root@example.com"]
    result = run_cli(sendmail, args, cli_env(clean_env, smtp_server.url), CRON_MESSAGE)
    assert result.returncode == 0, result.stderr
    [env] = smtp_server.sink.wait_for(1)
    assert env.rcpt_tos == ["root@example.com"] and env.message["Subject"] == "Cron <root@host> backup"
    assert env.message["From"] == "default@example.com"  # "root" is no address the proxy can send from


def test_sendmail_message_without_from_uses_the_default_sender(smtp_server, sendmail, clean_env):
    result = run_cli(sendmail, ["-v", "you@example.com"], cli_env(clean_env, smtp_server.url), b"Subject: test\n\n")
    assert result.returncode == 0, result.stderr
    [env] = smtp_server.sink.wait_for(1)
    assert env.message["From"] == "default@example.com" and env.rcpt_tos == ["you@example.com"]


@pytest.mark.parametrize(
    "args, said", [([], "no recipients"), (["-bs"], "invalid choice"), (["-s", "x", "a@example.com"], "-s")]
)
def test_sendmail_usage_errors(sendmail, clean_env, reference_server, args, said):
    result = run_cli(sendmail, args, cli_env(clean_env, reference_server.url), b"To: a@example.com\n\nx\n")
    assert result.returncode == 64 and said in result.stderr.decode() and reference_server.requests == 0


def test_mailq_and_sendmail_bp_list_the_spool(sendmail, mailq, clean_env, tmp_path):
    spool = tmp_path / "spool"
    env = cli_env(clean_env, dead_url(), GMAIL_SPOOL_DIR=str(spool))
    assert run_cli(mailq, [], env).stdout.startswith(b"nothing queued")
    result = run_cli(sendmail, ["-t"], env, b"From: a@example.com\nTo: b@example.com\nSubject: later\n\nx\n")
    assert result.returncode == 0 and b"queued in" in result.stderr  # GMAIL_SPOOL_DIR: queued, not failed
    for command, args in ((mailq, []), (sendmail, ["-bp"])):
        listing = run_cli(command, args, env)
        assert listing.returncode == 0
        [line] = listing.stdout.decode().splitlines()
        assert line.startswith("queued ") and "subject 'later'" in line and "could not reach" in line
    unconfigured = run_cli(mailq, [], cli_env(clean_env, dead_url()))
    assert unconfigured.returncode == 0 and b"no spool is configured" in unconfigured.stdout


# --------------------------------------------------------------------------- size


def test_message_over_the_limit_is_refused_before_sending(lone_client, clean_env, reference_server, tmp_path):
    big = tmp_path / "video.mp4"
    big.write_bytes(os.urandom(23 << 20))  # 23 MiB: about 33.8 MB once encoded
    args = ["-s", "x", "-a", str(big), "-r", "me@example.com", "you@example.com"]
    result = run_cli(lone_client, args, cli_env(clean_env, reference_server.url), b"see attached\n")
    assert result.returncode == 65 and reference_server.requests == 0
    [line] = result.stderr.decode().splitlines()
    assert "over the proxy's limit of 33554432 bytes (32 MiB)" in line and "about 21 MiB in all fit" in line


def test_413_from_a_proxy_is_permanent_never_a_broken_pipe(lone_client, clean_env, reference_server, tmp_path):
    reference_server.max_body = 1 << 20  # a proxy with a lower limit refuses before reading
    attachment = tmp_path / "data.bin"
    attachment.write_bytes(os.urandom(6 << 20))
    args = ["-s", "x", "-a", str(attachment), "-r", "me@example.com", "you@example.com"]
    result = run_cli(lone_client, args, cli_env(clean_env, reference_server.url), b"x\n")
    assert result.returncode == 65, result.stderr
    [line] = result.stderr.decode().splitlines()
    assert "refused the message as too large (413 request body over the 1048576-byte limit)" in line


def test_the_attachment_size_the_readme_states_fits_the_real_proxy(start_server, lone_client, clean_env, tmp_path):
    mib = gmail.largest_attachment() >> 20
    assert f"attachments of up to about **{mib} MiB**" in (ROOT / "README.md").read_text()
    attachment = tmp_path / "archive.zip"
    attachment.write_bytes(os.urandom(mib << 20))  # compressed data: base64 and urlencoding as for any archive
    server = start_server()  # delivery into its outbox
    args = ["-s", "big", "-a", str(attachment), "-r", "me@example.com", "you@example.com"]
    result = run_cli(lone_client, args, cli_env(clean_env, server.url), b"attached\n")
    assert result.returncode == 0, result.stderr
    [delivered] = (tmp_path / "outbox" / "new").iterdir()
    from email import message_from_bytes, policy

    [part] = message_from_bytes(delivered.read_bytes(), policy=policy.default).iter_attachments()
    assert part.get_content() == attachment.read_bytes()


def test_form_size_is_checked_exactly(reference_server):
    raw = b"To: a@example.com\n\n" + b"/" * (gmail.MAX_REQUEST_BYTES // 3)  # each '/' urlencodes to 3 bytes
    body = gmail.encode_form(raw, KEY)
    assert len(body) > gmail.MAX_REQUEST_BYTES > len(raw)
    with pytest.raises(gmail.MessageSendingFailure, match=f"its request would be {len(body)} bytes") as caught:
        gmail.GmailProxy(KEY, reference_server.url).send_mail(raw)
    assert caught.value.status == 413 and not caught.value.temporary and reference_server.requests == 0


def test_client_and_server_agree_on_the_limit():
    from appengine_mailer.form import MAX_BODY_BYTES

    assert gmail.MAX_REQUEST_BYTES == MAX_BODY_BYTES


# --------------------------------------------------------------------------- setup errors never lose mail


def test_redirect_names_its_location_and_the_setting_to_change(lone_client, clean_env, reference_server):
    reference_server.force_status, reference_server.force_reason = 301, "Moved Permanently"
    reference_server.force_headers = {"Location": "https://my-app.appspot.com/"}
    for args, source in (([], "GMAIL_PROXY_URL"), (["--url", reference_server.url], "--url")):
        env = cli_env(clean_env, reference_server.url)
        result = run_cli(lone_client, args, env, b"From: a@example.com\nTo: b@example.com\n\nx\n")
        assert result.returncode == 78
        [line] = result.stderr.decode().splitlines()
        assert "redirects to 'https://my-app.appspot.com/'" in line and f"set {source} to the URL" in line


def test_wrong_key_on_the_first_proxy_tries_the_next(lone_client, clean_env, reference_server):
    from reference_server import ReferenceServer

    wrong = ReferenceServer(b"another key")
    try:
        urls = f"{wrong.url},{reference_server.url}"
        result = run_cli(lone_client, [], cli_env(clean_env, urls), b"From: a@example.com\nTo: b@example.com\n\nx\n")
        assert result.returncode == 0, result.stderr
        assert wrong.requests == 1 and len(reference_server.accepted) == 1
    finally:
        wrong.stop()


def test_queue_keeps_mail_through_a_wrong_key_and_a_missing_setting(lone_client, clean_env, reference_server, tmp_path):
    spool = tmp_path / "spool"
    raw = b"From: a@example.com\nTo: b@example.com\nSubject: kept\n\nx\n"
    result = run_cli(lone_client, ["--queue", str(spool)], cli_env(clean_env, reference_server.url, b"wrong"), raw)
    assert result.returncode == 0 and b"does not hold the secret key from GMAIL_SECRET_KEY" in result.stderr
    no_url = {**clean_env, "GMAIL_SECRET_KEY": KEY.decode()}
    result = run_cli(lone_client, ["--queue", str(spool), "--envdir", str(tmp_path)], no_url, raw)
    assert result.returncode == 0 and b"no proxy URL" in result.stderr and b"queued in" in result.stderr
    assert len(os.listdir(spool / "new")) == 2 and reference_server.accepted == []
    result = run_cli(lone_client, ["--flush", str(spool)], cli_env(clean_env, reference_server.url))
    assert result.returncode == 0 and b"sent 2" in result.stdout
    assert [a["msg"] for a in reference_server.accepted] == [raw, raw]


@pytest.mark.parametrize(
    "where, source",
    [("--url", "--url"), ("env", "GMAIL_PROXY_URL"), ("envdir", "GMAIL_PROXY_URL")],
)
def test_error_lines_name_the_option_or_variable_used(lone_client, clean_env, tmp_path, where, source):
    env = {**clean_env, "GMAIL_SECRET_KEY": KEY.decode()}
    args = ["--envdir", str(tmp_path)]
    if where == "--url":
        args += ["--url", "ftp://proxy/"]
    elif where == "env":
        env["GMAIL_PROXY_URL"] = "ftp://proxy/"
    else:
        (tmp_path / "GMAIL_PROXY_URL").write_text("ftp://proxy/\n")
        source = str(tmp_path / "GMAIL_PROXY_URL")
    result = run_cli(lone_client, args, env, b"To: b@example.com\n\nx\n")
    assert result.returncode == 78
    assert result.stderr.decode() == f"gmail.py: {source} must hold http:// or https:// URLs, not 'ftp://proxy/'\n"


def test_unreachable_proxy_is_named_by_host_and_port(lone_client, clean_env):
    url = dead_url()
    result = run_cli(lone_client, [], cli_env(clean_env, url), b"To: b@example.com\n\nx\n")
    assert result.returncode == 75
    assert f"could not reach the proxy at {url.split('/')[2]}:".encode() in result.stderr


# --------------------------------------------------------------------------- --timeout is a deadline


def test_timeout_bounds_the_whole_exchange_with_a_dripping_proxy(drip_server):
    proxy = gmail.GmailProxy(KEY, drip_server.url, timeout=1.5)
    with pytest.raises(gmail.MessageSendingFailure, match=r"timed out: no complete answer within 1\.5 s") as caught:
        proxy.send_mail(readme_message())  # without a deadline: 120 s of drip, then a dropped connection
    assert caught.value.temporary and caught.value.proxy_unavailable and drip_server.requests == 1


def test_cli_timeout_with_a_dripping_proxy(lone_client, clean_env, drip_server):
    result = run_cli(lone_client, ["--timeout", "2"], cli_env(clean_env, drip_server.url), b"To: b@example.com\n\nx\n")
    assert result.returncode == 75 and b"timed out" in result.stderr


def test_https_deadline_and_certificate_check(lone_client, clean_env, self_signed_certificate):
    from conftest import DripServer

    server = DripServer(certificate=self_signed_certificate)
    try:
        env = cli_env(clean_env, server.url)
        untrusted = run_cli(lone_client, ["--timeout", "10"], env, b"To: b@example.com\n\nx\n")
        assert untrusted.returncode == 75 and b"CERTIFICATE_VERIFY_FAILED" in untrusted.stderr.upper().replace(
            b" ", b"_"
        )
        assert server.requests == 0
        trusted = run_cli(
            lone_client, ["--timeout", "2"], {**env, "SSL_CERT_FILE": self_signed_certificate[0]}, b"To: b@x.com\n\nx\n"
        )
        assert trusted.returncode == 75 and b"timed out" in trusted.stderr and server.requests == 1
    finally:
        server.stop()


# --------------------------------------------------------------------------- --check


def test_check_prints_the_report_and_sends_nothing(smtp_server, tmp_path, clean_env):
    key_file = tmp_path / "key"
    key_file.write_text(KEY.decode())
    common = ["--url", smtp_server.url, "--key-file", str(key_file), "--check"]

    def cli(args, stdin):
        result = run_cli(ROOT / "gmail.py", args, clean_env, stdin)
        return subprocess.CompletedProcess(
            result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
        )

    good = cli([*common, "-s", "Report", "-r", "me@example.com", "you@example.com"], b"hello\n")
    assert good.returncode == 0, good.stderr
    assert "would send: yes (delivery: smtp)" in good.stdout and "to: you@example.com" in good.stdout
    exe = tmp_path / "setup.exe"
    exe.write_bytes(b"MZ")
    bad = cli([*common, "--json", "-a", str(exe), "-r", "me@example.com", "you@example.com"], b"hi\n")
    assert bad.returncode == 65, bad.stderr
    report = json.loads(bad.stdout)
    assert report["would_send"] is False and ".exe" in report["problems"][0]
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-key-0123456789")
    refused = cli(["--url", smtp_server.url, "--key-file", str(wrong), "--check", "you@example.com"], b"hi\n")
    assert refused.returncode == 78 and refused.stdout == ""
    assert smtp_server.sink.received == []


def test_check_against_a_proxy_without_it_says_so(reference_server):
    proxy = gmail.GmailProxy(KEY, reference_server.url)
    with pytest.raises(gmail.MessageSendingFailure, match=r"has no /check .*older than this client"):
        proxy.check(readme_message())


def test_a_wrong_url_path_and_a_proxy_without_default_sender_are_setup_errors(
    start_server, smtp_sink, lone_client, clean_env, tmp_path
):
    from conftest import server_env

    server = start_server(server_env(tmp_path, smtp_sink))  # no GMAIL_DEFAULT_SENDER
    wrong_path = run_cli(lone_client, ["you@example.com"], cli_env(clean_env, server.url + "send", KEY), b"hi\n")
    assert wrong_path.returncode == 78 and b"does not take mail at this URL (404 " in wrong_path.stderr
    no_sender = run_cli(lone_client, ["you@example.com"], cli_env(clean_env, server.url, KEY), b"hi\n")
    assert no_sender.returncode == 78, no_sender.stderr
    assert (
        b"has no default sender to send this from" in no_sender.stderr and b"GMAIL_DEFAULT_SENDER" in no_sender.stderr
    )
    assert smtp_sink.wait_for(1, timeout=0.5) == []
