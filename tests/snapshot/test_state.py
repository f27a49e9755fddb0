"""The State protocol: declarations checked, values checked against their types with the
field named, versions and upgrades, hooks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from xend_lite.snapshot import (
    SectionVersionError,
    State,
    StateClassError,
    StateDecodeError,
    StateEncodeError,
    UnknownSection,
    codec,
    registered_states,
    section_name,
)
from xend_lite.snapshot.state import (
    check_state_class,
    decode_state,
    encode_state,
    split_section_name,
    state_class,
)

from .helpers import CpuState, Regs, sample_states


class NotData:
    pass


@dataclass
class BadSet(State, register=False):
    NAME = "bad"
    x: set[int]


@dataclass
class BadDictKey(State, register=False):
    NAME = "bad"
    x: dict[int, str]


@dataclass
class BadTuple(State, register=False):
    NAME = "bad"
    x: tuple[int, str]


@dataclass
class BadClass(State, register=False):
    NAME = "bad"
    x: NotData


@dataclass
class BadNested(State, register=False):
    NAME = "bad"
    x: CpuState


@dataclass
class BadNameField(State, register=False):
    NAME: str = "bad"
    x: int = 0


@dataclass
class BadName(State, register=False):
    NAME = "Bad Name"


@dataclass
class BadVersions(State, register=False):
    NAME = "bad"
    VERSION = 2
    MIN_VERSION = 3


@dataclass
class BadInitField(State, register=False):
    NAME = "bad"
    x: int = field(default=0, init=False)


class NotADataclass(State, register=False):
    NAME = "bad"


@pytest.mark.parametrize("cls,words", [
    (BadSet, "cannot be saved"),
    (BadDictKey, "keys must be str"),
    (BadTuple, r"tuple\[T, \.\.\.\]"),
    (BadClass, "cannot be saved"),
    (BadNested, "cannot be nested"),
    (BadNameField, "class constant"),
    (BadName, "NAME"),
    (BadVersions, "MIN_VERSION"),
    (BadInitField, "init fields"),
    (NotADataclass, "dataclass"),
])
def test_bad_declarations_refused(cls, words):
    with pytest.raises(StateClassError, match=words):
        check_state_class(cls)


def test_good_declaration_accepted():
    check_state_class(CpuState)


def roundtrip(state: State, cls: type[State] | None = None) -> State:
    cls = cls or type(state)
    return decode_state(cls, cls.NAME, cls.VERSION, encode_state(state))


def test_state_round_trip_keeps_types():
    for st in sample_states(3).values():
        out = roundtrip(st)
        assert out == st
    out = roundtrip(sample_states(1)["tcpu/0"])
    assert type(out.cr) is tuple and type(out.regs) is Regs


@pytest.mark.parametrize("mutate,path,found", [
    (lambda s: setattr(s.regs, "rax", "1"), "regs.rax", "str"),
    (lambda s: setattr(s.regs, "rax", True), "regs.rax", "bool"),
    (lambda s: s.regs.flags.append(1), "regs.flags[2]", "int"),
    (lambda s: s.msrs.__setitem__("efer", 1.0), "msrs['efer']", "float"),
    (lambda s: setattr(s, "cr", [1]), "cr", "list"),
    (lambda s: setattr(s, "name", 5), "name", "int"),
    (lambda s: setattr(s, "regs", {"rax": 1}), "regs", "dict"),
    (lambda s: setattr(s, "ratio", 1), "ratio", "int"),
])
def test_encode_type_mismatch_names_the_field(mutate, path, found):
    st = sample_states()["tcpu/0"]
    mutate(st)
    with pytest.raises(StateEncodeError) as ei:
        encode_state(st)
    assert ei.value.field == path
    assert path in str(ei.value) and found in str(ei.value) and "tcpu" in str(ei.value)


def test_encode_out_of_range_int_names_the_field():
    st = sample_states()["tcpu/0"]
    st.regs.rip = 2**64
    with pytest.raises(StateEncodeError) as ei:
        encode_state(st)
    assert ei.value.field == "regs.rip"
    st = sample_states()["tcpu/0"]
    st.extra = {"q": object()}
    with pytest.raises(StateEncodeError) as ei:
        encode_state(st)
    assert ei.value.field == "extra.q"


def wire(state: State) -> dict[str, Any]:
    return codec.decode(encode_state(state))


@pytest.mark.parametrize("edit,path,words", [
    (lambda w: w["regs"].__setitem__("rax", "x"), "regs.rax", "expected int"),
    (lambda w: w["regs"]["flags"].__setitem__(1, 0), "regs.flags[1]", "expected bool"),
    (lambda w: w.__setitem__("cr", [1, None]), "cr[1]", "expected int"),
    (lambda w: w.pop("regs"), "regs", "missing"),
    (lambda w: w.__setitem__("bogus", 1), "bogus", "no such field"),
    (lambda w: w["regs"].__setitem__("bogus", 1), "regs.bogus", "no such field"),
    (lambda w: w.__setitem__("name", 3), "name", "str | NoneType"),
])
def test_decode_type_mismatch_names_the_field(edit, path, words):
    w = wire(sample_states()["tcpu/0"])
    edit(w)
    with pytest.raises(StateDecodeError) as ei:
        decode_state(CpuState, "tcpu/0", 1, codec.encode(w))
    assert ei.value.field == path
    assert words in str(ei.value) and "'tcpu/0'" in str(ei.value)


def test_decode_defaults_fill_missing_optional_fields():
    w = wire(sample_states()["tcpu/0"])
    del w["msrs"], w["extra"]
    out = decode_state(CpuState, "tcpu/0", 1, codec.encode(w))
    assert out.msrs == {} and out.extra is None


def test_decode_garbage_payload():
    with pytest.raises(StateDecodeError, match="'tcpu/0'"):
        decode_state(CpuState, "tcpu/0", 1, b"\x09\x05")
    with pytest.raises(StateDecodeError, match="dict of fields"):
        decode_state(CpuState, "tcpu/0", 1, codec.encode([1]))


# -- versions -------------------------------------------------------------------------------

@dataclass
class OverlayV1(State, register=False):
    NAME = "toverlay"
    VERSION = 1
    pages: dict[str, int] = field(default_factory=dict)


@dataclass
class OverlayV3(State, register=False):
    NAME = "toverlay"
    VERSION = 3
    MIN_VERSION = 1
    pages: dict[str, int] = field(default_factory=dict)
    long_mode: bool = False
    count: int = 0

    @classmethod
    def upgrade(cls, version, fields):
        if version < 2:
            fields = fields | {"long_mode": True}
        if version < 3:
            fields = fields | {"count": len(fields["pages"])}
        return fields


@dataclass
class OverlayV4Only(State, register=False):
    NAME = "toverlay"
    VERSION = 4
    MIN_VERSION = 4
    pages: dict[str, int] = field(default_factory=dict)


def test_upgrade_from_older_version():
    blob = encode_state(OverlayV1({"shared_info": 5, "grant": 7}))
    out = decode_state(OverlayV3, "toverlay", 1, blob)
    assert out == OverlayV3({"shared_info": 5, "grant": 7}, long_mode=True, count=2)


def test_upgrade_failure_is_a_decode_error():
    blob = codec.encode({"nopages": 1})
    with pytest.raises(StateDecodeError, match="upgrade from version 1"):
        decode_state(OverlayV3, "toverlay", 1, blob)


def test_version_newer_and_older_refused():
    blob = encode_state(OverlayV3())
    with pytest.raises(SectionVersionError, match="newer") as ei:
        decode_state(OverlayV1, "toverlay", 3, blob)
    assert (ei.value.version, ei.value.max_version) == (3, 1)
    with pytest.raises(SectionVersionError, match="older") as ei:
        decode_state(OverlayV4Only, "toverlay", 3, blob)
    assert (ei.value.version, ei.value.min_version) == (3, 4)


# -- hooks ----------------------------------------------------------------------------------

@dataclass
class Hooked(State, register=False):
    NAME = "thooked"
    items: list[int] = field(default_factory=list)
    total: int = 0

    def pre_save(self):
        self.total = sum(self.items)

    def post_load(self):
        if self.total != sum(self.items):
            raise ValueError("total does not match items")


def test_post_load_can_refuse():
    blob = codec.encode({"items": [1, 2], "total": 4})
    with pytest.raises(StateDecodeError, match="post_load rejected"):
        decode_state(Hooked, "thooked", 1, blob)


def test_post_init_refusal_is_a_decode_error():
    @dataclass
    class Checked(State, register=False):
        NAME = "tchecked"
        n: int = 0

        def __post_init__(self):
            if self.n < 0:
                raise ValueError("negative")

    with pytest.raises(StateDecodeError, match="negative"):
        decode_state(Checked, "tchecked", 1, codec.encode({"n": -1}))


# -- names and registry ---------------------------------------------------------------------

def test_section_names():
    assert section_name(CpuState, 3) == "tcpu/3"
    assert split_section_name("tcpu/3") == ("tcpu", "3")
    assert split_section_name("tclock") == ("tclock", None)
    for bad in ("", "Tcpu", "tcpu/", "tcpu/a b", "tcpu/1/2", "x" * 65):
        with pytest.raises(StateClassError):
            split_section_name(bad)
    with pytest.raises(StateClassError):
        section_name(CpuState, "a/b")


@dataclass
class RegisteredForTest(State):
    NAME = "ttest_registered"
    n: int = 0


def test_registry():
    assert registered_states()["ttest_registered"] is RegisteredForTest
    assert state_class("ttest_registered/7") is RegisteredForTest
    assert "tcpu" not in registered_states()  # register=False
    with pytest.raises(UnknownSection):
        state_class("tnothing")


def test_registry_refuses_a_second_class_with_the_same_name():
    with pytest.raises(StateClassError, match="already used"):
        class Other(State):
            NAME = "ttest_registered"


def test_slots_dataclass_keeps_register_false():
    @dataclasses.dataclass(slots=True)
    class Slotted(State, register=False):
        NAME = "tslotted"

    assert "tslotted" not in registered_states()


def test_optional_spelling():
    @dataclass
    class Opt(State, register=False):
        NAME = "topt"
        a: Optional[int] = None

    assert roundtrip(Opt(5)) == Opt(5)
    assert roundtrip(Opt()) == Opt()
