"""Virtio admin command formats (admin.tex, admin-cmds-*.tex) and their lenient helpers."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from construct import Construct
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.roundtrip import assert_round_trip
from vfuserver.protocol import virtio_admin as va
from vfuserver.protocol.virtio_admin import (
    GroupType,
    NotifyInfoEntry,
    NotifyInfoFlags,
    Opcode,
    Status,
    StatusQualifier,
)

END_ENTRY = {"flags": NotifyInfoFlags.END, "bar": 0, "offset": 0}

# One table feeds parse, build and sizeof; size None = variable length (sizeof raises).
# The header rows are what Linux virtio_pci_admin_legacy_io.c sends for VF 1.
ROUNDTRIP = [
    pytest.param(
        va.AdminCmdHeader,
        bytes.fromhex("0300 0100 000000000000000000000000 0100000000000000"), 24,
        {"opcode": Opcode.LEGACY_COMMON_CFG_READ, "group_type": GroupType.SRIOV,
         "group_member_id": 1},
        id="header-legacy-read-vf1",
    ),
    pytest.param(
        va.AdminCmdHeader,
        bytes.fromhex("0700 0000 000000000000000000000000 0000000000000000"), 24,
        {"opcode": Opcode.CAP_ID_LIST_QUERY, "group_type": GroupType.SELF,
         "group_member_id": 0},
        id="header-cap-list-self",
    ),
    pytest.param(
        va.AdminCmdHeader,
        bytes.fromhex("3412 0200 000000000000000000000000 ffffffffffffffff"), 24,
        {"opcode": 0x1234, "group_type": 2, "group_member_id": 2**64 - 1},
        id="header-reserved-values-stay-int",
    ),
    pytest.param(
        va.AdminCmdStatus, bytes.fromhex("1600 0200 00000000"), 8,
        {"status": Status.EINVAL, "status_qualifier": StatusQualifier.INVALID_OPCODE},
        id="status-einval-opcode",
    ),
    pytest.param(
        va.AdminCmdStatus, bytes.fromhex("0000 0000 00000000"), 8,
        {"status": Status.OK, "status_qualifier": StatusQualifier.OK},
        id="status-ok",
    ),
    pytest.param(
        va.AdminCmdList, bytes.fromhex("0300000000000000 0100000000000000"), None,
        {"device_admin_cmd_opcodes": [0x3, 0x1]},
        id="cmd-list-spec-example-0-1-64",
    ),
    pytest.param(
        va.AdminCmdList, bytes.fromhex("7c00000000000000"), None,
        {"device_admin_cmd_opcodes": [0x7C]},
        id="cmd-list-linux-legacy-bitmap",
    ),
    pytest.param(
        va.LegacyCfgWriteData, bytes.fromhex("12 00000000000000 07"), None,
        {"offset": 18, "data": b"\x07"},
        id="legacy-write-status",
    ),
    pytest.param(
        va.LegacyCfgWriteData, bytes.fromhex("08 00000000000000 f0f20300"), None,
        {"offset": 8, "data": bytes.fromhex("f0f20300")},
        id="legacy-write-pfn",
    ),
    pytest.param(
        va.LegacyCfgReadData, bytes.fromhex("13"), 1, {"offset": 19}, id="legacy-read-isr",
    ),
    pytest.param(
        va.LegacyNotifyInfo, bytes.fromhex("02 02 000000000000 0030000000000000"), 16,
        {"flags": NotifyInfoFlags.MEMBER_DEVICE, "bar": 2, "offset": 0x3000},
        id="notify-info-entry",
    ),
    pytest.param(
        va.LegacyNotifyInfoResult,
        bytes.fromhex("01 04 000000000000 0230000000000000") + bytes(48), 64,
        {"entries": [{"flags": NotifyInfoFlags.OWNER_DEVICE, "bar": 4, "offset": 0x3002},
                     END_ENTRY, END_ENTRY, END_ENTRY]},
        id="notify-info-result",
    ),
    pytest.param(
        va.CapGetData, bytes.fromhex("0000 000000000000"), 8, {"id": 0}, id="cap-get",
    ),
    pytest.param(
        va.CapSetData, bytes.fromhex("0000 000000000000 1010"), None,
        {"id": 0, "cap_specific_data": b"\x10\x10"},
        id="cap-set-dev-parts",
    ),
    pytest.param(
        va.DevPartsCap, bytes.fromhex("10 20"), 2,
        {"get_parts_resource_objects_limit": 16, "set_parts_resource_objects_limit": 32},
        id="dev-parts-cap",
    ),
    pytest.param(
        va.ResourceObjCmdHdr, bytes.fromhex("0000 0000 05000000"), 8, {"type": 0, "id": 5},
        id="resource-obj-hdr",
    ),
    pytest.param(
        va.ResourceObjCreateData,
        bytes.fromhex("0000 0000 05000000 0000000000000000 01 00000000000000"), None,
        {"hdr": {"type": va.ResourceObjectType.DEV_PARTS, "id": 5}, "flags": 0,
         "resource_obj_specific_data": bytes.fromhex("01 00000000000000")},
        id="resource-obj-create-dev-parts-set",
    ),
    pytest.param(
        va.ResourceObjDevParts, bytes.fromhex("01 00000000000000"), 8,
        {"type": va.DevPartsObjectType.SET},
        id="dev-parts-object",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "data", "size", "obj"), ROUNDTRIP)
def test_round_trip(fmt: Construct, data: bytes, size: int | None, obj: dict[str, Any]) -> None:
    assert_round_trip(fmt, data, obj, size=size)


@pytest.mark.parametrize(
    ("fmt", "constant", "spec_size"),
    [
        pytest.param(va.AdminCmdHeader, va.CMD_HEADER_SIZE, 24, id="header"),
        pytest.param(va.AdminCmdStatus, va.CMD_STATUS_SIZE, 8, id="status"),
        pytest.param(va.LegacyNotifyInfo, va.NOTIFY_INFO_ENTRY_SIZE, 16, id="notify-entry"),
        pytest.param(va.LegacyNotifyInfoResult, 4 * va.NOTIFY_INFO_ENTRY_SIZE, 64, id="notify"),
        pytest.param(va.ResourceObjCmdHdr, 8, 8, id="resource-obj-hdr"),
        pytest.param(va.CapGetData, 8, 8, id="cap-get-data"),
    ],
)
def test_sizes_match_spec(fmt: Construct, constant: int, spec_size: int) -> None:
    assert fmt.sizeof() == constant == spec_size


# --- struct.Struct twins agree with the construct definitions ------------------------

u8, u16, u64 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1)


@given(u16, u16, u64)
def test_header_struct_matches_construct(opcode: int, group: int, member: int) -> None:
    obj = {"opcode": opcode, "group_type": group, "group_member_id": member}
    packed = va.CMD_HEADER.pack(opcode, group, member)
    assert packed == va.AdminCmdHeader.build(obj)
    assert va.CMD_HEADER.size == va.AdminCmdHeader.sizeof()
    assert va.AdminCmdHeader.parse(packed) == obj


@given(u16, u16)
def test_status_struct_matches_construct(status: int, qualifier: int) -> None:
    obj = {"status": status, "status_qualifier": qualifier}
    assert va.CMD_STATUS.pack(status, qualifier) == va.AdminCmdStatus.build(obj)
    assert va.CMD_STATUS.size == va.AdminCmdStatus.sizeof()


@given(u8, st.binary(max_size=8))
def test_legacy_structs_match_construct(offset: int, data: bytes) -> None:
    assert va.LEGACY_CFG_WRITE_HEADER.pack(offset) + data == va.LegacyCfgWriteData.build(
        {"offset": offset, "data": data}
    )
    assert va.LEGACY_CFG_WRITE_HEADER.size == va.LEGACY_CFG_WRITE_HEADER_SIZE
    assert va.LEGACY_CFG_READ.pack(offset) == va.LegacyCfgReadData.build({"offset": offset})
    assert va.LEGACY_CFG_READ.size == va.LegacyCfgReadData.sizeof()


@given(u8, u8, u64)
def test_notify_entry_struct_matches_construct(flags: int, bar: int, offset: int) -> None:
    obj = {"flags": flags, "bar": bar, "offset": offset}
    assert va.NOTIFY_INFO_ENTRY.pack(flags, bar, offset) == va.LegacyNotifyInfo.build(obj)
    assert va.NOTIFY_INFO_ENTRY.size == va.LegacyNotifyInfo.sizeof()


# --- constants ------------------------------------------------------------------------


def test_opcodes_match_spec() -> None:
    """admin.tex opcode table (MODIFY/QUERY as in the command paragraphs)."""
    assert {op.name: int(op) for op in Opcode} == {
        "LIST_QUERY": 0x0, "LIST_USE": 0x1,
        "LEGACY_COMMON_CFG_WRITE": 0x2, "LEGACY_COMMON_CFG_READ": 0x3,
        "LEGACY_DEV_CFG_WRITE": 0x4, "LEGACY_DEV_CFG_READ": 0x5, "LEGACY_NOTIFY_INFO": 0x6,
        "CAP_ID_LIST_QUERY": 0x7, "DEVICE_CAP_GET": 0x8, "DRIVER_CAP_SET": 0x9,
        "RESOURCE_OBJ_CREATE": 0xA, "RESOURCE_OBJ_MODIFY": 0xB, "RESOURCE_OBJ_QUERY": 0xC,
        "RESOURCE_OBJ_DESTROY": 0xD, "DEV_PARTS_METADATA_GET": 0xE, "DEV_PARTS_GET": 0xF,
        "DEV_PARTS_SET": 0x10, "DEV_MODE_SET": 0x11,
    }  # fmt: skip


def test_status_values_are_errnos() -> None:
    import errno

    for status in Status:
        if status is not Status.OK:
            assert int(status) == getattr(errno, status.name)
    assert [int(q) for q in StatusQualifier] == list(range(8))
    assert (GroupType.SELF, GroupType.SRIOV) == (0, 1)


def test_linux_opcode_bitmaps() -> None:
    """drivers/virtio/virtio_pci_common.h VIRTIO_{LEGACY,DEV_PARTS}_ADMIN_CMD_BITMAP."""
    assert va.build_bitmap(va.LEGACY_OPCODES) == (0x7C).to_bytes(8, "little")
    assert va.build_bitmap(va.DEV_PARTS_OPCODES) == (0x3E780).to_bytes(8, "little")


# --- command and completion -----------------------------------------------------------


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        pytest.param(
            bytes.fromhex("0300 0100 000000000000000000000000 0100000000000000 10"),
            va.AdminCommand(Opcode.LEGACY_COMMON_CFG_READ, GroupType.SRIOV, 1, b"\x10"),
            id="linux-legacy-read-25-bytes",
        ),
        pytest.param(
            bytes.fromhex("0100 0100 ffffffffffffffffffffffff 0000000000000000 7c00000000000000"),
            va.AdminCommand(Opcode.LIST_USE, GroupType.SRIOV, 0, bytes.fromhex("7c00000000000000")),
            id="reserved1-ignored",
        ),
        pytest.param(
            bytes.fromhex("0600"),
            va.AdminCommand(Opcode.LEGACY_NOTIFY_INFO, GroupType.SELF, 0, b""),
            id="short-header-zero-extended",
        ),
        pytest.param(
            bytes.fromhex("0080 0500 000000000000000000000000 0200000000000000"),
            va.AdminCommand(0x8000, 5, 2, b""),
            id="reserved-opcode-and-group-parse",
        ),
    ],
)  # fmt: skip
def test_parse_command(buf: bytes, expected: va.AdminCommand) -> None:
    assert va.parse_command(buf) == expected


def test_parse_command_rejects_empty_with_a_status() -> None:
    with pytest.raises(va.AdminFormatError) as info:
        va.parse_command(b"")
    assert isinstance(info.value, ValueError)
    assert (info.value.status, info.value.qualifier) == (
        Status.EINVAL,
        StatusQualifier.INVALID_COMMAND,
    )


@given(st.binary(min_size=1, max_size=64))
def test_parse_command_total_on_nonempty(buf: bytes) -> None:
    cmd = va.parse_command(buf)
    rebuilt = va.build_command(cmd.opcode, cmd.group_type, cmd.group_member_id, cmd.data)
    # reserved1 comes back as zeros; everything else survives.
    expected = va.fit(buf, max(len(buf), 24))
    assert rebuilt == expected[:4] + bytes(12) + expected[16:]


def test_build_command() -> None:
    assert va.build_command(Opcode.LIST_QUERY, GroupType.SRIOV, 0) == bytes.fromhex(
        "0000 0100 000000000000000000000000 0000000000000000"
    )
    with pytest.raises(ValueError, match="out of range"):
        va.build_command(0x10000, 0, 0)


@pytest.mark.parametrize(
    ("args", "writable", "expected"),
    [
        pytest.param((Status.OK, 0, b""), None, bytes(8), id="ok-no-result"),
        pytest.param((Status.OK, 0, b"\xaa"), None, bytes(8) + b"\xaa" + bytes(7),
                     id="result-padded-to-qword"),
        pytest.param((Status.OK, 0, b"\xaa"), 9, bytes(8) + b"\xaa",
                     id="linux-1-byte-read-buffer"),
        pytest.param((Status.OK, 0, bytes(range(64))), 16, bytes(8) + bytes(range(8)),
                     id="short-buffer-truncates"),
        pytest.param((Status.EINVAL, StatusQualifier.INVALID_GROUP, b""), 4,
                     bytes.fromhex("1600 0400"), id="even-status-truncates"),
        pytest.param((Status.ENOMEM, StatusQualifier.NORESOURCE, b""), 64,
                     bytes.fromhex("0c00 0600 00000000"), id="long-buffer-untouched-tail"),
    ],
)  # fmt: skip
def test_build_completion(
    args: tuple[int, int, bytes], writable: int | None, expected: bytes
) -> None:
    assert va.build_completion(*args, writable_length=writable) == expected


def test_parse_completion() -> None:
    assert va.parse_completion(bytes.fromhex("1600 0500 00000000 ab")) == va.AdminCompletion(
        Status.EINVAL, StatusQualifier.INVALID_MEMBER, b"\xab"
    )
    assert va.parse_completion(b"\x0b") == va.AdminCompletion(Status.EAGAIN, 0, b"")
    assert va.parse_completion(bytes.fromhex("6300 6300")) == va.AdminCompletion(99, 99, b"")


# --- LIST_QUERY / LIST_USE bitmaps ----------------------------------------------------


@pytest.mark.parametrize(
    ("buf", "words", "ids"),
    [
        pytest.param(bytes.fromhex("0300000000000000 0100000000000000"), None, {0, 1, 64},
                     id="spec-example"),
        pytest.param(bytes.fromhex("0300000000000000 0100000000000000"), 1, {0, 1},
                     id="extra-words-ignored"),
        pytest.param(bytes.fromhex("7c"), 1, {2, 3, 4, 5, 6}, id="short-word-zero-extended"),
        pytest.param(b"", 2, set(), id="missing-words-are-zero"),
        pytest.param(bytes.fromhex("0300000000000000") + bytes(24), None, {0, 1},
                     id="trailing-zero-words"),
        pytest.param(bytes.fromhex("00000000000000 80"), None, {63}, id="bit-63"),
        pytest.param(bytes(8 * 1024) + b"\xff" * 64, None, set(), id="beyond-16-bit-ignored"),
    ],
)  # fmt: skip
def test_parse_bitmap(buf: bytes, words: int | None, ids: set[int]) -> None:
    assert va.parse_bitmap(buf, words=words) == ids


def test_build_bitmap() -> None:
    assert va.build_bitmap({0, 1, 64}) == bytes.fromhex("0300000000000000 0100000000000000")
    assert va.build_bitmap(set()) == bytes(8)
    assert va.build_bitmap({63}) == bytes.fromhex("0000000000000080")
    assert va.build_bitmap({0}, words=3) == b"\x01" + bytes(23)
    with pytest.raises(ValueError, match="cannot hold"):
        va.build_bitmap({64}, words=1)
    with pytest.raises(ValueError, match="16-bit"):
        va.build_bitmap({0x10000})


opcode_sets = st.frozensets(st.integers(0, 0xFFFF), max_size=40)


@given(opcode_sets)
def test_bitmap_round_trip(ids: frozenset[int]) -> None:
    buf = va.build_bitmap(ids)
    assert len(buf) % 8 == 0
    assert len(buf) == 8 * max(1, (max(ids, default=0) + 64) // 64)
    assert va.parse_bitmap(buf) == ids


@given(opcode_sets, st.integers(0, 4), st.integers(1, 1100))
def test_bitmap_lenient_lengths(ids: frozenset[int], extra: int, words: int) -> None:
    """Longer buffers with zero words read the same; a reader expecting fewer words sees
    only the ids those words hold."""
    buf = va.build_bitmap(ids) + bytes(8 * extra)
    assert va.parse_bitmap(buf) == ids
    assert va.parse_bitmap(buf, words=words) == {i for i in ids if i < 64 * words}


@given(opcode_sets, opcode_sets)
def test_any_opcode_set_survives_query_then_use(
    supported: frozenset[int], known: frozenset[int]
) -> None:
    """Device answers LIST_QUERY with what it supports (always 0 and 1); the driver keeps
    what it knows and sends LIST_USE; the device reads back exactly that subset."""
    device_supported = supported | va.LIST_OPCODES
    query_result = va.build_bitmap(device_supported)
    offered = va.parse_bitmap(query_result)
    assert offered == device_supported
    use = va.build_command(Opcode.LIST_USE, GroupType.SRIOV, 0, va.build_bitmap(offered & known))
    received = va.parse_bitmap(va.parse_command(use).data)
    assert received == device_supported & known
    assert received <= device_supported


# --- legacy command data --------------------------------------------------------------


def test_legacy_cfg_write_helpers() -> None:
    data = va.build_legacy_cfg_write(18, b"\x07")
    assert data == bytes.fromhex("12 00000000000000 07")
    assert va.parse_legacy_cfg_write(data) == (18, b"\x07")
    assert va.parse_legacy_cfg_write(data + b"\x00") == (18, b"\x07\x00")  # width from length
    assert va.parse_legacy_cfg_write(b"\x10") == (16, b"")  # short: empty write
    assert va.parse_legacy_cfg_write(b"") == (0, b"")
    with pytest.raises(ValueError, match="not a byte"):
        va.build_legacy_cfg_write(256, b"\x00")


def test_legacy_cfg_read_helpers() -> None:
    assert va.build_legacy_cfg_read(19) == b"\x13"
    assert va.parse_legacy_cfg_read(b"\x13") == 19
    assert va.parse_legacy_cfg_read(b"\x13" + bytes(7)) == 19  # spec-style padded data
    assert va.parse_legacy_cfg_read(b"") == 0
    with pytest.raises(ValueError, match="not a byte"):
        va.build_legacy_cfg_read(-1)


def test_notify_info_helpers() -> None:
    entries = (
        NotifyInfoEntry(NotifyInfoFlags.MEMBER_DEVICE, 2, 0x3000),
        NotifyInfoEntry(NotifyInfoFlags.OWNER_DEVICE, 4, 0x1_0002),
    )
    result = va.build_notify_info(entries)
    assert result == (
        bytes.fromhex("02 02 000000000000 0030000000000000")
        + bytes.fromhex("01 04 000000000000 0200010000000000")
        + bytes(32)
    )
    assert va.LegacyNotifyInfoResult.parse(result).entries[2].flags is NotifyInfoFlags.END
    assert va.parse_notify_info(result) == entries
    assert va.parse_notify_info(result[:16]) == entries[:1]  # short result ends early
    # Cut inside an entry: the missing offset bytes read as zero, as the spec says.
    assert va.parse_notify_info(result[:18]) == (entries[0], entries[1]._replace(offset=0))
    assert va.parse_notify_info(b"") == ()


def test_parse_notify_info_skips_reserved_and_stops_at_end() -> None:
    result = (
        bytes.fromhex("07 01 000000000000 0000000000000000")  # reserved flags: skipped
        + bytes.fromhex("02 01 000000000000 0400000000000000")
        + bytes(16)  # END
        + bytes.fromhex("01 03 000000000000 0800000000000000")  # after END: ignored
    )
    assert va.parse_notify_info(result) == (NotifyInfoEntry(NotifyInfoFlags.MEMBER_DEVICE, 1, 4),)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        pytest.param([NotifyInfoEntry(NotifyInfoFlags.OWNER_DEVICE, 1, 0)] * 4, "at most 3",
                     id="no-room-for-end"),
        pytest.param([NotifyInfoEntry(NotifyInfoFlags.OWNER_DEVICE, 1, 3)], "aligned",
                     id="odd-offset"),
        pytest.param([NotifyInfoEntry(NotifyInfoFlags.END, 0, 0)], "implied", id="explicit-end"),
    ],
)  # fmt: skip
def test_build_notify_info_rejects(entries: list[NotifyInfoEntry], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        va.build_notify_info(entries)


def test_fit() -> None:
    assert va.fit(b"abc", 5) == b"abc\x00\x00"
    assert va.fit(b"abcdef", 2) == b"ab"
    assert va.fit(memoryview(b"xy"), 2) == b"xy"


def test_struct_pack_oracle_for_header() -> None:
    """Independent of the module: the C layout from include/uapi/linux/virtio_pci.h."""
    linux = struct.pack("<HH12xQ", 5, 1, 3)
    assert va.build_command(Opcode.LEGACY_DEV_CFG_READ, GroupType.SRIOV, 3) == linux
