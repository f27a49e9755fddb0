"""A small, deterministic, self-describing binary codec for plain values.

Values: None, bool, int (magnitude below 2**64, so every signed and unsigned 64-bit value),
float (IEEE 754 binary64, bit-exact), str (UTF-8), bytes, list, and dict with str keys
(insertion order is kept and is part of the encoding). Each value is one tag byte followed by
its body; lengths and integers are unsigned LEB128 varints in their shortest form. Equal
values with equal dict order always encode to the same bytes, and a decoder accepts only
that one form, so decode(encode(v)) == v and encode(decode(b)) == b for every accepted b.

The decoder never trusts a length: counts are bounded by the bytes that remain, nesting is
bounded by MAX_DEPTH, and every fault raises CodecError naming the path of the bad value
(``regs.rax``, ``msrs[3]``).
"""

from __future__ import annotations

import struct
from typing import Any

from xend_lite.errors import SnapshotError

__all__ = ["CodecError", "encode", "decode", "MAX_DEPTH", "INT_LIMIT"]

T_NONE = 0x00
T_FALSE = 0x01
T_TRUE = 0x02
T_UINT = 0x03
T_NINT = 0x04  # value is -1 - n
T_FLOAT = 0x05
T_STR = 0x06
T_BYTES = 0x07
T_LIST = 0x08
T_DICT = 0x09

MAX_DEPTH = 64
INT_LIMIT = 1 << 64  # |int| < INT_LIMIT
_MAX_VARINT_BYTES = 10  # 64 bits in 7-bit groups

_F64 = struct.Struct("<d")


class CodecError(SnapshotError):
    """A value cannot be encoded, or bytes are not a valid encoding; ``path`` says where."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _encode(out: bytearray, v: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CodecError(f"nested deeper than {MAX_DEPTH} levels", path)
    t = type(v)
    if v is None:
        out.append(T_NONE)
    elif t is bool:
        out.append(T_TRUE if v else T_FALSE)
    elif t is int:
        if v >= 0:
            if v >= INT_LIMIT:
                raise CodecError(f"integer {v:#x} does not fit in 64 bits", path)
            out.append(T_UINT)
            _varint(out, v)
        else:
            if -v > INT_LIMIT - 1:
                raise CodecError(f"integer {v} does not fit in 64 bits", path)
            out.append(T_NINT)
            _varint(out, -1 - v)
    elif t is float:
        out.append(T_FLOAT)
        out += _F64.pack(v)
    elif t is str:
        try:
            b = v.encode("utf-8")
        except UnicodeEncodeError as err:
            raise CodecError(f"string is not valid Unicode ({err.reason})", path) from None
        out.append(T_STR)
        _varint(out, len(b))
        out += b
    elif t is bytes or t is bytearray or t is memoryview:
        b = bytes(v)
        out.append(T_BYTES)
        _varint(out, len(b))
        out += b
    elif t is list or t is tuple:
        out.append(T_LIST)
        _varint(out, len(v))
        for i, item in enumerate(v):
            _encode(out, item, _child(path, i), depth + 1)
    elif t is dict:
        out.append(T_DICT)
        _varint(out, len(v))
        for k, item in v.items():
            if type(k) is not str:
                raise CodecError(f"dict key {k!r} is a {type(k).__name__}, not a str", path)
            try:
                kb = k.encode("utf-8")
            except UnicodeEncodeError as err:
                raise CodecError(f"dict key is not valid Unicode ({err.reason})", path) from None
            _varint(out, len(kb))
            out += kb
            _encode(out, item, _child(path, k), depth + 1)
    else:
        raise CodecError(f"type {t.__name__} cannot be saved", path)


def encode(value: Any, path: str = "") -> bytes:
    """Encode one value. Tuples encode as lists. Raises CodecError naming the bad value."""
    out = bytearray()
    _encode(out, value, path, 0)
    return bytes(out)


class _Decoder:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | memoryview):
        self.buf = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
        self.pos = 0
        self.end = len(self.buf)

    def byte(self, path: str) -> int:
        if self.pos >= self.end:
            raise CodecError("data ends in the middle of a value", path)
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self, path: str) -> int:
        n = 0
        shift = 0
        for i in range(_MAX_VARINT_BYTES):
            b = self.byte(path)
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise CodecError("integer is not in its shortest form", path)
                if n >= INT_LIMIT:
                    raise CodecError("integer does not fit in 64 bits", path)
                return n
            shift += 7
        raise CodecError("integer is longer than 64 bits", path)

    def take(self, n: int, path: str) -> bytes:
        if n > self.end - self.pos:
            raise CodecError(f"length {n} runs past the end of the data", path)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def value(self, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH} levels", path)
        tag = self.byte(path)
        if tag == T_NONE:
            return None
        if tag == T_FALSE:
            return False
        if tag == T_TRUE:
            return True
        if tag == T_UINT:
            return self.varint(path)
        if tag == T_NINT:
            n = self.varint(path)
            if n == INT_LIMIT - 1:
                raise CodecError("integer does not fit in 64 bits", path)
            return -1 - n
        if tag == T_FLOAT:
            return _F64.unpack(self.take(8, path))[0]
        if tag == T_STR:
            raw = self.take(self.varint(path), path)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CodecError("string is not valid UTF-8", path) from None
        if tag == T_BYTES:
            return self.take(self.varint(path), path)
        if tag == T_LIST:
            n = self.varint(path)
            if n > self.end - self.pos:  # every item takes at least one byte
                raise CodecError(f"list of {n} items cannot fit in the data", path)
            return [self.value(_child(path, i), depth + 1) for i in range(n)]
        if tag == T_DICT:
            n = self.varint(path)
            if n > (self.end - self.pos) // 2:  # key length + value tag at least
                raise CodecError(f"dict of {n} items cannot fit in the data", path)
            d: dict[str, Any] = {}
            for _ in range(n):
                raw = self.take(self.varint(path), path)
                try:
                    k = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise CodecError("dict key is not valid UTF-8", path) from None
                if k in d:
                    raise CodecError(f"dict key {k!r} appears twice", path)
                d[k] = self.value(_child(path, k), depth + 1)
            return d
        raise CodecError(f"unknown type tag {tag:#04x}", path)


class _Refused(Exception):
    """The fast decoder's only error: the exact one comes from _Decoder."""


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``, under _Decoder.varint's rules."""
    n = 0
    shift = 0
    for i in range(_MAX_VARINT_BYTES):
        b = buf[pos]              # IndexError past the end
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            if (b == 0 and i > 0) or n >= INT_LIMIT:
                raise _Refused
            return n, pos
        shift += 7
    raise _Refused


def _fast(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """One value at ``pos``: what _Decoder.value accepts, without naming paths."""
    if depth > MAX_DEPTH:
        raise _Refused
    tag = buf[pos]
    pos += 1
    if tag <= T_TRUE:
        return (None, False, True)[tag], pos
    if tag == T_FLOAT:
        if pos + 8 > len(buf):
            raise _Refused
        return _F64.unpack_from(buf, pos)[0], pos + 8
    b = buf[pos]
    if b < 0x80:                  # a one-byte varint: most lengths and integers
        n = b
        pos += 1
    else:
        n, pos = _read_varint(buf, pos)
    if tag == T_UINT:
        return n, pos
    if tag == T_NINT:
        if n == INT_LIMIT - 1:
            raise _Refused
        return -1 - n, pos
    end = len(buf)
    if tag == T_STR or tag == T_BYTES:
        if n > end - pos:
            raise _Refused
        raw = buf[pos:pos + n]
        return (raw.decode("utf-8") if tag == T_STR else raw), pos + n
    if tag == T_LIST:
        if n > end - pos:
            raise _Refused
        items = []
        for _ in range(n):
            v, pos = _fast(buf, pos, depth + 1)
            items.append(v)
        return items, pos
    if tag == T_DICT:
        if n > (end - pos) // 2:
            raise _Refused
        d: dict[str, Any] = {}
        for _ in range(n):
            k = buf[pos]
            if k < 0x80:
                pos += 1
            else:
                k, pos = _read_varint(buf, pos)
            if k > end - pos:
                raise _Refused
            key = buf[pos:pos + k].decode("utf-8")
            if key in d:
                raise _Refused
            d[key], pos = _fast(buf, pos + k, depth + 1)
        return d, pos
    raise _Refused


def decode(data: bytes | memoryview, path: str = "") -> Any:
    """Decode exactly one value that fills ``data``; raise CodecError otherwise. A fast
    decoder (no paths kept, about three times quicker) takes what it can; anything it
    refuses or does not handle is decoded again by _Decoder, which names the fault."""
    buf = data if type(data) is bytes else bytes(data)
    try:
        v, pos = _fast(buf, 0, 0)
        if pos == len(buf):
            return v
    except (_Refused, IndexError, UnicodeDecodeError, RecursionError):
        pass
    d = _Decoder(data)
    v = d.value(path, 0)
    if d.pos != d.end:
        raise CodecError(f"{d.end - d.pos} bytes left over after the value", path)
    return v


def float_bits(x: float) -> int:
    """The IEEE bits of a float (for comparing NaNs in tests and checks)."""
    return int.from_bytes(_F64.pack(x), "little")
