"""`python mailer.py keys new|list|retire`: rotate keys without refusing a message.

Keys are written by the owner for the owner (0600, atomically), listed by
fingerprint only, and the last key cannot be retired.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import Optional, Sequence

from .settings import Key, key_fingerprint, key_lines, parse_key_line, parse_keys

EX_USAGE, EX_DATAERR, EX_NOINPUT = 64, 65, 66


def default_key_file(root: Path) -> Path:
    """The key file of a deployment rooted at `root` (where mailer.py lives)."""
    return root / "keys" / "GMAIL_SECRET_KEY"


def new_key() -> bytes:
    """A strong random key: 256 bits, URL-safe so it pastes anywhere."""
    return secrets.token_urlsafe(32).encode("ascii")


def write_key_file(path: Path, keys: list[bytes]) -> None:
    """Replace the key file atomically, readable by its owner only: one key per line, then its senders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(b"".join((key.line() if isinstance(key, Key) else key) + b"\n" for key in keys))
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def add_keys_command(commands, root: Path) -> None:
    """Add the `keys` subcommand to mailer.py's command line."""
    key_file = default_key_file(root)
    keys = commands.add_parser(
        "keys",
        help="manage the secret keys (new, list, retire)",
        description="Rotate keys without downtime: `keys new`, deploy, switch the clients, `keys retire OLD`, deploy.",
    )
    keys.add_argument("action", choices=["new", "list", "retire"])
    keys.add_argument("fingerprint", nargs="?", help="with retire: the fingerprint shown by `keys list`")
    keys.add_argument(
        "--sender",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="with new: the key may send only as this address, or as any address of @DOMAIN (repeat for more; "
        "without it the key may send as anyone)",
    )
    keys.add_argument("--file", type=Path, default=key_file, help=f"key file (default {key_file})")


def keys_command(args: argparse.Namespace) -> int:
    """Run `keys ACTION` on the key file; return the exit status."""
    if os.environ.get("GMAIL_SECRET_KEY"):
        print(
            f"mailer.py: note: GMAIL_SECRET_KEY is set here; a server started with it ignores {args.file}",
            file=sys.stderr,
        )
    return manage_keys(args.action, args.file, args.fingerprint, args.sender)


def manage_keys(action: str, path: Path, fingerprint: Optional[str] = None, senders: Sequence[str] = ()) -> int:
    """`keys new|list|retire`: manage the key file so keys rotate without refusing a message.

    The file is rewritten line by line: a line the server cannot read (and
    ignores, with a warning) is kept as it is, never silently deleted.
    """
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = [line.encode("utf-8") for line in key_lines(text) if line.strip()]
    keys = parse_keys(text)
    if senders and action != "new":
        print("mailer.py: --sender goes with `keys new`", file=sys.stderr)
        return EX_USAGE
    if action == "new":
        key = parse_key_line(" ".join([new_key().decode("ascii"), *senders]))
        if key is None or any(not sender.strip() for sender in senders):
            print(f"mailer.py: each --sender must be an address or @domain, not {list(senders)}", file=sys.stderr)
            return EX_USAGE
        write_key_file(path, [*lines, key.line()])
        scope = f"may send only as {', '.join(key.senders)}" if key.senders else "may send as anyone"
        print(
            f"added key {key_fingerprint(key)} to {path} ({len(keys) + 1} valid; it {scope}); give it to clients:\n"
            f"{bytes(key).decode()}"
        )
    elif action == "list":
        if not keys:
            print(f"no keys in {path}", file=sys.stderr)
            return EX_NOINPUT
        for number, key in enumerate(keys, 1):
            newest = "  (newest)" if number == len(keys) else ""
            scope = ", ".join(key.senders) or "anyone"
            print(f"{key_fingerprint(key)}  {len(key):3d} characters  sends as {scope}{newest}")
    elif action == "retire":
        matches = [k for k in keys if key_fingerprint(k).startswith((fingerprint or "").lower())]
        if not fingerprint or len(fingerprint) < 6 or len(matches) != 1:
            print(
                f"mailer.py: {fingerprint!r} names {len(matches) if fingerprint else 0} keys; give at least 6 "
                f"characters of one fingerprint from `keys list`",
                file=sys.stderr,
            )
            return EX_DATAERR
        if len(keys) == 1:
            print("mailer.py: refusing to retire the only key: add a new one first (`keys new`)", file=sys.stderr)
            return EX_DATAERR
        write_key_file(path, [line for line in lines if parse_key_line(line.decode("utf-8")) != matches[0]])
        print(f"retired key {key_fingerprint(matches[0])}; {len(keys) - 1} valid key(s) left in {path}")
    return 0
