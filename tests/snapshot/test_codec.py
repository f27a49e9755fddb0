"""The value codec: exact round trips, one encoding per value, hostile bytes refused cleanly."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xend_lite.snapshot import codec
from xend_lite.snapshot.codec import CodecError, decode, encode

I64 = st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1)
leaves = (st.none() | st.booleans() | I64 | st.floats(allow_nan=True) | st.text()
          | st.binary(max_size=64))
values = st.recursive(leaves, lambda kids: st.lists(kids, max_size=6)
                      | st.dictionaries(st.text(max_size=8), kids, max_size=6), max_leaves=40)


@pytest.mark.parametrize("v", [
    None, True, False, 0, 1, 127, 128, 2**63, 2**64 - 1, -1, -128, -(2**63), -(2**64) + 1,
    0.0, -0.0, 1.5, math.inf, -math.inf, "", "héllo ✓", b"", b"\0\xff", [], [1, [2, [3]]],
    {}, {"b": 1, "a": [None, {"x": b"y"}]},
])
def test_round_trip(v):
    b = encode(v)
    out = decode(b)
    assert out == v and type(out) is type(v)
    assert encode(out) == b


def test_float_bits_exact():
    for x in (math.nan, -0.0, 5e-324, float.fromhex("0x1.fffffffffffffp+1023")):
        y = decode(encode(x))
        assert codec.float_bits(y) == codec.float_bits(x)


def test_known_encodings_are_stable():
    # the wire format is a file format: these bytes must never change
    assert encode(None) == b"\x00"
    assert encode(300) == b"\x03\xac\x02"
    assert encode(-1) == b"\x04\x00"
    assert encode({"a": [True]}) == b"\x09\x01\x01a\x08\x01\x02"
    assert encode((1, 2)) == encode([1, 2])
    assert encode(bytearray(b"ab")) == encode(b"ab")


def test_dict_order_is_part_of_the_encoding():
    assert encode({"a": 1, "b": 2}) != encode({"b": 2, "a": 1})
    assert list(decode(encode({"b": 2, "a": 1}))) == ["b", "a"]


@pytest.mark.parametrize("v,path,words", [
    (2**64, "", "64 bits"),
    (-(2**64), "", "64 bits"),
    ({"regs": {"rax": 2**70}}, "regs.rax", "64 bits"),
    ({"msrs": [1, 2, object()]}, "msrs[2]", "cannot be saved"),
    ({"s": {1}}, "s", "set"),
    ({1: 2}, "", "not a str"),
    ({"s": "\ud800"}, "s", "Unicode"),
    (3.0j, "", "complex"),
])
def test_encode_refuses_and_names_the_value(v, path, words):
    with pytest.raises(CodecError) as ei:
        encode(v)
    assert ei.value.path == path
    assert words in str(ei.value)


def test_encode_depth_limit():
    v: list = []
    for _ in range(codec.MAX_DEPTH + 5):
        v = [v]
    with pytest.raises(CodecError, match="nested deeper"):
        encode(v)


@pytest.mark.parametrize("raw,words", [
    (b"", "ends in the middle"),
    (b"\x03", "ends in the middle"),
    (b"\x03\x80\x00", "shortest form"),
    (b"\x03" + b"\xff" * 10 + b"\x01", "longer than 64 bits"),
    (b"\x03" + b"\xff" * 9 + b"\x7f", "64 bits"),
    (b"\x04" + b"\xff" * 9 + b"\x01", "64 bits"),
    (b"\x00\x00", "left over"),
    (b"\x0a", "unknown type tag"),
    (b"\x05\x00\x00", "runs past"),
    (b"\x06\x02\xff\xfe", "UTF-8"),
    (b"\x07\x05ab", "runs past"),
    (b"\x08\xff\xff\xff\x0f", "cannot fit"),
    (b"\x09\xff\x01", "cannot fit"),
    (b"\x09\x02\x01a\x00\x01a\x00", "appears twice"),
    (b"\x09\x01\x01\xff\x00", "not valid UTF-8"),
])
def test_decode_refuses(raw, words):
    with pytest.raises(CodecError, match=words):
        decode(raw)


def test_decode_error_names_the_path():
    raw = encode({"regs": {"rax": 1, "rip": [1, 2, "x"]}})
    bad = raw[:-2] + b"\x0a"  # replace the last item's tag and drop a byte
    with pytest.raises(CodecError) as ei:
        decode(bad)
    assert ei.value.path == "regs.rip[2]"


def test_decode_depth_limit():
    raw = b"\x08\x01" * (codec.MAX_DEPTH + 2) + b"\x00"
    with pytest.raises(CodecError, match="nested deeper"):
        decode(raw)


def test_decode_accepts_memoryview_and_bytearray():
    b = encode({"a": [1, 2]})
    assert decode(memoryview(b)) == decode(bytearray(b)) == {"a": [1, 2]}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_property_round_trip(v):
    b = encode(v)
    assert encode(decode(b)) == b


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_property_random_bytes_only_codec_error(raw):
    try:
        v = decode(raw)
    except CodecError:
        return
    assert encode(v) == raw  # whatever is accepted is the one canonical form


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.data())
def test_property_mutated_encodings_only_codec_error(v, data):
    b = bytearray(encode(v))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[:data.draw(st.integers(0, len(b)))]
    try:
        out = decode(bytes(b))
    except CodecError:
        return
    assert encode(out) == bytes(b)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None)
@given(st.binary(max_size=400))
def test_property_random_bytes_soak(raw):
    try:
        v = decode(raw)
    except CodecError:
        return
    assert encode(v) == raw


def _slow(raw: bytes):
    """The path-naming decoder alone (what decode falls back to)."""
    d = codec._Decoder(raw)
    v = d.value("", 0)
    if d.pos != d.end:
        raise CodecError(f"{d.end - d.pos} bytes left over after the value")
    return v


def _outcome(fn, raw):
    try:
        return "ok", encode(fn(raw))
    except CodecError as err:
        return "error", str(err)


def _fast_accepts(raw: bytes):
    try:
        v, pos = codec._fast(raw, 0, 0)
    except (codec._Refused, IndexError, UnicodeDecodeError, RecursionError):
        return None
    return (v,) if pos == len(raw) else None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.data())
def test_property_the_fast_decoder_accepts_only_what_the_other_does(v, data):
    """decode() tries a decoder that keeps no paths first: whatever it accepts, the
    path-naming decoder accepts as the same value, and decode's answer, value or error
    message, is the path-naming decoder's."""
    b = bytearray(encode(v))
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[:data.draw(st.integers(0, len(b)))]
    raw = bytes(b)
    fast = _fast_accepts(raw)
    if fast is not None:
        assert _outcome(_slow, raw) == ("ok", encode(fast[0]))
    assert _outcome(decode, raw) == _outcome(_slow, raw)


@pytest.mark.parametrize("raw", [
    bytes([codec.T_UINT, 0x80, 0x00]),                       # not the shortest form
    bytes([codec.T_UINT]) + b"\xff" * 9 + b"\x02",           # past 64 bits
    bytes([codec.T_NINT]) + b"\xff" * 9 + b"\x01",           # -2**64
    bytes([codec.T_DICT, 2, 1]) + b"a" + bytes([0, 1]) + b"a" + bytes([0]),   # a key twice
    bytes([codec.T_STR, 2, 0xC3, 0x28]),                     # not UTF-8
    bytes([codec.T_LIST, 1]) * 70 + bytes([0]),              # deeper than MAX_DEPTH
    bytes([codec.T_FLOAT, 0, 0, 0]),                         # a short float
    bytes([0x0A]),                                           # no such tag
])
def test_the_fast_decoder_refuses_what_the_other_refuses(raw):
    assert _fast_accepts(raw) is None
    with pytest.raises(CodecError):
        decode(raw)
