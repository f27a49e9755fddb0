"""The State protocol: how a component declares what it saves.

(Longer than most modules: the protocol, its type checker and the section-name rules are
one contract that every saved component relies on; read together they are the reference.)

A component declares its saved state as a dataclass that subclasses :class:`State`::

    @dataclass
    class OverlayState(State):
        NAME = "xen_overlay"
        VERSION = 2
        MIN_VERSION = 1          # oldest saved version this code still reads
        pages: dict[str, int]
        long_mode: bool = False

        def needed(self) -> bool:            # not written when False
            return bool(self.pages)

        @classmethod
        def upgrade(cls, version, fields):   # bring an older section's fields up to VERSION
            if version < 2:
                fields = fields | {"long_mode": False}
            return fields

Field types: int (magnitude below 2**64), bool, float, str, bytes, None, ``list[T]``,
``tuple[T, ...]``, ``dict[str, T]``, unions (``T | None``), ``Any`` (any of these plain
values) and nested plain dataclasses (not States) made of the same. Values are checked
against these annotations when saving and when loading; a mismatch names the field.

Hooks: the writer calls ``needed()``, then ``pre_save()`` on each state it writes; the reader
calls ``post_load()`` on each decoded state while it validates the file, before anything is
applied, so ``post_load`` may check or derive fields but must not touch a device.

Subclasses with a NAME register themselves, so a reader can map a section name to its class.
A section is named ``NAME`` or ``NAME/INSTANCE`` (``cpu/0``) when one class has several.
Pass ``register=False`` in the class statement for a class that must not register (tests,
alternative versions); readers can be given classes explicitly.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from xend_lite.snapshot import codec
from xend_lite.snapshot.errors import (
    SectionVersionError,
    StateClassError,
    StateDecodeError,
    StateEncodeError,
    UnknownSection,
)

__all__ = [
    "State",
    "state_class",
    "registered_states",
    "section_name",
    "split_section_name",
    "encode_state",
    "decode_state",
]

NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")
INSTANCE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
SEPARATOR = "/"

_REGISTRY: dict[str, type[State]] = {}


class State:
    """Base of every saved state. Subclasses are dataclasses and set NAME and VERSION."""

    NAME: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # dataclass(slots=True) recreates the class without the class keywords: remember.
        if "_snapshot_register" in cls.__dict__:
            register = cls.__dict__["_snapshot_register"]
        else:
            cls._snapshot_register = register
        name = cls.__dict__.get("NAME")
        if not register or not name:
            return
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                       cls.__qualname__):
            raise StateClassError(f"state name {name!r} is already used by "
                                  f"{old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = cls

    def needed(self) -> bool:
        """Whether this state is written at all. Override to omit empty optional state."""
        return True

    def pre_save(self) -> None:
        """Called just before the state is encoded. Override to refresh derived fields."""

    def post_load(self) -> None:
        """Called after decoding, while the file is validated. Override to check fields."""

    @classmethod
    def upgrade(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Turn the raw fields of a section saved at ``version`` (MIN_VERSION <= version <
        VERSION) into fields of VERSION. The default keeps them as they are."""
        return fields


def registered_states() -> dict[str, type[State]]:
    """A copy of the registry: NAME -> State class."""
    return dict(_REGISTRY)


def state_class(section: str) -> type[State]:
    """The registered class for a section name (``NAME`` or ``NAME/INSTANCE``)."""
    base, _ = split_section_name(section)
    try:
        return _REGISTRY[base]
    except KeyError:
        raise UnknownSection(f"section {section!r}: no state class is registered for "
                             f"{base!r}", section) from None


def section_name(cls: type[State] | State, instance: str | int | None = None) -> str:
    """The section name for a class (and optional instance id)."""
    name = cls.NAME
    if instance is None:
        return name
    inst = str(instance)
    if not INSTANCE_RE.match(inst):
        raise StateClassError(f"instance id {inst!r} of {name!r} is not [A-Za-z0-9_.-]{{1,64}}")
    return f"{name}{SEPARATOR}{inst}"


def split_section_name(section: str) -> tuple[str, str | None]:
    """``"cpu/0"`` -> ``("cpu", "0")``; ``"clock"`` -> ``("clock", None)``."""
    base, sep, inst = section.partition(SEPARATOR)
    if not NAME_RE.match(base) or (sep and not INSTANCE_RE.match(inst)):
        raise StateClassError(f"{section!r} is not a valid section name")
    return base, (inst if sep else None)


# -- schemas: per-type checkers built once per class ---------------------------------------

ToWire = Callable[[Any, str], Any]
FromWire = Callable[[Any, str], Any]


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    to_wire: ToWire
    from_wire: FromWire
    has_default: bool


@dataclasses.dataclass(frozen=True)
class _Schema:
    fields: tuple[_Field, ...]
    by_name: dict[str, _Field]


_SCHEMAS: dict[type, _Schema] = {}
_SCALARS: dict[Any, tuple[type, ...]] = {
    int: (int,), bool: (bool,), float: (float,), str: (str,),
    bytes: (bytes, bytearray, memoryview), type(None): (type(None),), None: (type(None),),
}


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _bad(exc: type[Exception], path: str, v: Any, want: str) -> Exception:
    return exc(f"{path}: expected {want}, found {type(v).__name__}", path)


def _sequence(kind: type, item_to: ToWire, item_from: FromWire) -> tuple[ToWire, FromWire]:
    """Converters for list[T] or tuple[T, ...]: a list on the wire either way."""

    def to_wire(v: Any, path: str) -> Any:
        if type(v) is not kind:
            raise _bad(StateEncodeError, path, v, kind.__name__)
        return [item_to(x, f"{path}[{i}]") for i, x in enumerate(v)]

    def from_wire(v: Any, path: str) -> Any:
        if type(v) is not list:
            raise _bad(StateDecodeError, path, v, "list")
        items = [item_from(x, f"{path}[{i}]") for i, x in enumerate(v)]
        return items if kind is list else kind(items)

    return to_wire, from_wire


def _compile(tp: Any, where: str, seen: tuple[type, ...] = ()) -> tuple[ToWire, FromWire]:
    """Build (to_wire, from_wire) for an annotation; both raise on a mismatch."""
    if tp is Any:
        def any_to(v: Any, path: str) -> Any:
            return v  # the codec checks plain values itself

        def any_from(v: Any, path: str) -> Any:
            return v

        return any_to, any_from

    try:
        scalar = tp in _SCALARS
    except TypeError:  # an unhashable annotation is no type we know
        raise StateClassError(f"{where}: {tp!r} is not a type") from None
    if scalar:
        out_types = _SCALARS[tp]
        in_type = out_types[0]
        want = "None" if in_type is type(None) else in_type.__name__

        def sc_to(v: Any, path: str) -> Any:
            if type(v) not in out_types:
                raise _bad(StateEncodeError, path, v, want)
            return v

        def sc_from(v: Any, path: str) -> Any:
            if type(v) is not in_type:
                raise _bad(StateDecodeError, path, v, want)
            return v

        return sc_to, sc_from

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is list or origin is list:
        return _sequence(list, *_compile(args[0] if args else Any, where, seen))

    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise StateClassError(f"{where}: only tuple[T, ...] is supported, not {tp}")
        return _sequence(tuple, *_compile(args[0], where, seen))

    if tp is dict or origin is dict:
        if args and args[0] is not str:
            raise StateClassError(f"{where}: dict keys must be str, not {_tname(args[0])}")
        val_to, val_from = _compile(args[1] if args else Any, where, seen)

        def dict_to(v: Any, path: str) -> Any:
            if type(v) is not dict:
                raise _bad(StateEncodeError, path, v, "dict")
            out = {}
            for k, x in v.items():
                if type(k) is not str:
                    raise StateEncodeError(f"{path}: key {k!r} is not a str", path)
                out[k] = val_to(x, f"{path}[{k!r}]")
            return out

        def dict_from(v: Any, path: str) -> Any:
            if type(v) is not dict:
                raise _bad(StateDecodeError, path, v, "dict")
            return {k: val_from(x, f"{path}[{k!r}]") for k, x in v.items()}

        return dict_to, dict_from

    if origin is typing.Union or origin is types.UnionType:
        members = [_compile(a, where, seen) for a in args]
        want = " | ".join(_tname(a) for a in args)

        def union_to(v: Any, path: str) -> Any:
            for to, _ in members:
                try:
                    return to(v, path)
                except StateEncodeError:
                    continue
            raise _bad(StateEncodeError, path, v, want)

        def union_from(v: Any, path: str) -> Any:
            for _, frm in members:
                try:
                    return frm(v, path)
                except StateDecodeError:
                    continue
            raise _bad(StateDecodeError, path, v, want)

        return union_to, union_from

    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if issubclass(tp, State):
            raise StateClassError(f"{where}: a State cannot be nested in another State")
        if tp in seen:
            raise StateClassError(f"{where}: dataclass {tp.__name__} contains itself")
        schema = _build_schema(tp, seen + (tp,))

        def dc_to(v: Any, path: str) -> Any:
            if type(v) is not tp:
                raise _bad(StateEncodeError, path, v, tp.__name__)
            return _fields_to_wire(schema, v, path)

        def dc_from(v: Any, path: str) -> Any:
            if type(v) is not dict:
                raise _bad(StateDecodeError, path, v, f"{tp.__name__} (a dict)")
            return _construct(tp, _fields_from_wire(schema, v, path), path)

        return dc_to, dc_from

    raise StateClassError(f"{where}: type {tp!r} cannot be saved")


def _build_schema(cls: type, seen: tuple[type, ...] = ()) -> _Schema:
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    if not dataclasses.is_dataclass(cls):
        raise StateClassError(f"{cls.__qualname__} must be a dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as err:  # a bad forward reference is a class-definition fault
        raise StateClassError(f"{cls.__qualname__}: cannot resolve field types: {err}") from err
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            raise StateClassError(f"{cls.__qualname__}.{f.name}: saved fields must be init fields")
        to, frm = _compile(hints[f.name], f"{cls.__qualname__}.{f.name}", seen)
        has_default = (f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING)
        fields.append(_Field(f.name, to, frm, has_default))
    schema = _Schema(tuple(fields), {f.name: f for f in fields})
    _SCHEMAS[cls] = schema
    return schema


def _fields_to_wire(schema: _Schema, obj: Any, path: str) -> dict[str, Any]:
    return {f.name: f.to_wire(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
            for f in schema.fields}


def _fields_from_wire(schema: _Schema, raw: dict[str, Any], path: str) -> dict[str, Any]:
    out = {}
    for k in raw:
        if k not in schema.by_name:
            p = f"{path}.{k}" if path else k
            raise StateDecodeError(f"{p}: no such field", p)
    for f in schema.fields:
        p = f"{path}.{f.name}" if path else f.name
        if f.name in raw:
            out[f.name] = f.from_wire(raw[f.name], p)
        elif not f.has_default:
            raise StateDecodeError(f"{p}: field is missing", p)
    return out


def _construct(cls: type, kwargs: dict[str, Any], path: str) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise StateDecodeError(f"{path or cls.__qualname__}: rejected: {err}", path) from err


def check_state_class(cls: type[State]) -> None:
    """Raise StateClassError unless ``cls`` is a well-formed State class."""
    if not (isinstance(cls, type) and issubclass(cls, State)):
        raise StateClassError(f"{cls!r} is not a State class")
    if not isinstance(cls.NAME, str) or not NAME_RE.match(cls.NAME):
        raise StateClassError(f"{cls.__qualname__}.NAME {cls.NAME!r} is not [a-z][a-z0-9_.-]*")
    v, mv = cls.VERSION, cls.MIN_VERSION
    if type(v) is not int or type(mv) is not int or not 1 <= mv <= v < (1 << 32):
        raise StateClassError(f"{cls.__qualname__}: need 1 <= MIN_VERSION ({mv!r}) <= "
                              f"VERSION ({v!r}) < 2**32")
    if not dataclasses.is_dataclass(cls):
        raise StateClassError(f"{cls.__qualname__} must be a dataclass")
    for f in dataclasses.fields(cls):
        if f.name in ("NAME", "VERSION", "MIN_VERSION"):
            raise StateClassError(f"{cls.__qualname__}.{f.name} must be a class constant "
                                  "(no annotation), not a saved field")
    _build_schema(cls)


def encode_state(state: State) -> bytes:
    """Check a state against its declared types and encode its fields."""
    cls = type(state)
    check_state_class(cls)
    try:
        raw = _fields_to_wire(_build_schema(cls), state, "")
    except StateEncodeError as err:
        raise StateEncodeError(f"state {cls.NAME!r}: {err}", err.field) from None
    try:
        return codec.encode(raw)
    except codec.CodecError as err:
        raise StateEncodeError(f"state {cls.NAME!r}: {err}", err.path) from None


def decode_state(cls: type[State], section: str, version: int, payload: bytes) -> State:
    """Decode one section saved at ``version`` into ``cls``; upgrade older versions; run
    post_load. Every fault raises a SnapshotError subclass naming the section (and field)."""
    check_state_class(cls)
    if not cls.MIN_VERSION <= version <= cls.VERSION:
        what = "newer than" if version > cls.VERSION else "older than"
        raise SectionVersionError(
            f"section {section!r} was saved at version {version}, {what} this code reads "
            f"(versions {cls.MIN_VERSION}..{cls.VERSION})",
            section, version, cls.MIN_VERSION, cls.VERSION)
    try:
        raw = codec.decode(payload)
    except codec.CodecError as err:
        raise StateDecodeError(f"section {section!r}: {err}", err.path) from None
    if type(raw) is not dict:
        raise StateDecodeError(f"section {section!r}: expected a dict of fields, found "
                               f"{type(raw).__name__}")
    if version < cls.VERSION:
        try:
            raw = cls.upgrade(version, raw)
        except (KeyError, TypeError, ValueError) as err:
            raise StateDecodeError(f"section {section!r}: upgrade from version {version} "
                                   f"failed: {err!r}") from err
        if type(raw) is not dict:
            raise StateClassError(f"{cls.__qualname__}.upgrade must return a dict")
    try:
        fields = _fields_from_wire(_build_schema(cls), raw, "")
    except StateDecodeError as err:
        raise StateDecodeError(f"section {section!r}: {err}", err.field) from None
    state = _construct(cls, fields, "")
    try:
        state.post_load()
    except (TypeError, ValueError) as err:
        raise StateDecodeError(f"section {section!r}: post_load rejected the state: {err}") \
            from err
    return state
