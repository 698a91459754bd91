"""Virtio group administration commands (the admin virtqueue wire format).

Sources: virtio spec admin.tex ("Device groups", "Group administration commands",
"Administration Virtqueues"), admin-cmds-legacy-interface.tex, admin-cmds-capabilities.tex,
admin-cmds-resource-objects.tex; Linux include/uapi/linux/virtio_pci.h (struct
virtio_admin_cmd_*), drivers/virtio/virtio_pci_modern.c and virtio_pci_admin_legacy_io.c.

A command is one buffer in two parts. Device-readable: a 24-byte header (opcode,
group_type, reserved1[12], group_member_id) then command-specific data. Device-writable: an
8-byte status (status, status_qualifier, reserved2[4]) then the command-specific result.

Buffer lengths are lenient by rule: a device "MUST NOT fail a command solely because the
buffers provided are shorter or longer" -- it reads missing bytes as zero and ignores extra
ones -- so the ``parse_*`` helpers zero-extend and truncate instead of raising. The one
thing that is malformed is an empty device-readable part (drivers MUST supply parts longer
than zero); that raises :class:`AdminFormatError`, which carries the status to answer with.

The ``parse_*`` / ``build_*`` helpers use precomputed :class:`struct.Struct` objects (the hot
path: one admin command per legacy register access); the construct Structs are the
declarative definition they are tested against.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple, TypeAlias

from construct import GreedyBytes, GreedyRange, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from vfuserver.protocol.fields import IntEnumAdapter, enum_or_int

# --------------------------------------------------------------------------------------
# Constants


class Opcode(enum.IntEnum):
    """Admin command opcodes (VIRTIO_ADMIN_CMD_*).

    0x0013..0x7FFF are future commands with the same header, 0x8000..0xFFFF are reserved
    (possibly with a different structure).
    """

    LIST_QUERY = 0x0000
    LIST_USE = 0x0001
    LEGACY_COMMON_CFG_WRITE = 0x0002
    LEGACY_COMMON_CFG_READ = 0x0003
    LEGACY_DEV_CFG_WRITE = 0x0004
    LEGACY_DEV_CFG_READ = 0x0005
    LEGACY_NOTIFY_INFO = 0x0006
    CAP_ID_LIST_QUERY = 0x0007
    DEVICE_CAP_GET = 0x0008
    DRIVER_CAP_SET = 0x0009
    RESOURCE_OBJ_CREATE = 0x000A
    # The spec contradicts itself on 0xb/0xc: the opcode table in admin.tex lists
    # RESOURCE_OBJ_QUERY = 0x0b and RESOURCE_OBJ_MODIFY = 0x0c, while the command paragraphs
    # in admin-cmds-resource-objects.tex say "opcode is set to 0xb" for MODIFY and 0xc for
    # QUERY. The paragraphs are followed here; Linux defines neither.
    RESOURCE_OBJ_MODIFY = 0x000B
    RESOURCE_OBJ_QUERY = 0x000C
    RESOURCE_OBJ_DESTROY = 0x000D
    DEV_PARTS_METADATA_GET = 0x000E
    DEV_PARTS_GET = 0x000F
    DEV_PARTS_SET = 0x0010
    DEV_MODE_SET = 0x0011


OPCODE_LIMIT = 0x8000
"""Opcodes at or above this are reserved and may use a different command structure."""
LIST_OPCODES = frozenset({Opcode.LIST_QUERY, Opcode.LIST_USE})
"""What the device assumes is in use after reset, before any LIST_USE."""
LEGACY_OPCODES = frozenset(
    {
        Opcode.LEGACY_COMMON_CFG_WRITE,
        Opcode.LEGACY_COMMON_CFG_READ,
        Opcode.LEGACY_DEV_CFG_WRITE,
        Opcode.LEGACY_DEV_CFG_READ,
        Opcode.LEGACY_NOTIFY_INFO,
    }
)
"""Linux VIRTIO_LEGACY_ADMIN_CMD_BITMAP (0x7c): all required by virtio_pci_admin_has_legacy_io."""
DEV_PARTS_OPCODES = frozenset(
    {
        Opcode.CAP_ID_LIST_QUERY,
        Opcode.DEVICE_CAP_GET,
        Opcode.DRIVER_CAP_SET,
        Opcode.RESOURCE_OBJ_CREATE,
        Opcode.RESOURCE_OBJ_DESTROY,
        Opcode.DEV_PARTS_METADATA_GET,
        Opcode.DEV_PARTS_GET,
        Opcode.DEV_PARTS_SET,
        Opcode.DEV_MODE_SET,
    }
)
"""Linux VIRTIO_DEV_PARTS_ADMIN_CMD_BITMAP (0x3e780), used for live migration."""


class GroupType(enum.IntEnum):
    """``group_type`` values; 2..0xFFFF are reserved."""

    SELF = 0
    """The owner device itself (virtio 1.4); member id 0. Capability commands use it."""
    SRIOV = 1
    """SR-IOV PF owns its VFs; member id = VF number 1..NumVFs."""


class Status(enum.IntEnum):
    """``status`` values, equal to Linux errno numbers (admin.tex). Drivers treat unknown
    values like EINVAL."""

    OK = 0
    ENXIO = 6
    """No such capability or resource object."""
    EAGAIN = 11
    """Try again; the command had no side effects."""
    ENOMEM = 12
    """Insufficient resources (also: result buffer too small); no side effects."""
    EBUSY = 16
    EEXIST = 17
    """Resource object id already in use (named in the text, not in the status table)."""
    EINVAL = 22
    ENOSPC = 28


class StatusQualifier(enum.IntEnum):
    """``status_qualifier`` values (VIRTIO_ADMIN_STATUS_Q_*); 0 whenever status is OK."""

    OK = 0x00
    INVALID_COMMAND = 0x01
    INVALID_OPCODE = 0x02
    INVALID_FIELD = 0x03
    INVALID_GROUP = 0x04
    INVALID_MEMBER = 0x05
    NORESOURCE = 0x06
    TRYAGAIN = 0x07


class NotifyInfoFlags(enum.IntEnum):
    """``flags`` of a LEGACY_NOTIFY_INFO entry; other values are reserved (skip the entry)."""

    END = 0x0
    """End of list: this and all later entries are invalid."""
    OWNER_DEVICE = 0x1
    """A BAR of the owner (PF). Linux: VIRTIO_ADMIN_CMD_NOTIFY_INFO_FLAGS_OWNER_DEV."""
    MEMBER_DEVICE = 0x2
    """A VF BAR of the SR-IOV capability. Linux (misleadingly): ..._FLAGS_OWNER_MEM."""


class AdminCapId(enum.IntEnum):
    """Admin capability ids (admin-cmds-capabilities.tex); 0x0800..0x0FFF are per type."""

    DEV_PARTS = 0x0000
    """VIRTIO_DEV_PARTS_CAP: device parts resource object limits."""


class ResourceObjectType(enum.IntEnum):
    """Resource object types; 0x200..0x4FF are device-type specific."""

    DEV_PARTS = 0x000


class DevPartsObjectType(enum.IntEnum):
    """``type`` of a device-parts resource object (what it is created for)."""

    GET = 0
    SET = 1


# --------------------------------------------------------------------------------------
# Declarative formats

BITMAP_MAX_WORDS = 0x10000 // 64
"""le64 words needed for every 16-bit opcode or capability id."""
CMD_HEADER_SIZE = 24
CMD_STATUS_SIZE = 8
LEGACY_CFG_WRITE_HEADER_SIZE = 8
NOTIFY_INFO_ENTRY_SIZE = 16
NOTIFY_INFO_ENTRIES = 4

AdminCmdHeader = Struct(
    "opcode" / IntEnumAdapter(Opcode, Int16ul) * "the command",
    "group_type" / IntEnumAdapter(GroupType, Int16ul) * "which group of the owner",
    Padding(12) * "reserved1: zero from the driver, ignored by the device",
    "group_member_id" / Int64ul * "member within the group; SR-IOV: VF number",
)
"""The device-readable header of struct virtio_admin_cmd (24 bytes)."""

AdminCmdStatus = Struct(
    "status" / IntEnumAdapter(Status, Int16ul) * "errno-style result",
    "status_qualifier" / IntEnumAdapter(StatusQualifier, Int16ul) * "virtio-level detail",
    Padding(4) * "reserved2",
)
"""The device-writable head of struct virtio_admin_cmd (8 bytes)."""

AdminCmdList = Struct(
    "device_admin_cmd_opcodes" / GreedyRange(Int64ul) * "bit n of word n // 64: opcode n",
)
"""struct virtio_admin_cmd_list: LIST_QUERY result and LIST_USE data (also the format of the
CAP_ID_LIST_QUERY result, with capability ids for opcodes)."""

LegacyCfgWriteData = Struct(
    "offset" / Int8ul * "byte offset in the legacy common header or device config",
    Padding(7) * "reserved",
    "data" / GreedyBytes * "little-endian value; its length is the write width",
)
"""virtio_admin_cmd_legacy_{common_cfg,dev_reg}_wr_data (LEGACY_*_CFG_WRITE)."""

LegacyCfgReadData = Struct(
    "offset" / Int8ul * "byte offset; the read width is the result buffer length",
)
"""virtio_admin_cmd_legacy_{common,dev}_cfg_rd_data (LEGACY_*_CFG_READ)."""

LegacyNotifyInfo = Struct(
    "flags" / IntEnumAdapter(NotifyInfoFlags, Int8ul) * "end / owner BAR / member (VF) BAR",
    "bar" / Int8ul * "BAR 1..5 of the owner or VF BARn of the SR-IOV capability",
    Padding(6),
    "offset" / Int64ul * "2-byte aligned notification address within that BAR",
)
"""struct virtio_pci_legacy_notify_info (16 bytes)."""

LegacyNotifyInfoResult = Struct(
    "entries" / LegacyNotifyInfo[NOTIFY_INFO_ENTRIES] * "in preference order; last one END",
)
"""struct virtio_admin_cmd_legacy_notify_info_result (64 bytes)."""

CapGetData = Struct(
    "id" / Int16ul * "capability id",
    Padding(6),
)
"""struct virtio_admin_cmd_cap_get_data (DEVICE_CAP_GET)."""

CapSetData = Struct(
    "id" / Int16ul * "capability id",
    Padding(6),
    "cap_specific_data" / GreedyBytes,
)
"""struct virtio_admin_cmd_cap_set_data (DRIVER_CAP_SET)."""

DevPartsCap = Struct(
    "get_parts_resource_objects_limit" / Int8ul,
    "set_parts_resource_objects_limit" / Int8ul,
)
"""struct virtio_dev_parts_cap (capability id DEV_PARTS)."""

ResourceObjCmdHdr = Struct(
    "type" / Int16ul * "resource object type",
    Padding(2),
    "id" / Int32ul * "driver-chosen id, unique per type",
)
"""struct virtio_admin_cmd_resource_obj_cmd_hdr (8 bytes); RESOURCE_OBJ_DESTROY data."""

ResourceObjCreateData = Struct(
    "hdr" / ResourceObjCmdHdr,
    "flags" / Int64ul * "reserved, 0",
    "resource_obj_specific_data" / GreedyBytes,
)
"""struct virtio_admin_cmd_resource_obj_create_data (RESOURCE_OBJ_CREATE)."""

ResourceObjDevParts = Struct(
    "type" / IntEnumAdapter(DevPartsObjectType, Int8ul) * "GET or SET",
    Padding(7),
)
"""struct virtio_resource_obj_dev_parts: object-specific data for a DEV_PARTS object."""

# Hot-path twins of the Structs above; tests/protocol/test_virtio_admin.py checks each
# against its construct definition.
CMD_HEADER = struct.Struct("<HH12xQ")
CMD_STATUS = struct.Struct("<HH4x")
LEGACY_CFG_WRITE_HEADER = struct.Struct("<B7x")
LEGACY_CFG_READ = struct.Struct("<B")
NOTIFY_INFO_ENTRY = struct.Struct("<BB6xQ")


BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What the helpers accept: guest buffers often arrive as memoryviews."""

# --------------------------------------------------------------------------------------
# Errors


class AdminFormatError(ValueError):
    """An admin command buffer that cannot be read at all.

    Carries the status and qualifier the device answers with, so the caller can complete
    the command instead of crashing.
    """

    status: Status = Status.EINVAL
    qualifier: StatusQualifier = StatusQualifier.INVALID_COMMAND


# --------------------------------------------------------------------------------------
# Pure helpers


def fit(data: BytesLike, length: int) -> bytes:
    """``data`` truncated or zero-extended to ``length`` bytes (the admin buffer rule)."""
    if len(data) >= length:
        return bytes(data[:length])
    return bytes(data) + bytes(length - len(data))


class AdminCommand(NamedTuple):
    """A parsed device-readable part. ``opcode`` and ``group_type`` are enum members when
    named, plain ints when reserved."""

    opcode: int
    group_type: int
    group_member_id: int
    data: bytes


def parse_command(buf: BytesLike) -> AdminCommand:
    """Split a device-readable part into header fields and command-specific data.

    A header shorter than 24 bytes is zero-extended, as the device MUST do with short
    buffers; only an empty buffer raises :class:`AdminFormatError`.
    """
    if not buf:
        raise AdminFormatError("empty device-readable part in admin command")
    opcode, group_type, member = CMD_HEADER.unpack(fit(buf[:CMD_HEADER_SIZE], CMD_HEADER_SIZE))
    return AdminCommand(
        enum_or_int(Opcode, opcode),
        enum_or_int(GroupType, group_type),
        member,
        bytes(buf[CMD_HEADER_SIZE:]),
    )


def build_command(opcode: int, group_type: int, member_id: int, data: BytesLike = b"") -> bytes:
    """The device-readable part of a command (driver side, and tests)."""
    try:
        return CMD_HEADER.pack(opcode, group_type, member_id) + bytes(data)
    except struct.error as exc:
        raise ValueError(f"admin command header field out of range: {exc}") from exc


class AdminCompletion(NamedTuple):
    """A parsed device-writable part."""

    status: int
    status_qualifier: int
    result: bytes


def build_completion(
    status: int,
    qualifier: int = StatusQualifier.OK,
    result: BytesLike = b"",
    *,
    writable_length: int | None = None,
) -> bytes:
    """The bytes a device writes into the device-writable part.

    The result is zero-padded to a multiple of 64 bits (the device MUST initialise the
    writable part in such multiples) and everything is cut at ``writable_length``, the size
    of the driver's buffer (data beyond it is discarded). Linux sizes a LEGACY_*_CFG_READ
    buffer as 8 + access width, so a 1-byte read completes with exactly 9 bytes.
    """
    head = CMD_STATUS.pack(status, qualifier)
    padded = fit(result, -(-len(result) // 8) * 8)
    out = head + padded
    if writable_length is not None:
        if writable_length < 0:
            raise ValueError(f"negative writable length {writable_length}")
        out = out[:writable_length]
    return out


def parse_completion(buf: BytesLike) -> AdminCompletion:
    """Read a device-writable part as the driver must: missing bytes are zero."""
    status, qualifier = CMD_STATUS.unpack(fit(buf[:CMD_STATUS_SIZE], CMD_STATUS_SIZE))
    return AdminCompletion(
        enum_or_int(Status, status),
        enum_or_int(StatusQualifier, qualifier),
        bytes(buf[CMD_STATUS_SIZE:]),
    )


def build_bitmap(ids: Iterable[int], *, words: int | None = None) -> bytes:
    """A ``le64[]`` bitmap with bit ``n`` of word ``n // 64`` set for each id.

    Used for LIST_QUERY / LIST_USE (opcodes) and CAP_ID_LIST_QUERY (capability ids).
    The natural length is DIV_ROUND_UP(max id + 1, 64) words, at least one (buffers must
    not be empty); ``words`` forces a length, which must hold every id.
    """
    value = 0
    for ident in ids:
        if not 0 <= ident <= 0xFFFF:
            raise ValueError(f"id {ident} is not a 16-bit value")
        value |= 1 << ident
    needed = max(1, -(-value.bit_length() // 64))
    if words is None:
        words = needed
    elif words < needed:
        raise ValueError(f"{words} bitmap words cannot hold id {value.bit_length() - 1}")
    return value.to_bytes(words * 8, "little")


def parse_bitmap(buf: BytesLike, *, words: int | None = None) -> frozenset[int]:
    """The ids set in a ``le64[]`` bitmap.

    ``words`` is how many 64-bit words the reader expects: the buffer is zero-extended or
    truncated to that (missing words read as zero, extra ones are ignored). Without it the
    whole buffer counts, a trailing partial word zero-extended, up to BITMAP_MAX_WORDS (ids
    are 16-bit, so later words can only be padding; a guest cannot make this unbounded).
    """
    if words is None:
        words = min(-(-len(buf) // 8), BITMAP_MAX_WORDS)
    value = int.from_bytes(fit(buf, words * 8), "little")
    ids = set()
    while value:
        low = value & -value
        ids.add(low.bit_length() - 1)
        value ^= low
    return frozenset(ids)


def build_legacy_cfg_write(offset: int, data: BytesLike) -> bytes:
    """Command-specific data of LEGACY_COMMON_CFG_WRITE / LEGACY_DEV_CFG_WRITE."""
    try:
        return LEGACY_CFG_WRITE_HEADER.pack(offset) + bytes(data)
    except struct.error as exc:
        raise ValueError(f"legacy cfg offset {offset} is not a byte: {exc}") from exc


def parse_legacy_cfg_write(data: BytesLike) -> tuple[int, bytes]:
    """``(offset, value bytes)`` of a legacy cfg write; the write width is ``len(value)``.

    Shorter data reads as zeros (so fewer than 9 bytes is an empty write, which the
    device then rejects as not referring to a field).
    """
    (offset,) = LEGACY_CFG_WRITE_HEADER.unpack(
        fit(data[:LEGACY_CFG_WRITE_HEADER_SIZE], LEGACY_CFG_WRITE_HEADER_SIZE)
    )
    return offset, bytes(data[LEGACY_CFG_WRITE_HEADER_SIZE:])


def build_legacy_cfg_read(offset: int) -> bytes:
    """Command-specific data of LEGACY_*_CFG_READ (one byte, as Linux sends it)."""
    try:
        return LEGACY_CFG_READ.pack(offset)
    except struct.error as exc:
        raise ValueError(f"legacy cfg offset {offset} is not a byte: {exc}") from exc


def parse_legacy_cfg_read(data: BytesLike) -> int:
    """The offset of a legacy cfg read (0 if the data is empty; extra bytes ignored).

    The read width is not in the data: it is the length of the result buffer, i.e. the
    device-writable part minus the 8-byte status.
    """
    (offset,) = LEGACY_CFG_READ.unpack(fit(data[:1], 1))
    return int(offset)


class NotifyInfoEntry(NamedTuple):
    """One usable LEGACY_NOTIFY_INFO address."""

    flags: NotifyInfoFlags
    bar: int
    offset: int


def build_notify_info(entries: Sequence[NotifyInfoEntry]) -> bytes:
    """The 64-byte LEGACY_NOTIFY_INFO result: ``entries`` then END entries.

    At most three entries fit, since the last of the four MUST have flags END; offsets
    MUST be 2-byte aligned.
    """
    if len(entries) >= NOTIFY_INFO_ENTRIES:
        raise ValueError(f"at most {NOTIFY_INFO_ENTRIES - 1} notify entries, got {len(entries)}")
    out = bytearray()
    for entry in entries:
        if entry.flags == NotifyInfoFlags.END:
            raise ValueError("END is implied, not an entry")
        if entry.offset % 2:
            raise ValueError(f"notify offset {entry.offset:#x} is not 2-byte aligned")
        out += NOTIFY_INFO_ENTRY.pack(entry.flags, entry.bar, entry.offset)
    return fit(bytes(out), NOTIFY_INFO_ENTRIES * NOTIFY_INFO_ENTRY_SIZE)


def parse_notify_info(result: BytesLike) -> tuple[NotifyInfoEntry, ...]:
    """The usable entries of a LEGACY_NOTIFY_INFO result, in preference order.

    Stops at the first END entry; skips entries with reserved flags, as drivers are
    expected to; a short result reads as zeros (i.e. ends early).
    """
    buf = fit(result, NOTIFY_INFO_ENTRIES * NOTIFY_INFO_ENTRY_SIZE)
    entries = []
    for flags, bar, offset in NOTIFY_INFO_ENTRY.iter_unpack(buf):
        if flags == NotifyInfoFlags.END:
            break
        if flags in (NotifyInfoFlags.OWNER_DEVICE, NotifyInfoFlags.MEMBER_DEVICE):
            entries.append(NotifyInfoEntry(NotifyInfoFlags(flags), bar, offset))
    return tuple(entries)
