"""Xen's public ABI as plain Python values: numbers and 64-bit struct layouts, compiled from
libxen-dev's headers (xend_lite.xen._xen). No cffi object leaves this module.

    from xend_lite.xen.xenabi import X, layout
    X.XEN_EINVAL, X.__HYPERVISOR_memory_op
    xatp = layout("xen_add_to_physmap"); xatp.size; xatp.offset("gpfn"); xatp.unpack(buf)
"""

from __future__ import annotations

from functools import cache

from xend_lite.record import Frozen
from xend_lite.record import set_field as _set
from xend_lite.xen._xen import ffi as _ffi
from xend_lite.xen._xen import lib as _lib


class _Constants:
    """Attribute access to every number the builder took from the headers."""

    def __getattr__(self, name: str) -> int:
        try:
            value = getattr(_lib, name)
        except AttributeError:
            raise AttributeError(f"Xen ABI constant {name} is not compiled in") from None
        setattr(self, name, value)
        return value


X = _Constants()


def all_constants(prefix: str) -> dict[str, int]:
    """Every compiled-in number whose name starts with ``prefix``."""
    return {n: getattr(_lib, n) for n in dir(_lib)
            if n.startswith(prefix) and isinstance(getattr(_lib, n), int)}


class Field(Frozen):
    __slots__ = ("name", "offset", "size", "signed", "count")
    name: str
    offset: int
    size: int
    signed: bool
    count: int  # array length (1 for scalars)

    def __init__(self, name: str, offset: int, size: int, signed: bool, count: int = 1):
        _set(self, "name", name)
        _set(self, "offset", offset)
        _set(self, "size", size)
        _set(self, "signed", signed)
        _set(self, "count", count)


class Layout(Frozen):
    """A struct's size and its declared fields' offsets, sizes and signedness."""

    __slots__ = ("name", "size", "fields")
    name: str
    size: int
    fields: dict[str, Field]

    def __init__(self, name: str, size: int, fields: dict[str, Field]):
        _set(self, "name", name)
        _set(self, "size", size)
        _set(self, "fields", fields)

    def offset(self, field: str) -> int:
        return self.fields[field].offset

    def unpack(self, buf: bytes, base: int = 0) -> dict[str, int]:
        """Every scalar field as an int."""
        out = {}
        for f in self.fields.values():
            if f.count == 1 and f.size <= 8:
                out[f.name] = int.from_bytes(buf[base + f.offset:base + f.offset + f.size], "little",
                                             signed=f.signed)
        return out

    def pack(self, values: dict[str, int], into: bytearray | None = None) -> bytearray:
        buf = into if into is not None else bytearray(self.size)
        for name, v in values.items():
            f = self.fields[name]
            buf[f.offset:f.offset + f.size] = int(v).to_bytes(f.size, "little", signed=f.signed)
        return buf


def _field(name: str, cfield) -> Field:
    t = cfield.type
    count = 1
    if t.kind == "array":
        count = t.length
        t = t.item
    if t.kind == "pointer":
        return Field(name, cfield.offset, _ffi.sizeof(t), False, count)
    size = _ffi.sizeof(t)
    signed = t.kind == "primitive" and t.cname in ("int8_t", "int16_t", "int32_t", "int64_t", "int",
                                                    "long", "short", "signed char")
    return Field(name, cfield.offset, size, signed, count)


@cache
def layout(struct: str) -> Layout:
    """The layout of ``struct <name>`` as the 64-bit Xen headers define it."""
    t = _ffi.typeof(f"struct {struct}")
    return Layout(struct, _ffi.sizeof(t), {n: _field(n, f) for n, f in t.fields})


def nested(struct: str, field: str) -> Layout:
    """The layout of a struct-typed field (e.g. shared_info.vcpu_info's element type)."""
    t = _ffi.typeof(f"struct {struct}")
    for n, f in t.fields:
        if n == field:
            ft = f.type.item if f.type.kind == "array" else f.type
            return layout(ft.cname.removeprefix("struct "))
    raise KeyError(field)
