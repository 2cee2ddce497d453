"""Rendering for SMTP mode and the outbox: render() writes what the email package and smtplib wrote (differential)."""

from __future__ import annotations

import io
import os
import re
from email.generator import BytesGenerator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appengine_mailer.delivery import Fields, RenderedEmailMessage, render, render_mime
from appengine_mailer.sdk import mail

BOUNDARY = re.compile(rb"={15}\d{19}==")  # what email.generator makes


def normalized(flat: bytes) -> bytes:
    """The bytes with what is random in every rendering (boundaries, Date, Message-ID) made fixed."""
    names: dict[bytes, bytes] = {}
    flat = BOUNDARY.sub(lambda m: names.setdefault(m.group(), b"BOUNDARY%d" % len(names)), flat)
    return re.sub(rb"(?m)^(Date|Message-ID): [^\r\n]*", rb"\1: X", flat)


def reference_outbox(proto) -> bytes:
    """What the outbox filed before render(): render_mime() plus X-Envelope-To, as Message.as_bytes()."""
    mime = render_mime(proto)
    del mime["Bcc"]  # recipients never see it; X-Envelope-To names them all
    mime["X-Envelope-To"] = ", ".join([*proto.To, *proto.Cc, *proto.Bcc])
    return mime.as_bytes()


def reference_smtp(message: mail.EmailMessage) -> bytes:
    """What the SDK's SMTP mode handed smtplib: to_mime_message() without Bcc, flattened as send_message does."""
    mime = message.to_mime_message()
    del mime["Bcc"]
    out = io.BytesIO()
    BytesGenerator(out).flatten(mime, linesep="\r\n")
    return out.getvalue()


TEXT_PIECES = ["Hi", "From me", ".hidden", ".", "Grüße ½ €", "日本", "\r", "\n", "\r\n", " ", "x" * 90, "y" * 1200]
TEXTS = st.lists(st.sampled_from(TEXT_PIECES), max_size=12).map("".join)


@st.composite
def email_messages(draw) -> RenderedEmailMessage:
    fields = {"sender": "Sender <sender@example.com>", "subject": draw(st.sampled_from(["Hi", "Grüße", ""]))}
    fields["to"] = ["One <one@example.com>", "two@example.com"]
    if draw(st.booleans()):
        fields["cc"] = ["Cé <cc@example.com>"]
    if draw(st.booleans()):
        fields["bcc"] = ["secret@example.com"]
    if draw(st.booleans()):
        fields["reply_to"] = "reply@example.com"
    if draw(st.booleans()):
        fields["headers"] = {"List-Id": "<list.example.com>", "In-Reply-To": "<prev@example.com>"}
    as_bytes = draw(st.booleans())  # the converter passes UTF-8 bytes, other callers str
    for name in draw(st.sampled_from([["body"], ["html"], ["body", "html"], ["body", "amp_html", "html"]])):
        text = draw(TEXTS) or ("" if name == "body" else "x")  # only the text body may be empty
        fields[name] = text.encode() if as_bytes else text
    attachments = []
    for index in range(draw(st.integers(0, 3))):
        data = os.urandom(draw(st.sampled_from([0, 1, 56, 57, 58, 3000, 60_000])))
        content_id = draw(st.sampled_from([None, f"<img{index}@x>"]))
        attachments.append(mail.Attachment(f"file{index}.pdf", data, content_id=content_id))
    if attachments:
        fields["attachments"] = attachments
    return RenderedEmailMessage(**fields)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(email_messages())
def test_outbox_rendering_matches_the_email_package(message):
    proto = message.ToProto()
    expected = normalized(reference_outbox(proto))
    assert normalized(render(Fields.from_proto(proto), envelope_to=True)) == expected
    assert normalized(render(Fields.from_email_message(message), envelope_to=True)) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(email_messages())
def test_smtp_rendering_matches_what_smtplib_was_given(message):
    fields = Fields.from_email_message(message)
    fields.bcc = []
    assert normalized(render(fields, linesep="\r\n", mangle_from=True)) == normalized(reference_smtp(message))


def test_a_line_longer_than_smtp_allows_arrives_whole(smtp_server):
    from email.message import EmailMessage

    from conftest import form
    from test_mailer_e2e import post

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.com", "long"
    msg.set_content("<p>" + "word " * 440 + "</p>\n", subtype="html")  # one line of 2,208 characters
    assert post(smtp_server.url, form(msg.as_bytes()))[0] == 204
    [envelope] = smtp_server.sink.wait_for(1)
    assert envelope.message.get_body(("html",)).get_content() == "<p>" + "word " * 440 + "</p>\n"
    assert max(len(line) for line in envelope.content.split(b"\r\n")) <= 998


def test_an_empty_outbox_folder_is_filled_not_refused(start_server, tmp_path):
    from conftest import form, server_env
    from test_mailer import make_message
    from test_mailer_e2e import post

    outbox = tmp_path / "empty-outbox"
    outbox.mkdir()
    server = start_server(server_env(tmp_path, GMAIL_OUTBOX=str(outbox)))
    assert post(server.url, form(make_message().as_bytes()))[0] == 204
    assert len(list((outbox / "new").iterdir())) == 1
