"""Enum-typed integer fields: named values parse to members, reserved ones stay ints."""

from __future__ import annotations

import enum

import pytest
from construct import Int8ul, Int16ul, Struct

from tests.protocol.roundtrip import assert_round_trip
from vfuserver.protocol.fields import IntEnumAdapter, enum_or_int, name_or_number
from vfuserver.protocol.virtio_admin import Opcode, Status
from vfuserver.protocol.virtio_pci import CfgType


@pytest.mark.parametrize(("fmt", "raw", "obj"), [
    pytest.param(Struct("t" / IntEnumAdapter(CfgType, Int8ul)), b"\x02", {"t": CfgType.NOTIFY},
                 id="named"),
    pytest.param(Struct("t" / IntEnumAdapter(CfgType, Int8ul)), b"\x07", {"t": 7},
                 id="reserved"),
    pytest.param(Struct("op" / IntEnumAdapter(Opcode, Int16ul)), b"\x03\x00",
                 {"op": Opcode.LEGACY_COMMON_CFG_READ}, id="le16"),
])
def test_round_trip(fmt: Struct, raw: bytes, obj: dict[str, int]) -> None:
    assert_round_trip(fmt, raw, obj)


def test_reserved_values_parse_to_plain_ints() -> None:
    field = Struct("t" / IntEnumAdapter(CfgType, Int8ul))
    assert field.parse(b"\x02").t is CfgType.NOTIFY
    assert type(field.parse(b"\x07").t) is int
    assert enum_or_int(CfgType, 1) is CfgType.COMMON
    assert type(enum_or_int(CfgType, 0)) is int


@pytest.mark.parametrize(("enum_type", "value", "name"), [
    pytest.param(Opcode, 3, "LEGACY_COMMON_CFG_READ", id="opcode"),
    pytest.param(Opcode, Opcode.LIST_USE, "LIST_USE", id="member"),
    pytest.param(Status, 0, "OK", id="status"),
    pytest.param(Status, 22, "EINVAL", id="errno"),
    pytest.param(Opcode, 0x1234, "4660", id="unnamed-opcode"),
    pytest.param(Status, 5, "5", id="unnamed-status"),
])
def test_name_or_number(enum_type: type[enum.IntEnum], value: int, name: str) -> None:
    assert name_or_number(enum_type, value) == name
