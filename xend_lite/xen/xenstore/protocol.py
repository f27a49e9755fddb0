"""The xenstore wire protocol (io/xs_wire.h, docs/misc/xenstore.txt): message types, the
16-byte header, payload arguments and paths, and :class:`MessageReader`, which rebuilds
messages from what arrives in pieces, across ring wraps and across calls, and refuses a
payload over XENSTORE_PAYLOAD_MAX.

Everything here takes guest bytes and either returns checked values or raises
:class:`XsError` with the name a reply carries: an unterminated string, a wrong number of
arguments, a character outside xenstore's path alphabet or a path over its length limit is
an error reply, never an exception escaping to the caller.
"""

from __future__ import annotations

import enum
import re
import struct

from xend_lite.record import Frozen
from xend_lite.record import set_field as _set
from xend_lite.xen.xenstore.errors import XsError
from xend_lite.xen.xenstore.ring import ERROR_PROTO, RingBroken

__all__ = ["XsType", "Header", "HEADER_SIZE", "PAYLOAD_MAX", "ABS_PATH_MAX", "REL_PATH_MAX",
           "PRIVILEGED_ONLY", "encode", "error_message", "one_arg", "strings",
           "home_path", "canonical", "local_offset", "parse_domid", "DOMID_FIRST_RESERVED",
           "MessageReader"]

HEADER = struct.Struct("<IIII")        # struct xsd_sockmsg: type, req_id, tx_id, len
HEADER_SIZE = HEADER.size
PAYLOAD_MAX = 4096                     # XENSTORE_PAYLOAD_MAX
ABS_PATH_MAX = 3072                    # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048                    # XENSTORE_REL_PATH_MAX
DOMID_FIRST_RESERVED = 0x7FF0          # xen.h: ids from here on are not ordinary domains


class XsType(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21          # XS_SET_TARGET + 2: XS_RESTRICT (20) was removed
    DIRECTORY_PART = 22


# Requests xenstored serves to the privileged domain only; a guest gets EACCES.
PRIVILEGED_ONLY = frozenset({XsType.CONTROL, XsType.INTRODUCE, XsType.RELEASE,
                             XsType.IS_DOMAIN_INTRODUCED, XsType.RESUME, XsType.SET_TARGET})


class Header(Frozen):
    __slots__ = ("type", "req_id", "tx_id", "len")
    type: int
    req_id: int
    tx_id: int
    len: int

    def __init__(self, type: int, req_id: int, tx_id: int, len: int):  # noqa: A002
        _set(self, "type", type)
        _set(self, "req_id", req_id)
        _set(self, "tx_id", tx_id)
        _set(self, "len", len)

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        return cls(*HEADER.unpack(raw))


def encode(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """One message: header then payload (the caller keeps payload <= PAYLOAD_MAX)."""
    return HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def error_message(req_id: int, tx_id: int, name: str) -> bytes:
    return encode(XsType.ERROR, req_id, tx_id, name.encode() + b"\0")


# -- arguments ----------------------------------------------------------------------------

def one_arg(payload: bytes) -> bytes:
    """The single string of a one-argument request: exactly one NUL, at the end."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XsError("EINVAL", "expected one NUL-terminated string")
    return payload[:-1]


def strings(payload: bytes, count: int | None = None, at_least: int = 0) -> list[bytes]:
    """Split a payload of NUL-terminated strings. Bytes after the last NUL, a count other
    than ``count`` or fewer than ``at_least`` strings are EINVAL."""
    if payload and not payload.endswith(b"\0"):
        raise XsError("EINVAL", "unterminated string")
    parts = payload.split(b"\0")[:-1] if payload else []
    if (count is not None and len(parts) != count) or len(parts) < at_least:
        raise XsError("EINVAL", f"{len(parts)} strings")
    return parts


def parse_domid(raw: bytes) -> int:
    """A decimal domain id 0..65535."""
    if not 0 < len(raw) <= 5 or not raw.isdigit() or int(raw) > 0xFFFF:
        raise XsError("EINVAL", "bad domain id")
    return int(raw)


# -- paths --------------------------------------------------------------------------------

_PATH_CHARS = re.compile(rb"[A-Za-z0-9\-/_@]*\Z")
_LOCAL = re.compile(r"/local/domain/[0-9]{1,5}/")


def home_path(domid: int) -> str:
    """A domain's home: relative paths it sends are taken from here."""
    return f"/local/domain/{domid}"


def local_offset(path: str) -> int:
    """Length of a leading ``/local/domain/<id>/``: a guest's path limit counts from there."""
    m = _LOCAL.match(path)
    return m.end() if m else 0


def canonical(raw: bytes | str, domid: int, *, allow_special: bool = False,
              path_max: int | None = None) -> tuple[str, bool]:
    """Check a path as xenstored does and make it absolute: returns (path, relative).

    Valid: characters ``A-Za-z0-9-/_@``; absolute (``/...``), special (``@...``, where
    allowed) or relative to ``/local/domain/<domid>``; no trailing slash except the root, no
    empty component; at most ABS_PATH_MAX bytes, and when ``path_max`` is given (guests) at
    most that many past a leading ``/local/domain/<id>/``.
    """
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError:
            raise XsError("EINVAL", "path is not ASCII") from None
    if len(raw) > ABS_PATH_MAX or not _PATH_CHARS.match(raw):
        raise XsError("EINVAL", "invalid path")
    text = raw.decode("ascii")
    special = text.startswith("@")
    if special and not allow_special:
        raise XsError("EINVAL", "special path not allowed here")
    relative = not special and not text.startswith("/")
    path = f"{home_path(domid)}/{text}" if relative else text
    if (path.endswith("/") and path != "/") or "//" in path:
        raise XsError("EINVAL", "empty path component")
    if len(path) > ABS_PATH_MAX:
        raise XsError("EINVAL", "path too long")
    if path_max is not None and len(path) - local_offset(path) > path_max:
        raise XsError("EINVAL", "path too long")
    return path, relative


class MessageReader:
    """Collects one request: a header, then its payload."""

    def __init__(self, partial: bytes = b""):
        self.buf = bytearray(partial)

    @property
    def header(self) -> Header | None:
        return Header.unpack(bytes(self.buf[:HEADER_SIZE])) if len(self.buf) >= HEADER_SIZE \
            else None

    def need(self) -> int:
        """Bytes still missing from the current message."""
        hdr = self.header
        if hdr is None:
            return HEADER_SIZE - len(self.buf)
        return HEADER_SIZE + hdr.len - len(self.buf)

    def feed(self, data: bytes) -> tuple[Header, bytes] | None:
        """Add bytes (no more than :meth:`need`); a complete message comes back."""
        assert len(data) <= self.need()
        self.buf += data
        hdr = self.header
        if hdr is None:
            return None
        if hdr.len > PAYLOAD_MAX:
            raise RingBroken(ERROR_PROTO, f"payload of {hdr.len} bytes")
        if len(self.buf) < HEADER_SIZE + hdr.len:
            return None
        payload = bytes(self.buf[HEADER_SIZE:])
        self.buf.clear()
        return hdr, payload

    def partial(self) -> bytes:
        return bytes(self.buf)
