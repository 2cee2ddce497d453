"""The hand-written form parser: exactly the stdlib's unquote_to_bytes, or a refusal (differential tests)."""

from __future__ import annotations

import re
from urllib.parse import quote_from_bytes, quote_plus, unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appengine_mailer.errors import BadRequest
from appengine_mailer.form import parse_form

PRINTABLE = st.one_of(
    st.binary(max_size=200).map(lambda b: bytes(0x21 + c % 94 for c in b).replace(b"&", b"~")),
    st.lists(st.sampled_from([b"%", b"4", b"a", b"F", b"g", b"=", b"+", b"%3D", b"%41", b"z"]), max_size=12).map(
        b"".join
    ),
)
BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def stdlib_unquote(raw: bytes) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" "))


def decode_value(raw: bytes) -> bytes:
    """What parse_form makes of `raw` as the value of a field (raw holds no '&', as in any form)."""
    return parse_form(b"msg=" + raw + b"&other=" + raw)["msg"]


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_unquote_round_trips_what_encoders_write(data):
    for encoded in (
        quote_plus(data).encode(),
        quote_from_bytes(data, safe=b"").encode(),
        re.sub(rb"%[0-9A-F]{2}", lambda m: m.group().lower(), quote_from_bytes(data).encode()),
    ):
        assert decode_value(encoded) == stdlib_unquote(encoded) == data
    lenient = quote_from_bytes(data, safe=b"/:@!$'()*,;=").encode()  # leaves '=' and '+' bare (never '&')
    assert decode_value(lenient) == stdlib_unquote(lenient)


@settings(max_examples=500)
@given(PRINTABLE)
def test_unquote_matches_stdlib_or_refuses_on_any_printable_input(raw):
    try:
        fast = decode_value(raw)
    except BadRequest:
        assert BAD_ESCAPE.search(raw)
        return
    assert not BAD_ESCAPE.search(raw)
    assert fast == stdlib_unquote(raw)


@pytest.mark.parametrize("raw", [b"a=b", b"%3D=%3d", b"=41", b"x=", b"%41%4a%4A", b"+%2B+", b"a%20b=c"])
def test_unquote_edge_cases(raw):
    assert decode_value(raw) == stdlib_unquote(raw)


@settings(max_examples=500)
@given(st.one_of(PRINTABLE, st.binary(max_size=120).map(lambda b: quote_from_bytes(b).encode())), st.integers(1, 9))
def test_decoding_in_slices_matches_decoding_whole(raw, slice_bytes):
    """Small slices put escapes at every slice edge: the result is the same, or the same refusal."""
    body = b"msg=" + raw
    try:
        whole = parse_form(body)
    except BadRequest as refusal:
        with pytest.raises(BadRequest, match=re.escape(refusal.reason)):
            parse_form(body, slice_bytes=slice_bytes)
        return
    assert parse_form(body, slice_bytes=slice_bytes) == whole
