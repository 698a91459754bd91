"""The admin command owner: validation order, command lists, legacy dispatch, buffer rules.

Commands are built the way Linux drivers/virtio/virtio_pci_admin_legacy_io.c builds them
(group SR-IOV, VF number as member id, a 1-byte read offset, an 8-byte write header) and
run against a real :class:`AdminOwner` whose member is a small legacy register file.
"""

from __future__ import annotations

import errno
import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfuserver.devices.admin import AdminCommandError, AdminOwner
from vfuserver.devices.errors import GuestError
from vfuserver.protocol.virtio_admin import (
    LEGACY_OPCODES,
    AdminCompletion,
    GroupType,
    NotifyInfoEntry,
    NotifyInfoFlags,
    Opcode,
    Status,
    StatusQualifier,
    build_bitmap,
    build_command,
    build_completion,
    build_legacy_cfg_read,
    build_legacy_cfg_write,
    parse_bitmap,
    parse_completion,
    parse_notify_info,
)

SRIOV = GroupType.SRIOV
SELF = GroupType.SELF
LINUX_LIST_USE = 0x7C  # VIRTIO_LEGACY_ADMIN_CMD_BITMAP: bits 2..6, not 0 or 1


class RegisterFile:
    """A legacy virtio-net member over two bytearrays, strict about fields like the spec.

    Common header (MSI-X off): features 0/4, guest features 4/4, PFN 8/4, queue num 12/2,
    queue select 14/2, notify 16/2, status 18/1, ISR 19/1. Device area: mac 0..5 (any
    byte range of the array), status 6/2. Every call is recorded.
    """

    COMMON_FIELDS = {0: 4, 4: 4, 8: 4, 12: 2, 14: 2, 16: 2, 18: 1, 19: 1}
    MAC_SIZE = 6
    DEVICE_FIELDS = {6: 2}

    def __init__(self) -> None:
        self.common = bytearray(20)
        self.device = bytearray(8)
        self.calls: list[tuple[str, int, int | bytes]] = []
        self.notify_entries: list[NotifyInfoEntry] = [
            NotifyInfoEntry(NotifyInfoFlags.MEMBER_DEVICE, 2, 0x1000),
            NotifyInfoEntry(NotifyInfoFlags.OWNER_DEVICE, 4, 0x40),
        ]

    def _check_common(self, offset: int, size: int) -> None:
        if self.COMMON_FIELDS.get(offset) != size:
            raise GuestError(f"common access {offset}+{size} is not a field")

    def _check_device(self, offset: int, size: int) -> None:
        in_mac = offset + size <= self.MAC_SIZE
        if size <= 0 or not (in_mac or self.DEVICE_FIELDS.get(offset) == size):
            raise GuestError(f"device access {offset}+{size} is not a field")

    def legacy_common_read(self, offset: int, size: int) -> bytes:
        self.calls.append(("common_read", offset, size))
        self._check_common(offset, size)
        return bytes(self.common[offset : offset + size])

    def legacy_common_write(self, offset: int, data: bytes) -> None:
        self.calls.append(("common_write", offset, data))
        self._check_common(offset, len(data))
        self.common[offset : offset + len(data)] = data

    def legacy_device_read(self, offset: int, size: int) -> bytes:
        self.calls.append(("device_read", offset, size))
        self._check_device(offset, size)
        return bytes(self.device[offset : offset + size])

    def legacy_device_write(self, offset: int, data: bytes) -> None:
        self.calls.append(("device_write", offset, data))
        self._check_device(offset, len(data))
        self.device[offset : offset + len(data)] = data

    def legacy_notify_info(self) -> list[NotifyInfoEntry]:
        self.calls.append(("notify_info", 0, 0))
        return list(self.notify_entries)


class BuggyMember(RegisterFile):
    """Fails in ways a correct member never does."""

    def legacy_common_read(self, offset: int, size: int) -> bytes:
        raise ZeroDivisionError("member bug")

    def legacy_device_read(self, offset: int, size: int) -> bytes:
        return bytes(size + 1)  # wrong length

    def legacy_common_write(self, offset: int, data: bytes) -> None:
        # Not a bug: a member may pick its own status.
        raise AdminCommandError("busy", StatusQualifier.TRYAGAIN, status=Status.EAGAIN)

    def legacy_notify_info(self) -> list[NotifyInfoEntry]:
        return [NotifyInfoEntry(NotifyInfoFlags.OWNER_DEVICE, 1, 0x41)]  # unaligned


def run(
    owner: AdminOwner,
    opcode: int,
    result_size: int = 0,
    *,
    group: int = SRIOV,
    member: int = 1,
    data: bytes = b"",
) -> AdminCompletion:
    out = owner.execute(build_command(opcode, group, member, data), result_size)
    assert len(out) <= 8 + result_size
    return parse_completion(out)


def list_use(owner: AdminOwner, opcodes: int | bytes, group: int = SRIOV) -> AdminCompletion:
    data = opcodes if isinstance(opcodes, bytes) else struct.pack("<Q", opcodes)
    return run(owner, Opcode.LIST_USE, group=group, member=0, data=data)


def failed(completion: AdminCompletion, qualifier: StatusQualifier) -> bool:
    return completion == (Status.EINVAL, qualifier, b"")


OK_EMPTY = (Status.OK, StatusQualifier.OK, b"")


@pytest.fixture
def owner() -> AdminOwner:
    """An owner as Linux leaves it after virtio_pci_admin_cmd_list_init."""
    owner = AdminOwner()
    assert list_use(owner, LINUX_LIST_USE) == OK_EMPTY
    return owner


@pytest.fixture
def member(owner: AdminOwner) -> RegisterFile:
    member = RegisterFile()
    assert owner.add_member(member) == 1
    return member


# -- validation order (admin.tex device normative) -----------------------------------------

READ = Opcode.LEGACY_COMMON_CFG_READ
BAD_GROUP = 2
BAD_OPCODE = Opcode.CAP_ID_LIST_QUERY  # a real opcode this owner does not support
BAD_MEMBER = 2


@pytest.mark.parametrize(
    ("group", "opcode", "member_id", "qualifier"),
    [
        pytest.param(BAD_GROUP, READ, 1, StatusQualifier.INVALID_GROUP, id="group"),
        pytest.param(0xFFFF, READ, 1, StatusQualifier.INVALID_GROUP, id="group-max"),
        pytest.param(SRIOV, BAD_OPCODE, 1, StatusQualifier.INVALID_OPCODE, id="opcode"),
        pytest.param(SRIOV, 0x0012, 1, StatusQualifier.INVALID_OPCODE, id="opcode-future"),
        pytest.param(SRIOV, 0x8000, 1, StatusQualifier.INVALID_OPCODE, id="opcode-reserved"),
        pytest.param(SRIOV, 0xFFFF, 1, StatusQualifier.INVALID_OPCODE, id="opcode-max"),
        pytest.param(SRIOV, READ, 0, StatusQualifier.INVALID_MEMBER, id="member-0"),
        pytest.param(SRIOV, READ, BAD_MEMBER, StatusQualifier.INVALID_MEMBER, id="member"),
        pytest.param(SRIOV, READ, 2**64 - 1, StatusQualifier.INVALID_MEMBER, id="member-max"),
        pytest.param(BAD_GROUP, BAD_OPCODE, 1, StatusQualifier.INVALID_GROUP, id="group+opcode"),
        pytest.param(BAD_GROUP, READ, BAD_MEMBER, StatusQualifier.INVALID_GROUP, id="group+member"),
        pytest.param(
            SRIOV, BAD_OPCODE, BAD_MEMBER, StatusQualifier.INVALID_OPCODE, id="opcode+member"
        ),
        pytest.param(
            BAD_GROUP, BAD_OPCODE, BAD_MEMBER, StatusQualifier.INVALID_GROUP, id="all-three"
        ),
        # Legacy commands "are currently only defined for the SR-IOV group type".
        pytest.param(SELF, READ, 1, StatusQualifier.INVALID_OPCODE, id="legacy-in-self"),
        pytest.param(
            SELF, READ, BAD_MEMBER, StatusQualifier.INVALID_OPCODE, id="legacy-in-self+member"
        ),
    ],
)
def test_validation_order(
    owner: AdminOwner,
    member: RegisterFile,
    group: int,
    opcode: int,
    member_id: int,
    qualifier: StatusQualifier,
) -> None:
    completion = run(owner, opcode, 1, group=group, member=member_id, data=b"\x00")
    assert failed(completion, qualifier)
    assert member.calls == []


@pytest.mark.parametrize("group", [SELF, SRIOV])
@pytest.mark.parametrize("member_id", [0, 1, BAD_MEMBER, 2**64 - 1])
def test_list_commands_ignore_the_member_id(
    owner: AdminOwner, member: RegisterFile, group: GroupType, member_id: int
) -> None:
    # admin.tex: for LIST_QUERY / LIST_USE "the group_member_id is unused".
    assert run(owner, Opcode.LIST_QUERY, 8, group=group, member=member_id).status == Status.OK
    use = run(owner, Opcode.LIST_USE, group=group, member=member_id, data=build_bitmap([0, 1]))
    assert use == OK_EMPTY


# -- LIST_QUERY / LIST_USE ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "supported", "raw"),
    [
        pytest.param(SRIOV, {0, 1, 2, 3, 4, 5, 6}, "7f00000000000000", id="sriov"),
        pytest.param(SELF, {0, 1}, "0300000000000000", id="self"),
    ],
)
def test_list_query(group: GroupType, supported: set[int], raw: str) -> None:
    owner = AdminOwner()
    # Linux reads one le64 (virtio_pci_admin_cmd_list_init).
    completion = run(owner, Opcode.LIST_QUERY, 8, group=group, member=0)
    assert parse_bitmap(completion.result) == supported == owner.supported_opcodes(group)
    assert completion == (Status.OK, StatusQualifier.OK, bytes.fromhex(raw))


def test_only_list_commands_before_list_use() -> None:
    owner = AdminOwner()
    member = RegisterFile()
    member_id = owner.add_member(member)
    assert owner.opcodes_in_use(SRIOV) == {Opcode.LIST_QUERY, Opcode.LIST_USE}
    for opcode in sorted(LEGACY_OPCODES):
        completion = run(owner, opcode, 2, member=member_id, data=build_legacy_cfg_write(0, b""))
        assert failed(completion, StatusQualifier.INVALID_OPCODE), opcode
    assert member.calls == []


def test_list_use_subset_enables_exactly_that(owner: AdminOwner, member: RegisterFile) -> None:
    assert list_use(owner, build_bitmap([Opcode.LEGACY_DEV_CFG_READ])) == OK_EMPTY
    assert owner.opcodes_in_use(SRIOV) == {Opcode.LEGACY_DEV_CFG_READ}
    dev_read = run(owner, Opcode.LEGACY_DEV_CFG_READ, 1, data=build_legacy_cfg_read(0))
    assert dev_read.status == Status.OK
    common_read = run(owner, Opcode.LEGACY_COMMON_CFG_READ, 1, data=build_legacy_cfg_read(18))
    assert failed(common_read, StatusQualifier.INVALID_OPCODE)
    # LIST_QUERY and LIST_USE stay usable although left out, as Linux leaves them out.
    assert run(owner, Opcode.LIST_QUERY, 8, member=0).status == Status.OK


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(build_bitmap(range(8)), id="plus-cap-id-list-query"),
        pytest.param(build_bitmap([2, 64]), id="second-word"),
        pytest.param(build_bitmap([0xFFFF]), id="last-opcode"),
        pytest.param(b"\x7c" + bytes(7) + b"\x00\x80", id="partial-second-word"),
    ],
)
def test_list_use_superset_is_refused_and_changes_nothing(
    owner: AdminOwner, member: RegisterFile, data: bytes
) -> None:
    before = owner.opcodes_in_use(SRIOV)
    assert failed(list_use(owner, data), StatusQualifier.INVALID_FIELD)
    assert owner.opcodes_in_use(SRIOV) == before
    read = run(owner, Opcode.LEGACY_COMMON_CFG_READ, 1, data=build_legacy_cfg_read(18))
    assert read.status == Status.OK


@pytest.mark.parametrize(
    ("data", "in_use"),
    [
        pytest.param(struct.pack("<QQ", 0x7F, 0), set(range(7)), id="extra-zero-word"),
        pytest.param(b"\x0c", {2, 3}, id="short-word"),
        pytest.param(b"", set(), id="empty-blocks-all"),
    ],
)
def test_list_use_buffer_lengths(owner: AdminOwner, data: bytes, in_use: set[int]) -> None:
    assert list_use(owner, data) == OK_EMPTY
    assert owner.opcodes_in_use(SRIOV) == in_use


def test_groups_keep_separate_lists(owner: AdminOwner, member: RegisterFile) -> None:
    # admin.tex: "commands for each group type MUST operate independently".
    assert owner.opcodes_in_use(SELF) == {Opcode.LIST_QUERY, Opcode.LIST_USE}
    assert failed(list_use(owner, LINUX_LIST_USE, group=SELF), StatusQualifier.INVALID_FIELD)
    assert list_use(owner, 0, group=SELF) == OK_EMPTY
    assert owner.opcodes_in_use(SELF) == set()
    assert owner.opcodes_in_use(SRIOV) == LEGACY_OPCODES


def test_reset_reverts_to_the_list_commands(owner: AdminOwner, member: RegisterFile) -> None:
    owner.reset()
    assert owner.opcodes_in_use(SRIOV) == {Opcode.LIST_QUERY, Opcode.LIST_USE}
    read = run(owner, Opcode.LEGACY_COMMON_CFG_READ, 1, data=build_legacy_cfg_read(18))
    assert failed(read, StatusQualifier.INVALID_OPCODE)


# -- legacy commands -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opcode", "data", "result_size", "call", "result"),
    [
        pytest.param(
            Opcode.LEGACY_COMMON_CFG_WRITE, build_legacy_cfg_write(18, b"\x07"), 0,
            ("common_write", 18, b"\x07"), b"", id="common-write-status",
        ),
        pytest.param(
            Opcode.LEGACY_COMMON_CFG_WRITE, build_legacy_cfg_write(8, b"\x01\x02\x03\x04"), 0,
            ("common_write", 8, b"\x01\x02\x03\x04"), b"", id="common-write-pfn",
        ),
        pytest.param(
            Opcode.LEGACY_COMMON_CFG_READ, build_legacy_cfg_read(0), 4,
            ("common_read", 0, 4), bytes.fromhex("a0a1a2a3"), id="common-read-features",
        ),
        pytest.param(
            Opcode.LEGACY_COMMON_CFG_READ, build_legacy_cfg_read(19), 1,
            ("common_read", 19, 1), b"\xb3", id="common-read-isr",
        ),
        pytest.param(
            Opcode.LEGACY_DEV_CFG_WRITE, build_legacy_cfg_write(0, b"\x52\x54\x00\x12\x34\x56"),
            0, ("device_write", 0, b"\x52\x54\x00\x12\x34\x56"), b"", id="dev-write-mac",
        ),
        pytest.param(
            Opcode.LEGACY_DEV_CFG_READ, build_legacy_cfg_read(6), 2,
            ("device_read", 6, 2), bytes.fromhex("c6c7"), id="dev-read-status",
        ),
        pytest.param(
            Opcode.LEGACY_DEV_CFG_READ, build_legacy_cfg_read(3), 1,
            ("device_read", 3, 1), b"\xc3", id="dev-read-mac-byte",
        ),
    ],
)  # fmt: skip
def test_legacy_commands_dispatch(
    owner: AdminOwner,
    member: RegisterFile,
    opcode: Opcode,
    data: bytes,
    result_size: int,
    call: tuple[str, int, int | bytes],
    result: bytes,
) -> None:
    member.common[:] = bytes(range(0xA0, 0xA0 + 16)) + bytes(range(0xB0, 0xB4))
    member.device[:] = bytes(range(0xC0, 0xC8))
    completion = run(owner, opcode, result_size, data=data)
    assert completion == (Status.OK, StatusQualifier.OK, result)
    assert member.calls == [call]
    if isinstance(call[2], bytes):  # a write reached the registers
        area = member.common if call[0] == "common_write" else member.device
        assert area[call[1] : call[1] + len(call[2])] == call[2]


def test_legacy_commands_reach_the_addressed_member(owner: AdminOwner) -> None:
    first, second = RegisterFile(), RegisterFile()
    first_id, second_id = owner.add_member(first), owner.add_member(second)
    write = build_legacy_cfg_write(18, b"\x0f")
    assert run(owner, Opcode.LEGACY_COMMON_CFG_WRITE, member=second_id, data=write) == OK_EMPTY
    assert (first.common[18], second.common[18]) == (0, 0x0F)
    assert first_id == 1 and second_id == 2


def test_write_ignores_reserved_bytes(owner: AdminOwner, member: RegisterFile) -> None:
    data = b"\x0c" + b"\xff" * 7 + b"\x34\x12"
    assert run(owner, Opcode.LEGACY_COMMON_CFG_WRITE, data=data) == OK_EMPTY
    assert member.calls == [("common_write", 12, b"\x34\x12")]


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        pytest.param(b"\x13", 19, id="linux-1-byte"),
        pytest.param(b"\x13" + b"\xee" * 7, 19, id="long-ignored"),
        pytest.param(b"", 0, id="missing-reads-zero"),
    ],
)
def test_read_offset_buffer_lengths(
    owner: AdminOwner, member: RegisterFile, data: bytes, offset: int
) -> None:
    size = RegisterFile.COMMON_FIELDS[offset]
    assert run(owner, Opcode.LEGACY_COMMON_CFG_READ, size, data=data).status == Status.OK
    assert member.calls == [("common_read", offset, size)]


@pytest.mark.parametrize(
    ("opcode", "data", "result_size"),
    [
        pytest.param(Opcode.LEGACY_COMMON_CFG_READ, b"\x12", 0, id="common-read"),
        pytest.param(Opcode.LEGACY_DEV_CFG_READ, b"\x00", 0, id="dev-read"),
        pytest.param(Opcode.LEGACY_COMMON_CFG_WRITE, bytes(8), 0, id="common-write-header"),
        pytest.param(Opcode.LEGACY_DEV_CFG_WRITE, b"\x00\x00", 0, id="dev-write-short"),
        pytest.param(Opcode.LEGACY_DEV_CFG_WRITE, b"", 0, id="dev-write-no-data"),
    ],
)
def test_zero_length_access_is_an_invalid_field(
    owner: AdminOwner, member: RegisterFile, opcode: Opcode, data: bytes, result_size: int
) -> None:
    assert failed(run(owner, opcode, result_size, data=data), StatusQualifier.INVALID_FIELD)
    assert member.calls == []


@pytest.mark.parametrize(
    ("opcode", "data", "result_size"),
    [
        pytest.param(Opcode.LEGACY_COMMON_CFG_READ, b"\x11", 2, id="common-read-straddles"),
        pytest.param(Opcode.LEGACY_COMMON_CFG_READ, b"\x14", 2, id="common-read-past-end"),
        pytest.param(
            Opcode.LEGACY_COMMON_CFG_WRITE, build_legacy_cfg_write(0, b"\x00\x00"), 0,
            id="common-write-half-field",
        ),
        pytest.param(Opcode.LEGACY_DEV_CFG_READ, b"\x06", 4, id="dev-read-too-wide"),
        pytest.param(
            Opcode.LEGACY_DEV_CFG_WRITE, build_legacy_cfg_write(0xFF, b"\x00"), 0,
            id="dev-write-outside",
        ),
    ],
)  # fmt: skip
def test_member_guest_error_is_an_invalid_field(
    owner: AdminOwner, member: RegisterFile, opcode: Opcode, data: bytes, result_size: int
) -> None:
    assert failed(run(owner, opcode, result_size, data=data), StatusQualifier.INVALID_FIELD)
    assert len(member.calls) == 1
    assert member.common == bytes(20) and member.device == bytes(8)
    assert owner.stats.statuses[(opcode, Status.EINVAL)] == 1
    assert owner.stats.bugs == 0


def test_member_chooses_its_status_with_admin_command_error(owner: AdminOwner) -> None:
    owner.add_member(BuggyMember())
    write = build_legacy_cfg_write(18, b"\x01")
    completion = run(owner, Opcode.LEGACY_COMMON_CFG_WRITE, data=write)
    assert completion == (Status.EAGAIN, StatusQualifier.TRYAGAIN, b"")
    assert AdminCommandError("x", StatusQualifier.INVALID_FIELD).errno == errno.EINVAL


@pytest.mark.parametrize(
    ("opcode", "data", "result_size", "message"),
    [
        pytest.param(Opcode.LEGACY_COMMON_CFG_READ, b"\x12", 1, "ZeroDivisionError", id="raise"),
        pytest.param(Opcode.LEGACY_DEV_CFG_READ, b"\x00", 2, "3 bytes for a 2-byte", id="len"),
        pytest.param(Opcode.LEGACY_NOTIFY_INFO, b"", 64, "not 2-byte aligned", id="notify"),
    ],
)
def test_member_bug_is_answered_and_logged(
    owner: AdminOwner,
    caplog: pytest.LogCaptureFixture,
    opcode: Opcode,
    data: bytes,
    result_size: int,
    message: str,
) -> None:
    member_id = owner.add_member(BuggyMember())
    with caplog.at_level(logging.ERROR, logger="vfuserver.devices.admin"):
        completion = run(owner, opcode, result_size, member=member_id, data=data)
    assert completion.status != Status.OK
    assert failed(completion, StatusQualifier.INVALID_COMMAND)
    assert owner.stats.bugs == 1
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert "Traceback" in record.getMessage() and message in record.getMessage()


def test_member_bug_logging_is_rate_limited(
    owner: AdminOwner, caplog: pytest.LogCaptureFixture
) -> None:
    owner.add_member(BuggyMember())
    with caplog.at_level(logging.ERROR, logger="vfuserver.devices.admin"):
        for _ in range(50):
            run(owner, Opcode.LEGACY_COMMON_CFG_READ, 1, data=b"\x12")
    assert owner.stats.bugs == 50
    assert 1 <= len(caplog.records) <= 10


def test_guest_errors_are_not_logged_above_debug(
    owner: AdminOwner, member: RegisterFile, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        run(owner, Opcode.LEGACY_COMMON_CFG_READ, 3, data=b"\x00")
        run(owner, Opcode.LEGACY_COMMON_CFG_READ, 1, member=BAD_MEMBER, data=b"\x00")
        run(owner, 0x8000, group=7)
    assert caplog.records == []


# -- members --------------------------------------------------------------------------------


def test_removed_member_is_invalid_and_ids_are_not_reused(owner: AdminOwner) -> None:
    old = RegisterFile()
    old_id = owner.add_member(old)
    owner.remove_member(old_id)
    new = RegisterFile()
    new_id = owner.add_member(new)
    assert new_id != old_id
    read = run(owner, Opcode.LEGACY_COMMON_CFG_READ, 1, member=old_id, data=b"\x12")
    assert failed(read, StatusQualifier.INVALID_MEMBER)
    assert old.calls == new.calls == []
    assert dict(owner.members) == {new_id: new}


def test_membership_misuse_raises(owner: AdminOwner, member: RegisterFile) -> None:
    with pytest.raises(ValueError, match="already a member"):
        owner.add_member(member)
    with pytest.raises(KeyError):
        owner.remove_member(99)


# -- LEGACY_NOTIFY_INFO --------------------------------------------------------------------


def test_notify_info_layout(owner: AdminOwner, member: RegisterFile) -> None:
    completion = run(owner, Opcode.LEGACY_NOTIFY_INFO, 64)
    assert completion.status == Status.OK
    # struct virtio_admin_cmd_legacy_notify_info_result: 4 x {flags u8, bar u8, pad[6],
    # le64 offset}; the last entry (here the last two) has flags 0 = end of list.
    assert completion.result == bytes.fromhex(
        "0202000000000000 0010000000000000"
        "0104000000000000 4000000000000000"
        "0000000000000000 0000000000000000"
        "0000000000000000 0000000000000000"
    )
    assert parse_notify_info(completion.result) == tuple(member.notify_entries)
    assert member.calls == [("notify_info", 0, 0)]


def test_notify_info_without_entries_is_all_end(owner: AdminOwner, member: RegisterFile) -> None:
    member.notify_entries = []
    assert run(owner, Opcode.LEGACY_NOTIFY_INFO, 64) == (Status.OK, StatusQualifier.OK, bytes(64))


# -- buffer lengths (admin.tex, Administration Virtqueues) ---------------------------------


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(b"\x00\x00", id="opcode-only-self"),
        pytest.param(b"\x00\x00\x00", id="group-low-byte-zero"),
        pytest.param(bytes(23), id="one-short"),
    ],
)
def test_command_shorter_than_its_header_reads_zeros(command: bytes) -> None:
    owner = AdminOwner()
    out = owner.execute(command, 8)
    assert out == build_completion(Status.OK, result=build_bitmap([0, 1]))  # SELF's list


def test_short_header_missing_member_id_is_member_zero(
    owner: AdminOwner, member: RegisterFile
) -> None:
    command = build_command(Opcode.LEGACY_COMMON_CFG_READ, SRIOV, 1)[:16]
    assert failed(parse_completion(owner.execute(command, 1)), StatusQualifier.INVALID_MEMBER)
    short_group = build_command(Opcode.LIST_QUERY, SRIOV, 0)[:3]  # le16 group = 0x0001
    assert parse_bitmap(parse_completion(owner.execute(short_group, 8)).result) == set(range(7))


@pytest.mark.parametrize("result_size", [0, 1, 8, 64])
def test_empty_command_is_an_invalid_command(result_size: int) -> None:
    owner = AdminOwner()
    out = owner.execute(b"", result_size)
    assert out == bytes.fromhex("1600 0100 00000000")
    assert owner.stats.malformed == 1
    assert not owner.stats.commands


def test_long_command_data_is_ignored() -> None:
    owner = AdminOwner()
    command = build_command(Opcode.LIST_QUERY, SRIOV, 0) + b"\xaa" * 40
    assert owner.execute(command, 8) == build_completion(Status.OK, result=build_bitmap(range(7)))


@pytest.mark.parametrize(
    ("opcode", "result_size", "written"),
    [
        pytest.param(Opcode.LIST_QUERY, 0, 8, id="query-no-result-buffer"),
        pytest.param(Opcode.LIST_QUERY, 4, 12, id="query-truncated"),
        pytest.param(Opcode.LIST_QUERY, 8, 16, id="query-exact"),
        pytest.param(Opcode.LIST_QUERY, 100, 16, id="query-long-buffer"),
        pytest.param(Opcode.LEGACY_NOTIFY_INFO, 16, 24, id="notify-truncated"),
        pytest.param(Opcode.LEGACY_NOTIFY_INFO, 64, 72, id="notify-exact"),
        pytest.param(Opcode.LEGACY_NOTIFY_INFO, 1000, 72, id="notify-long-buffer"),
        pytest.param(Opcode.LEGACY_COMMON_CFG_WRITE, 32, 8, id="write-long-buffer"),
    ],
)
def test_result_buffer_lengths(
    owner: AdminOwner, member: RegisterFile, opcode: Opcode, result_size: int, written: int
) -> None:
    data = build_legacy_cfg_write(18, b"\x01") if opcode == Opcode.LEGACY_COMMON_CFG_WRITE else b""
    full = owner.execute(build_command(opcode, SRIOV, 1, data), 1000)
    out = owner.execute(build_command(opcode, SRIOV, 1, data), result_size)
    # A short buffer gets a prefix of the full answer; a long one only the structure
    # (the driver reads what was not written as zero, so the answer is the same).
    assert len(out) == written
    assert out == full[:written]
    assert out == build_completion(Status.OK, result=full[8:], writable_length=8 + result_size)
    assert parse_completion(out).status == Status.OK


def test_read_width_is_the_result_buffer_size(owner: AdminOwner, member: RegisterFile) -> None:
    # A legacy read has no length field: a longer buffer is a wider, different access.
    member.common[12:14] = b"\x00\x01"
    assert run(owner, Opcode.LEGACY_COMMON_CFG_READ, 2, data=b"\x0c").result == b"\x00\x01"
    assert failed(
        run(owner, Opcode.LEGACY_COMMON_CFG_READ, 8, data=b"\x0c"), StatusQualifier.INVALID_FIELD
    )


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_execute_accepts_guest_buffer_types(
    owner: AdminOwner, member: RegisterFile, kind: type[bytes | bytearray | memoryview]
) -> None:
    command = build_command(
        Opcode.LEGACY_DEV_CFG_WRITE, SRIOV, 1, build_legacy_cfg_write(0, b"\xaa")
    )
    assert owner.execute(kind(command), 0) == bytes(8)
    assert member.calls == [("device_write", 0, b"\xaa")]
    assert type(member.calls[0][2]) is bytes


def test_negative_result_size_is_a_caller_bug(owner: AdminOwner) -> None:
    with pytest.raises(ValueError, match="negative"):
        owner.execute(build_command(Opcode.LIST_QUERY, SRIOV, 0), -1)


# -- counters --------------------------------------------------------------------------------


def test_counters(owner: AdminOwner, member: RegisterFile) -> None:
    stats = owner.stats  # the fixture's LIST_USE is already counted
    assert stats.commands[Opcode.LIST_USE] == 1
    for _ in range(3):
        run(owner, Opcode.LEGACY_COMMON_CFG_READ, 1, data=b"\x12")
    run(owner, Opcode.LEGACY_COMMON_CFG_READ, 3, data=b"\x12")
    run(owner, Opcode.LEGACY_COMMON_CFG_WRITE, data=build_legacy_cfg_write(18, b"\x01"))
    run(owner, Opcode.LEGACY_COMMON_CFG_WRITE, member=BAD_MEMBER, data=b"")
    run(owner, 0x1234, group=9)
    owner.execute(b"", 0)
    assert dict(stats.commands) == {
        Opcode.LIST_USE: 1,
        Opcode.LEGACY_COMMON_CFG_READ: 4,
        Opcode.LEGACY_COMMON_CFG_WRITE: 2,
        0x1234: 1,
    }
    assert dict(stats.statuses) == {
        (Opcode.LIST_USE, Status.OK): 1,
        (Opcode.LEGACY_COMMON_CFG_READ, Status.OK): 3,
        (Opcode.LEGACY_COMMON_CFG_READ, Status.EINVAL): 1,
        (Opcode.LEGACY_COMMON_CFG_WRITE, Status.OK): 1,
        (Opcode.LEGACY_COMMON_CFG_WRITE, Status.EINVAL): 1,
        (0x1234, Status.EINVAL): 1,
    }
    assert (stats.malformed, stats.bugs) == (1, 0)
    # what the server logs and the control socket returns: the spec's names
    assert stats.as_dict() == {
        "opcode:LIST_USE": 1,
        "opcode:LEGACY_COMMON_CFG_READ": 4,
        "opcode:LEGACY_COMMON_CFG_WRITE": 2,
        "opcode:4660": 1,  # 0x1234: no name in the spec
        "status:LIST_USE:OK": 1,
        "status:LEGACY_COMMON_CFG_READ:OK": 3,
        "status:LEGACY_COMMON_CFG_READ:EINVAL": 1,
        "status:LEGACY_COMMON_CFG_WRITE:OK": 1,
        "status:LEGACY_COMMON_CFG_WRITE:EINVAL": 1,
        "status:4660:EINVAL": 1,
        "malformed": 1,
        "bugs": 0,
    }


# -- never raises ----------------------------------------------------------------------------

COMMANDS = st.one_of(
    st.binary(max_size=64),
    st.builds(
        build_command,
        st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),  # opcode
        st.sampled_from([0, 1, 2, 0xFFFF]),  # group type
        st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1)),  # member id
        st.binary(max_size=40),
    ),
)


@settings(max_examples=500)
@given(
    commands=st.lists(st.tuples(COMMANDS, st.integers(0, 80)), min_size=1, max_size=8),
    buggy=st.booleans(),
    listed=st.booleans(),
)
def test_execute_never_raises(commands: list[tuple[bytes, int]], buggy: bool, listed: bool) -> None:
    owner = AdminOwner()
    owner.add_member(BuggyMember() if buggy else RegisterFile())
    owner.add_member(RegisterFile())
    if listed:
        list_use(owner, LINUX_LIST_USE)
    for command, result_size in commands:
        out = owner.execute(command, result_size)
        # Never more than the driver's buffer; whole 64-bit words unless cut by it.
        assert 8 <= len(out) <= 8 + result_size
        assert len(out) == 8 + result_size or len(out) % 8 == 0
        completion = parse_completion(out)
        assert (completion.status == Status.OK) == (completion.status_qualifier == 0)
    assert sum(owner.stats.commands.values()) + owner.stats.malformed == len(commands) + listed
