"""Small value classes written out by hand, for the modules a daemon loads before it is ready.

A @dataclass compiles its methods (``__init__``, ``__repr__``, ``__eq__``, and for a frozen
one ``__hash__``, ``__setattr__``, ``__delattr__``) when its module is imported: 0.3 to 0.9 ms
a class in a fresh process, and some fifty of them lay on the daemon's path to READY=1,
about 25 ms of every start. A class on that path instead names its fields in ``__slots__``
(in order) and writes its ``__init__`` out, one assignment a field (``set_field(self, name,
value)`` in a frozen one), as fast as the generated one; the bases give it what the
dataclass gave:

- :class:`Record`, mutable: ``==`` by type and fields, unhashable (as a dataclass with eq),
  the dataclass repr (``Name(a=1, b=2)``);
- :class:`Frozen`: the same, hashed by its fields, and assigning or deleting a field raises
  ``dataclasses.FrozenInstanceError``;
- both: ``replace(**changes)`` (as ``dataclasses.replace``) and ``as_dict()`` (as
  ``dataclasses.asdict``: records inside, directly or in lists, tuples and dicts, become
  dicts too).

Fields are this class's ``__slots__`` only: a record does not inherit another's fields.
Saved states (snapshot.State) stay dataclasses: they are loaded when saving or loading.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Any

__all__ = ["Frozen", "Record", "set_field"]

#: how a frozen record's ``__init__`` sets a field
set_field = object.__setattr__


class Record:
    """A mutable value: subclasses set ``__slots__`` to their fields and write ``__init__``."""

    __slots__: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment] - equal by value and mutable: unhashable

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({shown})"

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``, made through ``__init__`` (its checks run again)."""
        unknown = set(changes) - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        return type(self)(**{name: changes.get(name, getattr(self, name))
                             for name in self.__slots__})

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, records inside made dicts too."""
        return {name: _plain(getattr(self, name)) for name in self.__slots__}


class Frozen(Record):
    """An immutable value: hashable, and its fields cannot be assigned once made."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self._values())

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __getstate__(self) -> tuple:
        return self._values()

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(self.__slots__, state):
            set_field(self, name, value)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.as_dict()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_plain(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return type(value)((_plain(k), _plain(v)) for k, v in value.items())
    return value
