"""Kernel images as distributions ship them: an ELF (a vmlinux, a test guest, PVH GRUB) is
used as it is; an x86 bzImage is opened to the ELF vmlinux it carries.

A bzImage starts with the x86 boot protocol's real-mode setup: the setup header at 0x1f1
holds the boot flag 0xaa55 at 0x1fe, "HdrS" at 0x202 and the protocol version at 0x206; the
protected-mode part starts after (setup_sects + 1) 512-byte sectors (setup_sects 0 means 4).
Since protocol 2.08 the header names the compressed vmlinux inside it: payload_offset (0x248,
from the start of the protected-mode part) and payload_length (0x24c). Its format is known by
its magic; Linux's build appends the decompressed size as a little-endian u32 to every format
but gzip, whose own trailer holds it.

Decompression is bounded: the output is capped (``MAX_KERNEL_BYTES`` unless told otherwise),
and a malformed payload is a LoaderError that says what is wrong, never a crash.
"""

from __future__ import annotations

import lzma
import struct
import zlib

from xend_lite.errors import LoaderError
from xend_lite.machine import native
from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

MAX_KERNEL_BYTES = 512 << 20
ELF_MAGIC = b"\x7fELF"

# setup header fields (offsets from the start of the file)
SETUP_SECTS, BOOT_FLAG, HDRS, VERSION, KERNEL_VERSION = 0x1F1, 0x1FE, 0x202, 0x206, 0x20E
PREF_ADDRESS, INIT_SIZE, PAYLOAD = 0x258, 0x260, 0x248
HEADER_END = 0x264   # through init_size, the last field we read
MIN_PAYLOAD_VERSION = (2, 8)

# The formats Linux can compress its kernel with (CONFIG_KERNEL_*), by magic.
FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"\x02\x21\x4c\x18", "lz4"),            # LZ4 legacy frames
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (ELF_MAGIC, "none"),                     # CONFIG_KERNEL_UNCOMPRESSED
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x04\x22\x4d\x18", "lz4-frame"),      # the modern LZ4 frame format, not what Linux writes
)
SUPPORTED = ("lz4", "gzip", "xz", "none")


class SetupHeader(Frozen):
    """What xend-lite reads from a bzImage's setup header."""

    __slots__ = ("version", "setup_sects", "payload_offset", "payload_length", "pref_address",
                 "init_size", "kernel_version")
    version: tuple[int, int]
    setup_sects: int
    payload_offset: int      # from the start of the file
    payload_length: int
    pref_address: int
    init_size: int
    kernel_version: str      # "" when the header names none

    def __init__(self, version: tuple[int, int], setup_sects: int, payload_offset: int,
                 payload_length: int, pref_address: int, init_size: int, kernel_version: str):
        _set(self, "version", version)
        _set(self, "setup_sects", setup_sects)
        _set(self, "payload_offset", payload_offset)
        _set(self, "payload_length", payload_length)
        _set(self, "pref_address", pref_address)
        _set(self, "init_size", init_size)
        _set(self, "kernel_version", kernel_version)


class Kernel(Frozen):
    """An image ready for the ELF loader, and where it came from."""

    __slots__ = ("elf", "container", "compression", "header")
    elf: bytes
    container: str                    # "elf" or "bzimage"
    compression: str | None           # the payload's format, for a bzImage
    header: SetupHeader | None

    def __init__(self, elf: bytes, container: str, compression: str | None = None,
                 header: SetupHeader | None = None):
        _set(self, "elf", elf)
        _set(self, "container", container)
        _set(self, "compression", compression)
        _set(self, "header", header)


def _err(msg: str) -> LoaderError:
    return LoaderError(f"guest image: {msg}")


def is_bzimage(image: bytes) -> bool:
    return len(image) >= HDRS + 4 and image[HDRS:HDRS + 4] == b"HdrS"


def _kernel_version(image: bytes, setup_end: int) -> str:
    """The version string the header points at (an offset from 0x200), if it is sane."""
    ptr, = struct.unpack_from("<H", image, KERNEL_VERSION)
    start = 0x200 + ptr
    if ptr == 0 or start >= setup_end:
        return ""
    raw = image[start:min(start + 256, setup_end)]
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def parse_setup_header(image: bytes) -> SetupHeader:
    """Read a bzImage's setup header; raises LoaderError where it cannot be a usable one."""
    if not is_bzimage(image):
        raise _err("not a bzImage (no \"HdrS\" at 0x202)")
    if len(image) < HEADER_END:
        raise _err("bzImage setup header is truncated")
    flag, = struct.unpack_from("<H", image, BOOT_FLAG)
    if flag != 0xAA55:
        raise _err(f"bzImage boot flag is {flag:#06x}, not 0xaa55")
    raw_version, = struct.unpack_from("<H", image, VERSION)
    version = (raw_version >> 8, raw_version & 0xFF)
    if version < MIN_PAYLOAD_VERSION:
        raise _err(f"boot protocol {version[0]}.{version[1]:02d} is older than 2.08: "
                   "its header does not say where the kernel payload is")
    setup_sects = image[SETUP_SECTS] or 4
    setup_end = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, PAYLOAD)
    start = setup_end + offset
    if length == 0 or start + length > len(image):
        raise _err(f"bzImage payload at {start:#x}+{length:#x} is not inside the "
                   f"{len(image):#x}-byte file")
    pref, = struct.unpack_from("<Q", image, PREF_ADDRESS)
    init_size, = struct.unpack_from("<I", image, INIT_SIZE)
    return SetupHeader(version, setup_sects, start, length, pref, init_size,
                       _kernel_version(image, setup_end))


def payload_format(payload: bytes) -> str:
    for magic, name in FORMATS:
        if payload.startswith(magic):
            return name
    return "unknown"


def _check_trailer(rest: bytes, out_len: int, fmt: str) -> None:
    """Linux's size trailer may follow the stream; anything else is not a kernel payload."""
    if not rest:
        return
    if len(rest) == 4 and int.from_bytes(rest, "little") == out_len & 0xFFFFFFFF:
        return
    if len(rest) == 4:
        raise _err(f"{fmt} payload's size trailer says {int.from_bytes(rest, 'little')} bytes, "
                   f"it decompressed to {out_len}")
    raise _err(f"{len(rest)} bytes follow the {fmt} stream in the payload")


def _stream(payload: bytes, fmt: str, limit: int) -> bytes:
    """gzip or xz through Python's zlib / lzma, never past ``limit`` bytes of output."""
    if fmt == "gzip":
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        error = zlib.error
    else:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        error = lzma.LZMAError
    try:
        out = d.decompress(payload, limit + 1)
    except error as exc:
        raise _err(f"{fmt} payload is corrupt: {exc}") from None
    if len(out) > limit:
        raise _err(f"{fmt} payload decompresses to more than {limit} bytes")
    if not d.eof:
        raise _err(f"{fmt} payload is truncated")
    _check_trailer(d.unused_data, len(out), fmt)
    return out


def decompress(payload: bytes, limit: int = MAX_KERNEL_BYTES) -> tuple[str, bytes]:
    """(format, data) of a kernel payload; LoaderError for an unknown or unsupported format
    and for data that does not decode within ``limit`` bytes."""
    fmt = payload_format(payload)
    if fmt == "unknown":
        raise _err(f"bzImage payload has an unknown format (starts {payload[:8].hex(' ')})")
    if fmt not in SUPPORTED:
        raise _err(f"bzImage payload is compressed with {fmt}, which xend-lite does not "
                   f"decompress (it reads LZ4 legacy frames, gzip and xz)")
    if fmt == "none":
        return fmt, payload
    if fmt in ("gzip", "xz"):
        return fmt, _stream(payload, fmt, limit)
    try:
        out, trailer = native.lz4_legacy_decompress(payload, limit)
    except native.DecompressError as exc:
        raise _err(f"bzImage payload: {exc}") from None
    if trailer is not None and trailer != len(out) & 0xFFFFFFFF:
        raise _err(f"lz4 payload's size trailer says {trailer} bytes, it decompressed to {len(out)}")
    return fmt, out


def unpack_kernel(image: bytes, limit: int = MAX_KERNEL_BYTES) -> Kernel:
    """The ELF to load from ``image``: a bzImage's decompressed vmlinux, anything else as it
    is (the ELF loader then judges it)."""
    if not is_bzimage(image):
        return Kernel(image, "elf")
    header = parse_setup_header(image)
    payload = image[header.payload_offset:header.payload_offset + header.payload_length]
    fmt, elf = decompress(payload, limit)
    if not elf.startswith(ELF_MAGIC):
        raise _err(f"bzImage payload ({fmt}) did not decompress to an ELF vmlinux "
                   f"(starts {elf[:8].hex(' ')})")
    return Kernel(elf, "bzimage", fmt, header)
