"""POST /check: what a send would really do with a message, without sending it.

The Mail API rewrites mail silently: it drops headers outside its list,
labels attachments by their extension, refuses executables and replaces
unauthorized senders.  A dry run answers "why did my header vanish?" before
the mail goes out, and lists every refusal a send would get, not just the
first one.
"""

from __future__ import annotations

import io
import zipfile
from typing import Optional

from .convert import Outgoing, address_of, choose_sender, without_surrogates
from .errors import HTTPError, http_error_for_send_failure
from .fastparse import parse_message
from .sdk import mail
from .signatures import check_senders_allowed

MAIL_API_LIMIT = int(31.5 * 1024 * 1024)  # the Mail API's limit for a message with its attachments
MAX_ARCHIVE_ENTRIES = 1000  # entries of an attached zip looked at for executables


def dry_run(
    raw: bytes, *, key: bytes, fix_sender: bool, default_sender: Optional[str], max_recipients: int, delivery: str
) -> dict:
    """Return the report of what sending `raw` would do; never sends."""
    problems: list[str] = []
    report: dict = {
        "would_send": False,
        "problems": problems,
        "warnings": [],
        "notes": [],
        "delivery": delivery,
        "sender": None,
        "recipients": {"to": [], "cc": [], "bcc": []},
        "subject": "",
        "headers_kept": [],
        "headers_dropped": [],
        "attachments": [],
        "size": {"message": len(raw), "limit": MAIL_API_LIMIT},
    }
    try:
        message = parse_message(raw)
    except HTTPError as refusal:
        problems.append(refusal.reason)
        return report
    outgoing = Outgoing(message, max_recipients, problems)
    report.update(
        recipients={header.lower(): [address_of(a) for a in found] for header, found in outgoing.recipients.items()},
        subject=outgoing.subject,
        headers_kept=list(outgoing.headers),
        headers_dropped=outgoing.headers_dropped,
        attachments=[_describe(attachment) for attachment in outgoing.attachments],
    )
    sender = _sender(outgoing, key, fix_sender, default_sender, problems)
    report["sender"] = address_of(sender) if sender else None
    if sender and not problems:
        try:  # the SDK's own checks of the message it would send
            outgoing.to_email_message(sender, outgoing.reply_to).check_initialized()
        except Exception as exc:
            problems.append(http_error_for_send_failure(exc).reason)
    _size_against_limit(report, delivery)
    report["warnings"] += _warnings(report["sender"], outgoing)
    report["notes"].append(_sender_note(delivery))
    report["would_send"] = not problems
    return _printable(report)


def _printable(value):
    """The report with every string free of lone surrogates, so any JSON reader and terminal take it."""
    if isinstance(value, str):
        return without_surrogates(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(item) for item in value]
    return value


def _sender(
    outgoing: Outgoing, key: bytes, fix_sender: bool, default_sender: Optional[str], problems: list[str]
) -> Optional[str]:
    try:
        sender = choose_sender(outgoing, fix_sender, default_sender)
        check_senders_allowed(key, outgoing.identities(sender))
    except HTTPError as refusal:
        problems.append(refusal.reason)
        return None
    return sender


def _describe(attachment) -> dict:
    extension = attachment.filename.rpartition(".")[2].lower() if "." in attachment.filename else ""
    return {
        "name": attachment.filename,
        "content_type": mail.EXTENSION_MIME_MAP.get(extension, "application/octet-stream"),
        "declared_type": getattr(attachment, "declared_type", None),
        "size": len(attachment.payload),
        "inline": attachment.content_id is not None,
        "refused": getattr(attachment, "refused", False),  # listed with the reason under problems
    }


def _size_against_limit(report: dict, delivery: str) -> None:
    size = report["size"]["message"]
    if size > MAIL_API_LIMIT:
        line = f"the message is {size} bytes, over the Mail API's limit of {MAIL_API_LIMIT}"
        (report["problems"] if delivery == "mail-api" else report["warnings"]).append(line)
    elif size > MAIL_API_LIMIT * 0.8:
        report["warnings"].append(f"the message is {size} bytes, near the Mail API's limit of {MAIL_API_LIMIT}")


def _warnings(sender: Optional[str], outgoing: Outgoing) -> list[str]:
    warnings = []
    domain = sender.rpartition("@")[2] if sender else ""
    if domain != domain.lower():
        warnings.append(
            f"the sender's domain {domain!r} has upper-case letters: some receivers then fail its DKIM "
            f"and DMARC checks; write it in lower case"
        )
    for attachment in outgoing.attachments:
        if getattr(attachment, "refused", False):
            continue
        described = _describe(attachment)
        declared = described["declared_type"]
        if declared and declared != described["content_type"] and not declared.startswith("message/"):
            warnings.append(
                f"{described['name']!r} is sent as {described['content_type']}, not {declared}: "
                f"the Mail API labels attachments by their extension"
            )
        executable = _executable_in_archive(attachment.payload)
        if executable:
            warnings.append(
                f"{described['name']!r} is an archive holding an executable ({executable!r}): Gmail and many "
                f"other receivers refuse such mail"
            )
    return warnings


def _executable_in_archive(data: bytes) -> Optional[str]:
    """The first entry of a zip archive with an executable extension, if `data` is one.

    zipfile reads the whole central directory before anything else, so the
    number of entries is read first from the end record, and a zip with more
    than MAX_ARCHIVE_ENTRIES is not opened.
    """
    if not data.startswith(b"PK\x03\x04"):
        return None
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if end == -1 or len(data) < end + 22:
        return None
    entries = int.from_bytes(data[end + 10 : end + 12], "little")
    if entries > MAX_ARCHIVE_ENTRIES:  # 0xFFFF: a ZIP64 archive, larger still
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist()[:MAX_ARCHIVE_ENTRIES]:
                name = info.filename.rstrip("/. ")
                if "." in name and name.rpartition(".")[2].lower() in mail.EXTENSION_BLACKLIST:
                    return info.filename
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError):
        return None
    return None


def _sender_note(delivery: str) -> str:
    if delivery == "smtp":
        return "the SMTP relay's own rules for senders and recipients are known only when it is sent"
    return (
        "whether the Mail API accepts the sender is known only when sending on App Engine: it must be the "
        "app's own address (…@PROJECT.appspotmail.com) or a registered email sender"
    )
