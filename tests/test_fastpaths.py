"""Differential tests: each hand-written fast path gives exactly what the stdlib path gives."""

from __future__ import annotations

import re
from urllib.parse import quote_from_bytes, quote_plus, unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mailer

PRINTABLE = st.one_of(
    st.binary(max_size=200).map(lambda b: bytes(0x21 + c % 94 for c in b)),
    st.lists(st.sampled_from([b"%", b"4", b"a", b"F", b"g", b"=", b"+", b"%3D", b"%41", b"z"]), max_size=12).map(b"".join),
)
BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def stdlib_unquote(raw: bytes) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" "))


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_unquote_round_trips_what_encoders_write(data):
    for encoded in (quote_plus(data).encode(), quote_from_bytes(data, safe=b"").encode(),
                    re.sub(rb"%[0-9A-F]{2}", lambda m: m.group().lower(), quote_from_bytes(data).encode())):
        assert mailer.unquote_field(encoded, "msg") == stdlib_unquote(encoded) == data
    lenient = quote_from_bytes(data, safe=b"/:@!$'()*,;=").encode()  # leaves '=' and '+' bare
    assert mailer.unquote_field(lenient, "msg") == stdlib_unquote(lenient)


@settings(max_examples=500)
@given(PRINTABLE)
def test_unquote_matches_stdlib_or_refuses_on_any_printable_input(raw):
    try:
        fast = mailer.unquote_field(raw, "msg")
    except mailer.BadRequest:
        assert BAD_ESCAPE.search(raw)
        return
    assert not BAD_ESCAPE.search(raw)
    assert fast == stdlib_unquote(raw)


@pytest.mark.parametrize("raw", [b"a=b", b"%3D=%3d", b"=41", b"x=", b"%41%4a%4A", b"+%2B+", b"a%20b=c"])
def test_unquote_edge_cases(raw):
    assert mailer.unquote_field(raw, "msg") == stdlib_unquote(raw)


@settings(max_examples=2000)
@given(PRINTABLE)
def test_escape_check_matches_the_regex(raw):
    assert mailer.has_bad_escape(raw) == bool(BAD_ESCAPE.search(raw))
