"""The owner side of virtio group administration commands (the PF end of an admin virtqueue).

Sources: virtio spec admin.tex ("Group administration commands" and its device-normative
part, "Administration Virtqueues"), admin-cmds-legacy-interface.tex; Linux
drivers/virtio/virtio_pci_admin_legacy_io.c and drivers/vfio/pci/virtio/legacy_io.c (the
driver whose behaviour the transitional profile reproduces).

One :class:`AdminOwner` per server process owns an SR-IOV group whose members are the
devices it serves. The transitional profile turns every legacy IO BAR0 register access of
a member into one admin command and runs it through :meth:`AdminOwner.execute`, exactly as
the bytes would sit in an admin virtqueue buffer; the owner validates the command and
hands the register access to the member through the :class:`LegacyMember` interface.

This is the hot path of every legacy register access, so the header and the legacy data
are unpacked with the precomputed :class:`struct.Struct` objects of
:mod:`vfuserver.protocol.virtio_admin`, dispatch is one dict lookup per validation step,
and failures travel as :class:`AdminCommandError` (free in CPython 3.11 until raised).
"""

from __future__ import annotations

import logging
import traceback
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeAlias

from vfuserver.devices.errors import GuestError
from vfuserver.devices.virtio import RateLimitedLog
from vfuserver.protocol.fields import name_or_number
from vfuserver.protocol.virtio_admin import (
    CMD_HEADER,
    CMD_HEADER_SIZE,
    CMD_STATUS,
    LEGACY_CFG_READ,
    LEGACY_CFG_WRITE_HEADER,
    LEGACY_CFG_WRITE_HEADER_SIZE,
    LIST_OPCODES,
    BytesLike,
    GroupType,
    NotifyInfoEntry,
    Opcode,
    Status,
    StatusQualifier,
    build_bitmap,
    build_completion,
    build_notify_info,
    fit,
    parse_bitmap,
)

__all__ = ["AdminCommandError", "AdminOwner", "AdminStats", "LegacyMember"]

_log = logging.getLogger(__name__)


class LegacyMember(Protocol):
    """What a member device offers its owner for the legacy interface commands.

    Offsets are relative to the legacy common header (0..19, or 0..23 while the member's
    MSI-X is enabled) or to the device-specific area; values are little-endian whatever the
    guest (admin-cmds-legacy-interface.tex). An access that is not a single field or not
    completely inside its area raises :class:`GuestError` ("the device MUST fail the
    command"), before any side effect.
    """

    def legacy_common_read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the legacy common header at ``offset`` (reading ISR clears it)."""
        ...

    def legacy_common_write(self, offset: int, data: bytes) -> None:
        """Write ``data`` into the legacy common header at ``offset``."""
        ...

    def legacy_device_read(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device-specific configuration at ``offset``."""
        ...

    def legacy_device_write(self, offset: int, data: bytes) -> None:
        """Write ``data`` into the device-specific configuration at ``offset``."""
        ...

    def legacy_notify_info(self) -> list[NotifyInfoEntry]:
        """Up to three notification addresses, preferred first (LEGACY_NOTIFY_INFO)."""
        ...


class AdminCommandError(GuestError):
    """An admin command the owner refuses; completes with ``status`` and ``qualifier``.

    ``errno`` is the status, since admin status values are Linux errno numbers
    (admin.tex). A member may raise it to choose the status itself; any other
    :class:`GuestError` from a member completes as EINVAL / Q_INVALID_FIELD.
    """

    def __init__(
        self,
        message: str,
        qualifier: StatusQualifier,
        *,
        status: Status = Status.EINVAL,
    ) -> None:
        super().__init__(message, errno=status)
        self.status = status
        self.qualifier = qualifier


@dataclass(slots=True)
class AdminStats:
    """Counters for tests and benchmarks; keys are the raw header values (an
    :class:`Opcode` or :class:`Status` member looks up the same entry as its int).

    ``defaultdict(int)`` rather than ``Counter``: absent keys read as 0 (and are then
    inserted), at less than half the cost per update on the hot path (Counter is a
    pure-Python dict subclass).
    """

    commands: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    """Commands by opcode, whatever their outcome (not the empty ones)."""
    statuses: defaultdict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))
    """Completions by ``(opcode, status)``."""
    malformed: int = 0
    """Empty device-readable parts: no header at all, so no opcode to count them under."""
    bugs: int = 0
    """Unexpected exceptions while executing (member or owner bugs), logged rate-limited."""

    def as_dict(self) -> dict[str, int]:
        """The counters as the server logs them and the control socket returns them,
        named as the spec names opcodes and statuses (VIRTIO_ADMIN_CMD_*, admin.tex's
        status table): ``opcode:LEGACY_COMMON_CFG_READ``,
        ``status:LEGACY_COMMON_CFG_READ:OK``; a value the spec does not name shows as
        its number."""
        # copy(): one C call that runs no Python code, while serving threads may add keys;
        # list(items()) allocates a tuple per item, and a garbage collection that runs
        # a finalizer there can let another thread in (dictionary changed size)
        out = {f"opcode:{name_or_number(Opcode, op)}": n
               for op, n in self.commands.copy().items()}
        out.update({f"status:{name_or_number(Opcode, op)}:{name_or_number(Status, st)}": n
                    for (op, st), n in self.statuses.copy().items()})
        out["malformed"] = self.malformed
        out["bugs"] = self.bugs
        return out


_GroupHandler: TypeAlias = Callable[[BytesLike, int], bytes]
"""A command about the group itself: ``(command_specific_data, result_size) -> result``."""
_MemberHandler: TypeAlias = Callable[[LegacyMember, BytesLike, int], bytes]
"""A command for one member, already looked up from ``group_member_id``.

Both kinds fail by raising :class:`AdminCommandError` (or a member's :class:`GuestError`).
"""

_OK = int(Status.OK)  # a plain int: an enum attribute lookup costs more on the hot path
_OK_STATUS = CMD_STATUS.pack(Status.OK, StatusQualifier.OK)


class _Group:
    """One group type of the owner: its supported commands and the list in use.

    admin.tex: "commands for each group type MUST operate independently of each other",
    including LIST_QUERY / LIST_USE.
    """

    __slots__ = (
        "enabled",
        "enabled_member",
        "group_commands",
        "group_type",
        "in_use",
        "member_commands",
        "query_result",
    )

    def __init__(self, group_type: GroupType, member_commands: Mapping[int, _MemberHandler]):
        self.group_type = group_type
        # LIST_QUERY / LIST_USE do not use group_member_id ("unused. It is set to zero by
        # driver"), so they are dispatched without a member lookup.
        self.group_commands: dict[int, _GroupHandler] = {
            Opcode.LIST_QUERY: self.list_query,
            Opcode.LIST_USE: self.list_use,
        }
        self.member_commands = dict(member_commands)
        # Bits 0 and 1 are "always set" in the LIST_QUERY result (admin.tex).
        self.query_result = build_bitmap(self.supported)
        self.in_use: frozenset[int] = LIST_OPCODES
        self.enabled: dict[int, _GroupHandler] = {}
        self.enabled_member: dict[int, _MemberHandler] = {}
        self.reset()

    @property
    def supported(self) -> frozenset[int]:
        return frozenset(self.group_commands.keys() | self.member_commands.keys())

    def reset(self) -> None:
        # "After reset ... the device MUST assume that the list of legal commands used by
        # the driver consists of the two commands LIST_QUERY and LIST_USE" (admin.tex).
        self._use(LIST_OPCODES)

    def _use(self, opcodes: frozenset[int]) -> None:
        self.in_use = opcodes
        # LIST_QUERY / LIST_USE stay executable even when LIST_USE leaves them out. The
        # spec lets a driver block them that way, and Linux leaves both bits out
        # (virtio_pci_admin_cmd_list_init sends the query result & VIRTIO_ADMIN_CMD_BITMAP).
        # A real PF reverts to {0, 1} on the reset that precedes Linux running the pair
        # again; this owner has no reset a driver triggers, so a driver re-running its
        # list setup (say, for a new member) would otherwise be locked out for good.
        self.enabled = self.group_commands
        self.enabled_member = {
            opcode: handler for opcode, handler in self.member_commands.items() if opcode in opcodes
        }

    def list_query(self, data: BytesLike, result_size: int) -> bytes:
        # No command data; the result is the le64[] bitmap of supported opcodes.
        return self.query_result

    def list_use(self, data: BytesLike, result_size: int) -> bytes:
        # The data is a le64[] bitmap, possibly with extra zero words (admin.tex); a partial
        # trailing word reads zero-extended, as missing bytes do.
        opcodes = parse_bitmap(data)
        unsupported = opcodes - self.supported
        if unsupported:
            # "If the device does not support the command list used by the driver ...
            # EINVAL and Q_INVALID_FIELD"; EINVAL means no side effects, so the list in
            # use stays as it was.
            raise AdminCommandError(
                f"LIST_USE of unsupported opcodes {sorted(unsupported)} for group "
                f"{self.group_type.name}",
                StatusQualifier.INVALID_FIELD,
            )
        self._use(opcodes)
        return b""


class AdminOwner:
    """Executes group administration commands for the members of its SR-IOV group.

    Member ids start at 1 (SR-IOV VF numbers are 1-based) and are never reused while the
    owner lives, so a command for a removed member fails with Q_INVALID_MEMBER instead of
    reaching a newer device. The SELF group (type 0) supports LIST_QUERY / LIST_USE only.
    """

    def __init__(self) -> None:
        self._members: dict[int, LegacyMember] = {}
        self._next_member_id = 1
        self.stats = AdminStats()
        self._bug_log = RateLimitedLog(_log)
        self._groups: dict[int, _Group] = {
            GroupType.SELF: _Group(GroupType.SELF, {}),
            # The legacy commands "are currently only defined for the SR-IOV group type".
            GroupType.SRIOV: _Group(
                GroupType.SRIOV,
                {
                    Opcode.LEGACY_COMMON_CFG_WRITE: _legacy_common_cfg_write,
                    Opcode.LEGACY_COMMON_CFG_READ: _legacy_common_cfg_read,
                    Opcode.LEGACY_DEV_CFG_WRITE: _legacy_dev_cfg_write,
                    Opcode.LEGACY_DEV_CFG_READ: _legacy_dev_cfg_read,
                    Opcode.LEGACY_NOTIFY_INFO: _legacy_notify_info,
                },
            ),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} members={sorted(self._members)}>"

    # -- membership ----------------------------------------------------------------------

    def add_member(self, member: LegacyMember) -> int:
        """Make ``member`` part of the SR-IOV group; returns its (never reused) member id."""
        if any(existing is member for existing in self._members.values()):
            raise ValueError(f"{member!r} is already a member")
        member_id = self._next_member_id
        self._next_member_id += 1
        self._members[member_id] = member
        return member_id

    def remove_member(self, member_id: int) -> None:
        """Drop a member; later commands for its id fail with Q_INVALID_MEMBER.

        Raises :class:`KeyError` for an id that is not (or no longer) a member.
        """
        del self._members[member_id]

    @property
    def members(self) -> Mapping[int, LegacyMember]:
        """Current members by id (read-only view)."""
        return MappingProxyType(self._members)

    # -- command lists -------------------------------------------------------------------

    def supported_opcodes(self, group_type: GroupType) -> frozenset[int]:
        """What LIST_QUERY reports for ``group_type``."""
        return self._groups[group_type].supported

    def opcodes_in_use(self, group_type: GroupType) -> frozenset[int]:
        """The list set by the last successful LIST_USE ({LIST_QUERY, LIST_USE} before).

        LIST_QUERY and LIST_USE themselves are executable whether or not they are in it.
        """
        return self._groups[group_type].in_use

    def reset(self) -> None:
        """Owner reset: every group's list in use reverts to {LIST_QUERY, LIST_USE}."""
        for group in self._groups.values():
            group.reset()

    # -- execution -----------------------------------------------------------------------

    def execute(self, command: BytesLike, result_size: int) -> bytes:
        """Run one admin command and return what the owner writes back.

        ``command`` is the device-readable part (24-byte header + command-specific data);
        ``result_size`` the size of the command-specific result buffer, i.e. the
        device-writable part minus its 8-byte status. Returns the device-writable part
        (status, status_qualifier, reserved, result) as :func:`build_completion` sizes it
        for a writable buffer of ``8 + result_size`` bytes.

        Never raises for anything in ``command`` nor for anything a member does; a
        negative ``result_size`` (a caller bug) raises :class:`ValueError`.
        """
        if result_size < 0:
            raise ValueError(f"negative admin result size {result_size}")
        if len(command) >= CMD_HEADER_SIZE:
            opcode, group_type, member_id = CMD_HEADER.unpack_from(command)
            data = command[CMD_HEADER_SIZE:]
        elif command:
            # Short buffers: "acting as if any data that would be read outside the
            # device-readable buffers is set to zero" (admin.tex, Administration Virtqueues).
            opcode, group_type, member_id = CMD_HEADER.unpack(fit(command, CMD_HEADER_SIZE))
            data = b""
        else:
            # Drivers "MUST supply both device-readable or device-writeable parts ... larger
            # than zero in length": with no header there is no command to answer.
            self.stats.malformed += 1
            return build_completion(
                Status.EINVAL,
                StatusQualifier.INVALID_COMMAND,
                writable_length=CMD_STATUS.size + result_size,
            )

        stats = self.stats
        stats.commands[opcode] += 1
        try:
            # Validation order of admin.tex (device normative): group_type, then opcode,
            # then group_member_id "if ... used by the specific command".
            group = self._groups.get(group_type)
            if group is None:
                raise AdminCommandError(
                    f"group type {group_type} not supported", StatusQualifier.INVALID_GROUP
                )
            member_handler = group.enabled_member.get(opcode)
            if member_handler is not None:
                member = self._members.get(member_id)
                if member is None:
                    # SR-IOV: "if group_member_id is not between 1 and NumVFs inclusive
                    # ... Q_INVALID_MEMBER"; removed members' ids stay invalid.
                    raise AdminCommandError(
                        f"no member {member_id}", StatusQualifier.INVALID_MEMBER
                    )
                result = member_handler(member, data, result_size)
            else:
                group_handler = group.enabled.get(opcode)
                if group_handler is None:
                    # Unknown, unsupported for this group, or not enabled by LIST_USE: "MUST
                    # fail any commands not in the list with ... Q_INVALID_OPCODE".
                    raise AdminCommandError(
                        f"opcode {opcode:#x} not in use for group {group.group_type.name}",
                        StatusQualifier.INVALID_OPCODE,
                    )
                result = group_handler(data, result_size)
        except AdminCommandError as exc:
            status, qualifier = exc.status, exc.qualifier
            _log.debug("admin opcode %#x member %d: %s", opcode, member_id, exc)
        except GuestError as exc:
            # admin-cmds-legacy-interface.tex: the device "MUST fail the command" when
            # offset and length "do not refer to a single field or are not completely
            # within" the area; Q_INVALID_FIELD names the offending command data.
            status, qualifier = Status.EINVAL, StatusQualifier.INVALID_FIELD
            _log.debug("admin opcode %#x member %d refused: %s", opcode, member_id, exc)
        except Exception:
            # A bug in a member (or here): answer the command, never crash the server.
            # Rate-limited, since a guest can repeat the access that triggers it.
            stats.bugs += 1
            status, qualifier = Status.EINVAL, StatusQualifier.INVALID_COMMAND
            self._bug_log.log(
                logging.ERROR,
                "admin opcode %#x for member %d failed unexpectedly:\n%s",
                opcode,
                member_id,
                traceback.format_exc(),
            )
        else:
            stats.statuses[(opcode, _OK)] += 1
            if len(result) == result_size:
                # The common case (a legacy read of the width Linux asked for, or a write
                # with no result): the completion is exactly status + result.
                return _OK_STATUS + result
            return build_completion(
                Status.OK,
                StatusQualifier.OK,
                result,
                writable_length=CMD_STATUS.size + result_size,
            )
        stats.statuses[(opcode, status)] += 1
        return build_completion(status, qualifier, writable_length=CMD_STATUS.size + result_size)


# -- legacy interface commands (admin-cmds-legacy-interface.tex) ---------------------------
# Each is one short function with its checks inlined: together they are every legacy
# register access but the queue notify.


def _legacy_common_cfg_write(member: LegacyMember, data: BytesLike, result_size: int) -> bytes:
    # Data: offset u8, reserved[7], data[]; "the length of the data to write is simply the
    # length of data". Up to 8 bytes of data (missing bytes are zero) writes nothing,
    # which is not a single field.
    if len(data) <= LEGACY_CFG_WRITE_HEADER_SIZE:
        raise AdminCommandError("legacy cfg write of no data", StatusQualifier.INVALID_FIELD)
    (offset,) = LEGACY_CFG_WRITE_HEADER.unpack_from(data)
    member.legacy_common_write(offset, bytes(data[LEGACY_CFG_WRITE_HEADER_SIZE:]))
    return b""


def _legacy_dev_cfg_write(member: LegacyMember, data: BytesLike, result_size: int) -> bytes:
    if len(data) <= LEGACY_CFG_WRITE_HEADER_SIZE:
        raise AdminCommandError("legacy cfg write of no data", StatusQualifier.INVALID_FIELD)
    (offset,) = LEGACY_CFG_WRITE_HEADER.unpack_from(data)
    member.legacy_device_write(offset, bytes(data[LEGACY_CFG_WRITE_HEADER_SIZE:]))
    return b""


def _legacy_common_cfg_read(member: LegacyMember, data: BytesLike, result_size: int) -> bytes:
    # Data: offset u8 (zero when missing); the read length is the result buffer's length.
    if not result_size:
        raise AdminCommandError("legacy cfg read of no data", StatusQualifier.INVALID_FIELD)
    offset = LEGACY_CFG_READ.unpack_from(data)[0] if data else 0
    value = member.legacy_common_read(offset, result_size)
    if len(value) != result_size:
        raise _short_read(value, result_size)
    return value


def _legacy_dev_cfg_read(member: LegacyMember, data: BytesLike, result_size: int) -> bytes:
    if not result_size:
        raise AdminCommandError("legacy cfg read of no data", StatusQualifier.INVALID_FIELD)
    offset = LEGACY_CFG_READ.unpack_from(data)[0] if data else 0
    value = member.legacy_device_read(offset, result_size)
    if len(value) != result_size:
        raise _short_read(value, result_size)
    return value


def _legacy_notify_info(member: LegacyMember, data: BytesLike, result_size: int) -> bytes:
    # No command data. The 64-byte result always ends with an END entry (flags 0);
    # build_notify_info rejects a member list that breaks the rules (a member bug).
    return build_notify_info(member.legacy_notify_info())


def _short_read(value: bytes, size: int) -> RuntimeError:
    return RuntimeError(f"member returned {len(value)} bytes for a {size}-byte read")
