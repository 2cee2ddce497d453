"""The README's examples work as written (only the URL and the key are filled in)."""

from __future__ import annotations

import re
import shutil
import subprocess
from email.message import EmailMessage

import pytest

from conftest import KEY, ROOT, server_env

README = (ROOT / "README.md").read_text()


def code_block(heading: str, language: str) -> str:
    section = README[README.index(heading) :]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_python_client_example(reference_server, capsys):
    code = code_block("### From Python", "python")
    exec(compile(code, "README.md", "exec"), {"SECRET_KEY": KEY.decode(), "PROXY_URL": reference_server.url})
    [accepted] = reference_server.accepted
    assert b"Subject: Testing" in accepted["msg"] and "Failed" not in capsys.readouterr().out


def test_send_many_example(reference_server, capsys):
    code = code_block("### Sending many messages at once", "python")
    reference_server.force_status, reference_server.force_if = 400, b"refused%40example.com"
    messages = []
    for to in ("a@example.com", "refused@example.com", "b@example.com"):
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.com", to, "Notice"
        msg.set_content("Your report is ready.\n")
        messages.append(msg)
    namespace = {"SECRET_KEY": KEY.decode(), "PROXY_URL": reference_server.url, "messages": messages}
    exec(compile(code, "README.md", "exec"), namespace)
    where = reference_server.url.split("/")[2]
    assert capsys.readouterr().out == (
        f"not sent to refused@example.com: the proxy at {where} refused the message: 400 forced failure\n"
    )
    assert len(reference_server.accepted) == 2


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")), reason="needs curl and openssl")
def test_curl_example(start_server, smtp_sink, tmp_path):
    server = start_server(server_env(tmp_path, smtp_sink))
    script = code_block("## The HTTP interface", "sh")
    script = script.replace("$(cat keys/GMAIL_SECRET_KEY)", KEY.decode()).replace("http://127.0.0.1:8080/", server.url)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "204 No Content" in result.stdout, result.stdout + result.stderr
    [env] = smtp_sink.wait_for(1)
    assert env.rcpt_tos == ["you@example.com"] and env.message["Subject"] == "Hi"
