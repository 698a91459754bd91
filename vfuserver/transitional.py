"""The transitional presentation: what Linux's virtio-vfio-pci does for hardware VFs.

Chosen once, when a device is built with the transitional profile, this component wraps
the modern function (drivers/vfio/pci/virtio/legacy_io.c, its probe-time ops table):

* config space: device ID 0x1000, revision 0, subsystem 1af4:0001 and an emulated IO
  BAR0 are laid over the modern function's config space byte-wise (partial and unaligned
  reads come out right); the PCI_COMMAND IO bit and BAR0 are shadowed, the IO bit is
  cleared on reset (``virtiovf_pci_read_config/write_config``, ``reset_done``);
* BAR0, an IO region of the smallest power of two >= 24 + 8 bytes: IO decode off -> EIO,
  beyond the BAR -> EINVAL, offset 16 with 2 bytes -> a queue notify on the fast path (a
  write to the member's notify address from LEGACY_NOTIFY_INFO, no admin command), every
  other access -> exactly one virtio admin command executed by the group owner
  (``virtiovf_pci_bar0_rw``, ``virtiovf_issue_legacy_rw_cmd``).

Whether the device config starts at 20 or 24 follows MSI-X being enabled. The kernel
looks at the interrupt type userspace set through VFIO_DEVICE_SET_IRQS; libvfio-user
does not tell its server which type the client set, so this reads the MSI-X Enable bit
of the function's config space, which QEMU writes through to the device right before it
sends the matching SET_IRQS (hw/vfio/pci.c ``vfio_pci_write_config``).
"""

from __future__ import annotations

import errno
from collections import defaultdict
from dataclasses import dataclass, field

from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.errors import GuestError, HostError
from vfuserver.devices.legacy import LEGACY_DEVICE_CONFIG_BYTES, LegacyInterface
from vfuserver.devices.pci import (
    Bar,
    BarKind,
    Interrupts,
    Region,
    ResetKind,
    intersect,
    overlay_ranges,
)
from vfuserver.devices.virtio_pci import Layout, VirtioPciFunction
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import virtio_admin as admin
from vfuserver.protocol import virtio_legacy as legacy
from vfuserver.protocol import virtio_pci as vpci
from vfuserver.protocol.virtio import DeviceType

TRANSITIONAL_REVISION = legacy.ABI_VERSION  # "Transitional needs to have revision 0"
BAR0_SIZE = legacy.bar0_size(LEGACY_DEVICE_CONFIG_BYTES)
NOTIFY_OFFSET = legacy.Register.QUEUE_NOTIFY
LEGACY_OPCODES = frozenset(admin.LEGACY_OPCODES)

_IO = int(pcifmt.Command.IO)  # plain ints on the hot path: IntFlag ops cost µs
_COMMAND = pcifmt.Offset.COMMAND
_BAR0 = pcifmt.Offset.BASE_ADDRESS_0
_PACK_HEADER = admin.CMD_HEADER.pack
_PACK_READ = admin.LEGACY_CFG_READ.pack
_PACK_WRITE = admin.LEGACY_CFG_WRITE_HEADER.pack
_UNPACK_STATUS = admin.CMD_STATUS.unpack_from
_STATUS_SIZE = admin.CMD_STATUS_SIZE
_SRIOV = admin.GroupType.SRIOV
_COMMON_READ = admin.Opcode.LEGACY_COMMON_CFG_READ
_COMMON_WRITE = admin.Opcode.LEGACY_COMMON_CFG_WRITE
_DEVICE_READ = admin.Opcode.LEGACY_DEV_CFG_READ
_DEVICE_WRITE = admin.Opcode.LEGACY_DEV_CFG_WRITE


@dataclass
class LegacyStats:
    """Counters of the legacy path, readable by tests, benchmarks and the control plane."""

    accesses: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """BAR0 accesses by register (``read:STATUS``, ``write:device-config``, ...)."""
    fast_notifies: int = 0
    """QUEUE_NOTIFY writes that took the fast path."""
    refused: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Accesses refused before reaching the owner, by reason."""

    def as_dict(self) -> dict[str, int]:
        out = {f"access:{k}": v for k, v in self.accesses.items()}
        out.update({f"refused:{k}": v for k, v in self.refused.items()})
        out["fast_notifies"] = self.fast_notifies
        return out


class TransitionalFunction:
    """A modern virtio function presented as a transitional one (see the module doc)."""

    def __init__(self, modern: VirtioPciFunction, owner: AdminOwner) -> None:
        self.modern = modern
        self.name = modern.name
        self.config = modern.config
        self.msix_vectors = modern.msix_vectors
        self.intx = modern.intx
        self.owner = owner
        self.stats = LegacyStats()
        self.member = LegacyInterface(modern.transport, notify_bar=4,
                                      notify_offset=Layout.NOTIFY)
        self.member_id = owner.add_member(self.member)
        self._pci_cmd = 0
        self._bar0 = 0
        self._modern_config = modern.config_region()
        self._enable_legacy_commands()
        self._notify_region = self._notify_location()
        self.bar0 = LegacyBar0(self)

    # -- set-up, as the kernel's virtiovf_init_legacy_io -------------------------------

    def _enable_legacy_commands(self) -> None:
        """LIST_QUERY, then LIST_USE of the legacy opcodes (the PF driver's
        virtio_pci_admin_cmd_list_init); refuse to present a device the owner cannot serve."""
        result = self._admin(admin.Opcode.LIST_QUERY, b"", 8, member_id=0)
        supported = admin.parse_bitmap(result)
        if not supported >= LEGACY_OPCODES:
            raise HostError("the admin owner does not support the legacy commands")
        self._admin(admin.Opcode.LIST_USE, admin.build_bitmap(supported & (
            LEGACY_OPCODES | set(admin.LIST_OPCODES))), 0, member_id=0)

    def _notify_location(self) -> tuple[Region, int]:
        """LEGACY_NOTIFY_INFO: the first entry in the member's own BAR
        (virtiovf_read_notify_info); the fast path writes the queue index there."""
        result = self._admin(admin.Opcode.LEGACY_NOTIFY_INFO, b"",
                             admin.NOTIFY_INFO_ENTRIES * admin.NOTIFY_INFO_ENTRY_SIZE)
        for entry in admin.parse_notify_info(result):
            if entry.flags == admin.NotifyInfoFlags.MEMBER_DEVICE:
                bar = {b.index: b for b in self.modern.bars()}.get(entry.bar)
                if bar is None or entry.offset + 2 > bar.size:
                    break
                return bar.region, entry.offset
        raise HostError("LEGACY_NOTIFY_INFO names no usable notify address of the member")

    def _admin(self, opcode: int, data: bytes, result_size: int, *,
               member_id: int | None = None) -> bytes:
        member = self.member_id if member_id is None else member_id
        reply = self.owner.execute(_PACK_HEADER(opcode, _SRIOV, member) + data, result_size)
        status, qualifier = _UNPACK_STATUS(reply)
        if status != admin.Status.OK:
            raise HostError(f"admin command {opcode:#x} failed: status {status}, "
                            f"qualifier {qualifier}")
        return reply[_STATUS_SIZE : _STATUS_SIZE + result_size]

    # -- PciFunction --------------------------------------------------------------------

    def bars(self) -> list[Bar]:
        return [Bar(0, BAR0_SIZE, BarKind.IO, self.bar0), *self.modern.bars()]

    def config_region(self) -> Region:
        return _TransitionalConfig(self)

    def attach_interrupts(self, interrupts: Interrupts) -> None:
        self.modern.attach_interrupts(interrupts)

    def reset(self, kind: ResetKind) -> None:
        self.modern.reset(kind)
        self._pci_cmd = 0  # virtiovf_legacy_io_reset_done: IO decode is off after reset

    def close(self) -> None:
        """Leave the owner's group (idempotent)."""
        if self.member_id in self.owner.members:
            self.owner.remove_member(self.member_id)

    def counters(self) -> dict[str, dict[str, int]]:
        """Legacy accesses by register and fast notifies; the owner's admin commands by
        opcode and by (opcode, status)."""
        owner = self.owner.stats
        admin_counts = {f"opcode:{op}": n for op, n in owner.commands.items()}
        admin_counts.update({f"status:{op}:{st}": n for (op, st), n in owner.statuses.items()})
        return {"legacy": self.stats.as_dict(), "admin": admin_counts}

    # -- what the overlay presents -------------------------------------------------------

    @property
    def io_enabled(self) -> bool:
        return bool(self._pci_cmd & _IO)

    def msix_enabled(self) -> bool:
        return self.modern.transport.msix_enabled()

    def _overlay(self, command: int) -> dict[int, bytes]:
        bar0 = (self._bar0 & ~(BAR0_SIZE - 1) & 0xFFFFFFFF) | pcifmt.BAR_SPACE_IO
        command = (command & ~_IO) | (self._pci_cmd & _IO)
        return {
            pcifmt.Offset.DEVICE_ID: vpci.TransitionalDeviceId.NET.to_bytes(2, "little"),
            _COMMAND: command.to_bytes(2, "little"),
            pcifmt.Offset.REVISION_ID: bytes([TRANSITIONAL_REVISION]),
            _BAR0: bar0.to_bytes(4, "little"),
            pcifmt.Offset.SUBSYSTEM_VENDOR_ID: vpci.VENDOR_ID.to_bytes(2, "little"),
            pcifmt.Offset.SUBSYSTEM_ID: DeviceType.NET.to_bytes(2, "little"),
        }


class _TransitionalConfig:
    """Config space reads patched by the overlay; writes shadowed, then passed through."""

    def __init__(self, function: TransitionalFunction) -> None:
        self.fn = function

    def read(self, offset: int, size: int) -> bytes:
        data = bytearray(self.fn._modern_config.read(offset, size))
        overlay = self.fn._overlay(self.fn.config.command)
        for position, value in overlay_ranges(offset, size, overlay):
            data[position : position + len(value)] = value
        return bytes(data)

    def write(self, offset: int, data: bytes) -> None:
        fn = self.fn
        shadows = {_COMMAND: fn._pci_cmd.to_bytes(2, "little"),
                   _BAR0: fn._bar0.to_bytes(4, "little")}
        for field_start, current in shadows.items():
            overlap = intersect(offset, len(data), field_start, len(current))
            if overlap is None:
                continue
            at, pos, length = overlap
            value = bytearray(current)
            value[pos : pos + length] = data[at : at + length]
            if field_start == _COMMAND:
                fn._pci_cmd = int.from_bytes(value, "little")
            else:
                fn._bar0 = int.from_bytes(value, "little")
        fn._modern_config.write(offset, data)  # and to the device, as vfio_pci_core_write


class LegacyBar0:
    """The emulated IO BAR0: access rules of virtiovf_pci_bar0_rw (see the module doc)."""

    def __init__(self, function: TransitionalFunction) -> None:
        self.fn = function
        self.owner = function.owner
        self.member_id = function.member_id
        self.stats = function.stats
        self.accesses = function.stats.accesses
        self.notify_region, self.notify_offset = function._notify_region

    def read(self, offset: int, size: int) -> bytes:
        if self._notify_access(offset, size, "read"):
            self.accesses["read:QUEUE_NOTIFY"] += 1
            return self.notify_region.read(self.notify_offset, 2)
        common, area_offset, name = self._locate(offset)
        self.accesses["read:" + name] += 1
        opcode = _COMMON_READ if common else _DEVICE_READ
        return self._execute(opcode, _PACK_READ(area_offset), size)

    def write(self, offset: int, data: bytes) -> None:
        if self._notify_access(offset, len(data), "write"):
            # the fast path: the queue index goes straight to the member's notify address
            self.stats.fast_notifies += 1
            self.notify_region.write(self.notify_offset, data)
            return
        common, area_offset, name = self._locate(offset)
        self.accesses["write:" + name] += 1
        opcode = _COMMON_WRITE if common else _DEVICE_WRITE
        self._execute(opcode, _PACK_WRITE(area_offset) + data, 0)

    def _notify_access(self, offset: int, size: int, verb: str) -> bool:
        """The kernel's first checks: IO decode (EIO), then offset 16 = QUEUE_NOTIFY,
        which must be 2 bytes wide and takes the fast path."""
        if not self.fn._pci_cmd & _IO:
            self.stats.refused["io-decode-off"] += 1
            raise GuestError(f"legacy BAR0 {verb} while IO decode is off", errno=errno.EIO)
        if offset != NOTIFY_OFFSET:
            return False
        if size != 2:
            self.stats.refused["notify-width"] += 1
            raise GuestError(f"QUEUE_NOTIFY {verb} of {size} bytes")
        return True

    def _locate(self, offset: int) -> tuple[bool, int, str]:
        """(common header?, offset in that area, counter name): the device config starts
        at 24 while MSI-X is enabled, else at 20 (only the start offset decides)."""
        start = legacy.config_offset(self.fn.modern.transport.msix_enabled())
        if offset < start:
            return True, offset, _REGISTER_NAMES.get(offset, "common")
        return False, offset - start, "device-config"

    def _execute(self, opcode: int, data: bytes, result_size: int) -> bytes:
        """One admin command for one access; its status becomes the access's errno."""
        reply = self.owner.execute(_PACK_HEADER(opcode, _SRIOV, self.member_id) + data,
                                   result_size)
        status = _UNPACK_STATUS(reply)[0]
        if status:
            raise GuestError(f"legacy access refused by the owner: admin status {status}",
                             errno=status)
        return reply[_STATUS_SIZE : _STATUS_SIZE + result_size]


_REGISTER_NAMES = {int(reg): reg.name for reg in legacy.Register}
