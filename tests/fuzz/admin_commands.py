"""Fuzz target 3: virtio group administration commands into the owner (devices/admin.py).

Each input is a sequence of commands, each executed by :meth:`AdminOwner.execute` as the
bytes would sit in an admin virtqueue buffer, on an owner with two transitional members
(ids 1 and 2). Opcode, group type and member id are taken raw or steered to known values
(a flag byte per command), the header may be cut short, the result buffer has any size.
Every answer must be a defined admin status: a completion no longer than the writable
buffer, with a status and qualifier the spec defines (qualifier OK exactly when status is
OK), and no command counted as an unexpected failure (AdminStats.bugs).
"""

from __future__ import annotations

from tests.fuzz.harness import ByteReader, Finding
from tests.fuzz.rig import FuzzRig
from vfuserver.devices.admin import AdminOwner
from vfuserver.protocol import virtio_admin as admin
from vfuserver.protocol.virtio_admin import CMD_HEADER, CMD_HEADER_SIZE, CMD_STATUS_SIZE

OPCODES = tuple(int(op) for op in admin.Opcode)
GROUPS = tuple(int(group) for group in admin.GroupType)
STATUSES = frozenset(int(status) for status in admin.Status)
QUALIFIERS = frozenset(int(qualifier) for qualifier in admin.StatusQualifier)

STEER_OPCODE, STEER_GROUP, STEER_MEMBER, CUT_HEADER, OWNER_RESET = 1, 2, 4, 8, 0x80
"""Flag bits of a command's first byte."""


class AdminTarget:
    def __init__(self) -> None:
        self.owner = AdminOwner()
        self.members = [FuzzRig(self.owner), FuzzRig(self.owner)]

    def __call__(self, data: bytes) -> None:
        for member in self.members:
            member.restore()
        reader = ByteReader(data)
        while reader.remaining:
            self.command(reader)
        self.members[0].check_owner()

    def command(self, reader: ByteReader) -> None:
        """Input: flags u8, opcode u16, group u16, member u64, result size u16, data
        length u8 and data, then (CUT_HEADER) the header length u8."""
        flags = reader.u8()
        if flags & OWNER_RESET:
            self.owner.reset()
        opcode, group, member = reader.u16(), reader.u16(), reader.u64()
        if flags & STEER_OPCODE:
            opcode = OPCODES[opcode % len(OPCODES)]
        if flags & STEER_GROUP:
            group = GROUPS[group % len(GROUPS)]
        if flags & STEER_MEMBER:
            member %= len(self.members) + 2
        result_size = reader.u16() % 1024
        command = CMD_HEADER.pack(opcode, group, member) + reader.take(reader.u8())
        if flags & CUT_HEADER:
            command = command[: reader.u8() % CMD_HEADER_SIZE]
        reply = self.owner.execute(command, result_size)
        check_completion(reply, result_size)

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        """LIST_QUERY, LIST_USE and every legacy command as the transitional function
        issues them, and a few malformed ones."""
        steer = STEER_OPCODE | STEER_GROUP | STEER_MEMBER

        def cmd(opcode: int, group: int, member: int, result: int, data: bytes = b"",
                flags: int = steer) -> bytes:
            opcode_field = OPCODES.index(opcode) if flags & STEER_OPCODE else opcode
            group_field = GROUPS.index(group) if flags & STEER_GROUP else group
            return (bytes([flags]) + opcode_field.to_bytes(2, "little")
                    + group_field.to_bytes(2, "little") + member.to_bytes(8, "little")
                    + result.to_bytes(2, "little") + bytes([len(data)]) + data)

        op, sriov, own = admin.Opcode, admin.GroupType.SRIOV, admin.GroupType.SELF
        lists = cmd(op.LIST_QUERY, sriov, 0, 8) + cmd(op.LIST_USE, sriov, 0, 0, bytes([0x7F]))
        legacy = (cmd(op.LEGACY_COMMON_CFG_READ, sriov, 1, 4, b"\0")
                  + cmd(op.LEGACY_COMMON_CFG_WRITE, sriov, 1, 0, b"\x12" + bytes(7) + b"\x01")
                  + cmd(op.LEGACY_DEV_CFG_READ, sriov, 2, 6, b"\0")
                  + cmd(op.LEGACY_DEV_CFG_WRITE, sriov, 2, 0, bytes(8) + b"\x52")
                  + cmd(op.LEGACY_NOTIFY_INFO, sriov, 1, 4 * 16))
        return {
            "lists": lists,
            "legacy": legacy,
            "self-group": cmd(op.LIST_QUERY, own, 0, 8) + cmd(op.LIST_USE, own, 0, 0, b"\3"),
            "raw": cmd(0x7FFF, 0xFFFF, 1 << 63, 3, b"", 0),
            "short-header": cmd(op.LIST_QUERY, sriov, 0, 8, b"", steer | CUT_HEADER) + b"\x05",
            "owner-reset": cmd(op.LEGACY_COMMON_CFG_READ, sriov, 1, 4, b"\0", steer | OWNER_RESET),
        }


def check_completion(reply: bytes, result_size: int) -> None:
    """A completion must fit the writable buffer and carry a defined status."""
    if len(reply) > CMD_STATUS_SIZE + result_size:
        raise Finding(f"completion of {len(reply)} bytes for a {result_size}-byte result")
    status, qualifier = admin.CMD_STATUS.unpack(reply[:CMD_STATUS_SIZE].ljust(CMD_STATUS_SIZE,
                                                                             b"\0"))
    if status not in STATUSES or qualifier not in QUALIFIERS:
        raise Finding(f"undefined admin status {status} / qualifier {qualifier}")
    if (status == admin.Status.OK) != (qualifier == admin.StatusQualifier.OK):
        raise Finding(f"status {status} with qualifier {qualifier}")
