"""Control-method parameters: each method names its parameters with a check, and one binder
turns a request's params into keyword arguments or a ParamError naming the bad one."""

from __future__ import annotations

from typing import Any, Callable

from xend_lite.record import Frozen
from xend_lite.record import set_field as _set

U64_MAX = (1 << 64) - 1


class ParamError(Exception):
    """A parameter is missing, unknown or of the wrong type or range."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


def u64(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= U64_MAX:
        raise ValueError("must be an integer in 0..2^64-1")
    return v


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise ValueError(f"must be an integer in {lo}..{hi}")
        return v
    return check


def string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    if "\0" in v:
        raise ValueError("must not contain NUL")
    return v


def boolean(v: Any) -> bool:
    if type(v) is not bool:
        raise ValueError("must be true or false")
    return v


class Param(Frozen):
    __slots__ = ("name", "check", "required", "default")
    name: str
    check: Callable[[Any], Any]
    required: bool
    default: Any

    def __init__(self, name: str, check: Callable[[Any], Any], required: bool = True,
                 default: Any = None):
        _set(self, "name", name)
        _set(self, "check", check)
        _set(self, "required", required)
        _set(self, "default", default)


def opt(name: str, check: Callable[[Any], Any], default: Any) -> Param:
    return Param(name, check, required=False, default=default)


def bind_params(params: tuple[Param, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    if args:
        raise ParamError(None, "params must be an object of named parameters")
    known = {p.name for p in params}
    for name in kwargs:
        if name not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise ParamError(name, f"unknown parameter '{name}' (expected: {expected})")
    out = {}
    for p in params:
        if p.name not in kwargs:
            if p.required:
                raise ParamError(p.name, f"missing parameter '{p.name}'")
            out[p.name] = p.default
            continue
        try:
            out[p.name] = p.check(kwargs[p.name])
        except (TypeError, ValueError) as exc:
            raise ParamError(p.name, f"'{p.name}' {exc}") from None
    return out
