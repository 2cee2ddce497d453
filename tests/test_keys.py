"""`python mailer.py keys new|list|retire` and rotation through real server restarts."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import webtest

import mailer
from appengine_mailer.keys import write_key_file
from appengine_mailer.settings import Key, KeyFile, key_fingerprint, keys_from_environment, parse_keys
from conftest import KEY, form, server_env
from test_mailer import make_message
from test_mailer_e2e import post as post_text


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


def new_key_via_cli(deployment: Path) -> bytes:
    result = keys_cli(deployment, "new")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].encode()


def test_rotation_end_to_end(deployment, start_server, smtp_sink, tmp_path):
    def deploy():
        env = server_env(tmp_path, smtp_sink)
        del env["GMAIL_SECRET_KEY"]  # read keys/GMAIL_SECRET_KEY, as on App Engine
        return start_server(env, cwd=deployment, script=deployment / "mailer.py")

    old = new_key_via_cli(deployment)
    key_file = deployment / "keys" / "GMAIL_SECRET_KEY"
    assert key_file.stat().st_mode & 0o777 == 0o600
    msg = make_message().as_bytes()
    server = deploy()
    assert post(server.url, form(msg, old)) == 204

    new = new_key_via_cli(deployment)  # 1. add the new key, 2. deploy
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


def eventually(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return check()


def test_key_file_changes_take_effect_without_a_restart(deployment, start_server, smtp_sink, tmp_path):
    old = new_key_via_cli(deployment)
    env = server_env(tmp_path, smtp_sink)
    del env["GMAIL_SECRET_KEY"]  # keys/GMAIL_SECRET_KEY, as on App Engine and with `make run`
    server = start_server(env, cwd=deployment, script=deployment / "mailer.py")
    msg = make_message().as_bytes()
    assert post(server.url, form(msg, old)) == 204
    new = new_key_via_cli(deployment)
    assert eventually(lambda: post(server.url, form(msg, new)) == 204)
    assert keys_cli(deployment, "retire", key_fingerprint(old)).returncode == 0
    assert eventually(lambda: post(server.url, form(msg, old)) == 400)
    assert post(server.url, form(msg, new)) == 204
    server.stop()
    assert "keys reloaded: 2 valid" in "".join(server.log_lines)


def test_key_file_is_only_looked_at_every_few_seconds(tmp_path):
    now = [0.0]
    key_file = tmp_path / "keys" / "GMAIL_SECRET_KEY"
    write_key_file(key_file, [KEY])
    keys = KeyFile(tmp_path, interval=2.0, clock=lambda: now[0])
    assert keys.current() == [KEY]
    write_key_file(key_file, [KEY, b"x" * 32])
    now[0] = 1.9
    assert keys.current() == [KEY]  # not looked at yet
    now[0] = 2.1
    assert keys.current() == [KEY, b"x" * 32]
    key_file.unlink()
    now[0] = 4.2
    assert keys.current() == []  # every key retired: every request refused


@pytest.mark.parametrize("keys", [[b""], [b"   "], ["\t"], [KEY, b" \n"], ["\u00a0"]])
def test_make_app_refuses_blank_keys(keys):
    with pytest.raises(ValueError, match="blank"):
        mailer.make_app(keys)


def test_make_app_takes_one_key_or_several_and_warns_about_short_ones(mail_stub, caplog):
    assert mailer.make_app(KEY).keys == [KEY]
    assert mailer.make_app([KEY.decode(), "another-key-of-some-length"]).keys == [KEY, b"another-key-of-some-length"]
    with pytest.raises(TypeError, match="key #1 is a int"):
        mailer.make_app([123])
    caplog.set_level(logging.WARNING)
    mailer.make_app([b"short"])
    assert f"key {key_fingerprint(b'short')} is only 5 characters long" in caplog.text


def test_scoped_keys_through_the_real_server(deployment, start_server, smtp_sink, tmp_path):
    shop, anyone = b"shop-key-0123456789abcdefghij", b"admin-key-0123456789abcdefghi"
    (deployment / "keys").mkdir()
    key_file = deployment / "keys" / "GMAIL_SECRET_KEY"
    key_file.write_text(f"{shop.decode()}  orders@shop.example  @News.Shop.example\n{anyone.decode()}\n")
    key_file.chmod(0o600)
    env = server_env(tmp_path, smtp_sink, GMAIL_DEFAULT_SENDER="noreply@proxy.example")
    del env["GMAIL_SECRET_KEY"]
    server = start_server(env, cwd=deployment, script=deployment / "mailer.py")

    def send(key, sender, **extra):
        msg = make_message(From=sender) if sender else make_message()
        if not sender:
            del msg["From"]
        return post_text(server.url, form(msg.as_bytes(), key, **extra))

    assert send(shop, "Orders <ORDERS@shop.example>")[0] == 204
    assert send(shop, "letters@news.shop.example")[0] == 204
    status, text = send(shop, "ceo@shop.example")
    assert status == 403
    assert text == (
        f"the key {key_fingerprint(shop)} may not send as 'ceo@shop.example': it may send only as "
        "orders@shop.example, @news.shop.example\n"
    )
    status, text = send(shop, None, fix_sender="true")  # the default sender is outside the list too
    assert status == 403 and "may not send as 'noreply@proxy.example'" in text
    assert send(anyone, "ceo@shop.example")[0] == 204
    assert [e.mail_from for e in smtp_sink.wait_for(3)] == [
        "ORDERS@shop.example",
        "letters@news.shop.example",
        "ceo@shop.example",
    ]
    listing = keys_cli(deployment, "list").stdout
    assert "sends as orders@shop.example, @news.shop.example" in listing and "sends as anyone" in listing
    assert shop.decode() not in listing


def test_keys_new_with_senders_writes_a_scoped_line(deployment):
    result = keys_cli(deployment, "new", "--sender", "a@x.org", "--sender", "@Y.org")
    assert result.returncode == 0 and "it may send only as a@x.org, @y.org" in result.stdout
    [line] = (deployment / "keys" / "GMAIL_SECRET_KEY").read_text().splitlines()
    assert line.split()[1:] == ["a@x.org", "@y.org"]
    bad = keys_cli(deployment, "new", "--sender", "not-an-address")
    assert bad.returncode == 64 and "must be an address or @domain" in bad.stderr


def test_a_key_line_with_a_junk_sender_is_refused_whole(tmp_path, caplog):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "GMAIL_SECRET_KEY").write_text(f"{KEY.decode()} a@x.org junk\n")
    assert keys_from_environment({}, root=tmp_path) == []
    assert "is neither an address nor @domain" in caplog.text and KEY.decode() not in caplog.text


def test_an_unreadable_key_file_refuses_every_request_until_it_is_fixed(tmp_path, caplog):
    now = [0.0]
    key_file = tmp_path / "keys" / "GMAIL_SECRET_KEY"
    write_key_file(key_file, [KEY])
    (tmp_path / "GMAIL_SECRET_KEYS").write_text("old-key-in-the-original-place-0123\n")
    keys = KeyFile(tmp_path, interval=1.0, clock=lambda: now[0])
    assert keys.current() == [KEY]
    key_file.write_bytes(b"\xff\xfe not utf-8\n")
    now[0] = 1.5
    assert keys.current() == []  # neither the old key nor the older file stands in for it
    assert "cannot read" in caplog.text and "not UTF-8 text" in caplog.text
    write_key_file(key_file, [KEY])
    now[0] = 3.0
    assert keys.current() == [KEY]


def test_fingerprints_are_slow_to_test_guesses_against(caplog):
    import hashlib

    assert key_fingerprint(b"short") != hashlib.sha256(b"short").hexdigest()[:12]
    assert key_fingerprint(b"short") == key_fingerprint(Key(b"short", ["@x.org"]))


def test_key_lines_split_at_line_feeds_only_and_a_sender_is_never_a_key(caplog):
    text = (
        "Hx3-key-for-the-shop-0123456789abc  orders@shop.example\n"
        "                                     @news.shop.example\n"  # a scope wrapped onto its own line
        "KEY2-0123456789abcdefgh\x85crm@example.com\n"  # \x85 and friends are spaces, not line ends
        "KEY2-0123456789abcdefgh\n"  # the same key again, unscoped: refused
    )
    keys = parse_keys(text)
    assert [k.senders for k in keys] == [("orders@shop.example",), ("crm@example.com",)]
    assert "looks like an address" in caplog.text and "same key is on an earlier line" in caplog.text


def test_keys_commands_keep_lines_the_server_cannot_read(deployment):
    key_file = deployment / "keys" / "GMAIL_SECRET_KEY"
    key_file.parent.mkdir()
    key_file.write_text("legacy key with spaces 0123\nkept-key-0123456789abcdef\n")
    assert keys_cli(deployment, "new").returncode == 0
    lines = key_file.read_text().splitlines()
    assert lines[:2] == ["legacy key with spaces 0123", "kept-key-0123456789abcdef"] and len(lines) == 3
    assert keys_cli(deployment, "retire", key_fingerprint(b"kept-key-0123456789abcdef")).returncode == 0
    assert key_file.read_text().splitlines()[0] == "legacy key with spaces 0123"
    assert keys_cli(deployment, "new", "--sender", "").returncode == 64


def test_a_key_never_shows_its_secret_as_text():
    key = Key(b"super-secret-0123456789", ["a@x.org"])
    for shown in (str(key), f"{key}", "%s" % key, repr(key), str(ValueError(key))):  # noqa: UP031
        assert "super-secret" not in shown and key_fingerprint(key) in shown
