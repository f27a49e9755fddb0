"""The record bases keep what the dataclasses they replace gave: compared beside a dataclass
with the same fields, so a record that drifts from dataclass behaviour fails here."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from xend_lite.record import Frozen, Record, set_field


class Point(Record):
    __slots__ = ("x", "y")

    def __init__(self, x: int, y: int = 0):
        self.x = x
        self.y = y


class Pair(Frozen):
    __slots__ = ("a", "b")

    def __init__(self, a: int, b: object = None):
        set_field(self, "a", a)
        set_field(self, "b", b)


@dataclasses.dataclass
class DcPoint:
    x: int
    y: int = 0


@dataclasses.dataclass(frozen=True)
class DcPair:
    a: int
    b: object = None


class OtherPair(Frozen):
    __slots__ = ("a", "b")

    def __init__(self, a: int, b: object = None):
        set_field(self, "a", a)
        set_field(self, "b", b)


def test_repr_is_the_dataclass_repr():
    assert repr(Point(1, 2)) == repr(DcPoint(1, 2)).replace("DcPoint", "Point")
    assert repr(Pair(1, "x")) == repr(DcPair(1, "x")).replace("DcPair", "Pair")


def test_equality_by_type_and_fields():
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(1, 3)
    assert Pair(1, 2) == Pair(1, 2) and Pair(1, 2) != Pair(2, 2)
    assert Pair(1, 2) != OtherPair(1, 2)          # same fields, another class
    assert Pair(1, 2) != (1, 2)
    assert (Point(1) == DcPoint(1)) is False


def test_mutable_records_are_unhashable_frozen_ones_hash_by_fields():
    with pytest.raises(TypeError):
        hash(Point(1))
    with pytest.raises(TypeError):
        hash(DcPoint(1))
    assert hash(Pair(1, 2)) == hash(DcPair(1, 2)) == hash((1, 2))
    assert len({Pair(1, 2), Pair(1, 2), Pair(2, 1)}) == 2


def test_frozen_fields_cannot_be_assigned_or_deleted():
    p = Pair(1, 2)
    for act in (lambda: setattr(p, "a", 5), lambda: delattr(p, "a"), lambda: setattr(p, "z", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            act()
    assert p.a == 1
    m = Point(1)
    m.x = 5
    assert m.x == 5
    with pytest.raises(AttributeError):
        m.z = 1  # type: ignore[attr-defined] - slots: no field of that name


def test_replace_as_dataclasses_replace():
    p = Pair(1, [3])
    q = p.replace(a=2)
    assert (q, p) == (Pair(2, [3]), Pair(1, [3])) and q.b is p.b
    assert Point(1, 2).replace(y=5) == Point(1, 5)
    with pytest.raises(TypeError):
        p.replace(c=1)


def test_as_dict_as_dataclasses_asdict():
    inner = Point(1, 2)
    p = Pair(7, [inner, (inner,), {"k": inner}])
    d = DcPair(7, [DcPoint(1, 2), (DcPoint(1, 2),), {"k": DcPoint(1, 2)}])
    assert p.as_dict() == dataclasses.asdict(d)
    assert Point(1, 2).as_dict() == {"x": 1, "y": 2}


def test_copy_and_pickle_keep_the_value():
    p = Pair(1, [2])
    for q in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert q == p and type(q) is Pair
    m = Point(3, 4)
    assert copy.deepcopy(m) == m and pickle.loads(pickle.dumps(m)) == m


def test_match_by_keyword():
    match Pair(1, 2):
        case Pair(a=1, b=b):
            assert b == 2
        case _:
            pytest.fail("no match")
