"""Construct field helpers the format modules share: enum-typed integer fields.

Guest-supplied fields can hold reserved values; they must parse (to a plain int) so that
the device can answer them, e.g. with an invalid-opcode status, instead of crashing.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

from construct import Adapter

_E = TypeVar("_E", bound=enum.IntEnum)


def enum_or_int(enum_type: type[_E], value: int) -> _E | int:
    """``enum_type(value)`` when the value is named, else the plain int."""
    try:
        return enum_type(value)
    except ValueError:
        return value


def name_or_number(enum_type: type[enum.IntEnum], value: int) -> str:
    """The member's name when ``value`` is named (``LEGACY_COMMON_CFG_READ``), else the
    number in decimal: how counters and messages show a field a peer may fill freely."""
    member = enum_or_int(enum_type, value)
    return member.name if isinstance(member, enum_type) else str(int(value))


class IntEnumAdapter(Adapter):  # type: ignore[misc]  # construct is untyped
    """An integer field decoded to an IntEnum member, or to a plain int if it is not named."""

    def __init__(self, enum_type: type[enum.IntEnum], subcon: Any) -> None:
        super().__init__(subcon)
        self.enum_type = enum_type

    def _decode(self, obj: int, context: Any, path: str) -> int:
        return enum_or_int(self.enum_type, obj)

    def _encode(self, obj: int, context: Any, path: str) -> int:
        return int(obj)
