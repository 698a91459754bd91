"""The transitional presentation: what Linux's virtio-vfio-pci does for hardware VFs.

Chosen once, when a device is built with the transitional profile, this component wraps
the modern function (drivers/vfio/pci/virtio/legacy_io.c, its probe-time ops table):

* config space: the transitional device ID of the device's type (0x1000 for net, 0x1001
  for block), revision 0, subsystem 1af4:<type> and an emulated IO
  BAR0 are laid over the modern function's config space byte-wise (partial and unaligned
  reads come out right); the PCI_COMMAND IO bit and BAR0 live in one :class:`LegacyIoShadow`
  that the config overlay writes and BAR0 reads, cleared on reset
  (``virtiovf_pci_read_config/write_config``, ``virtiovf_legacy_io_reset_done``);
* BAR0, an IO region of the smallest power of two >= 24 + the device's legacy config
  size (8 bytes for net, as the kernel sizes it): IO decode off -> EIO,
  beyond the BAR -> EINVAL, offset 16 with 2 bytes -> a queue notify on the fast path (a
  write to the member's notify address from LEGACY_NOTIFY_INFO, no admin command), every
  other access -> exactly one virtio admin command executed by the group owner
  (``virtiovf_pci_bar0_rw``, ``virtiovf_issue_legacy_rw_cmd``).

Whether the device config starts at 20 or 24 follows MSI-X being enabled
(:func:`vfuserver.protocol.virtio_legacy.locate`). The kernel looks at the interrupt type
userspace set through VFIO_DEVICE_SET_IRQS; libvfio-user does not tell its server which
type the client set, so this reads the MSI-X Enable bit of the function's config space,
which QEMU writes through to the device right before it sends the matching SET_IRQS
(hw/vfio/pci.c ``vfio_pci_write_config``).
"""

from __future__ import annotations

import errno
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.errors import GuestError, HostError
from vfuserver.devices.legacy import LegacyInterface
from vfuserver.devices.pci import (
    Bar,
    BarKind,
    ConfigSpace,
    FastImage,
    FastKind,
    FastRegister,
    FastState,
    Interrupts,
    IsrCell,
    Region,
    RegisterCell,
    ResetKind,
    intersect,
    overlay_ranges,
)
from vfuserver.devices.virtio_pci import Layout, VirtioPciFunction
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import virtio_admin as admin
from vfuserver.protocol import virtio_legacy as legacy
from vfuserver.protocol import virtio_pci as vpci
from vfuserver.protocol.fields import name_or_number

TRANSITIONAL_REVISION = legacy.ABI_VERSION  # "Transitional needs to have revision 0"
NOTIFY_OFFSET = legacy.Register.QUEUE_NOTIFY
LEGACY_OPCODES = frozenset(admin.LEGACY_OPCODES)

_IO = int(pcifmt.Command.IO)  # plain ints on the hot path: IntFlag ops cost µs
_MASTER = int(pcifmt.Command.MASTER)
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
_REGISTER_NAMES = {int(reg): reg.name for reg in legacy.Register}


def transitional_identity(device_type: int) -> dict[int, bytes]:
    """The constant part of the overlay: a transitional device's identity (§4.1.2.3),
    the device id from QEMU's virtio_pci_id_info, the type as subsystem id (legacy
    drivers match on it). ValueError for a type without a transitional id."""
    return {
        pcifmt.Offset.DEVICE_ID: vpci.pci_id_info(device_type).transitional_device_id
        .to_bytes(2, "little"),
        pcifmt.Offset.REVISION_ID: bytes([TRANSITIONAL_REVISION]),
        pcifmt.Offset.SUBSYSTEM_VENDOR_ID: vpci.VENDOR_ID.to_bytes(2, "little"),
        pcifmt.Offset.SUBSYSTEM_ID: device_type.to_bytes(2, "little"),
    }


@dataclass
class LegacyStats:
    """Counters of the legacy path, readable by tests, benchmarks and the control plane."""

    accesses: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """BAR0 accesses by register (``read:STATUS``, ``write:device-config``, ...)."""
    fast_notifies: int = 0
    """QUEUE_NOTIFY writes that took the fast path."""
    refused: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Accesses refused before reaching the owner, by reason."""

    ignored: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Writes the member completed without effect, as QEMU ignores them, by reason
    (:attr:`vfuserver.devices.legacy.LegacyInterface.ignored`)."""

    def as_dict(self) -> dict[str, int]:
        # copy(): one C call that runs no Python code, while the serving thread may add keys;
        # list(items()) allocates a tuple per item, and a garbage collection that runs
        # a finalizer there can let another thread in (dictionary changed size)
        out = {f"access:{k}": v for k, v in self.accesses.copy().items()}
        out.update({f"refused:{k}": v for k, v in self.refused.copy().items()})
        out.update({f"ignored:{k}": v for k, v in self.ignored.copy().items()})
        out["fast_notifies"] = self.fast_notifies
        return out


class LegacyIoShadow:
    """PCI_COMMAND and BASE_ADDRESS_0 as the presentation keeps them.

    The kernel's ``virtvdev->pci_cmd`` and ``pci_base_addr_0``: the device behind the
    presentation has no IO BAR, so the IO decode bit and BAR0 are held here. Config writes
    land here (byte-wise, through :func:`~vfuserver.devices.pci.intersect`) before they
    go on to the device; the config overlay reads them back; BAR0 refuses every access
    while :attr:`pci_cmd` has no IO bit.
    """

    __slots__ = ("bar0_size", "pci_base_addr_0", "pci_cmd")

    def __init__(self, bar0_size: int) -> None:
        self.bar0_size = bar0_size
        self.pci_cmd = 0
        """The PCI_COMMAND value last written (2 bytes)."""
        self.pci_base_addr_0 = 0
        """The BASE_ADDRESS_0 value last written (4 bytes, sizing writes included)."""

    @property
    def io_enabled(self) -> bool:
        """IO decode on: BAR0 accesses are served."""
        return bool(self.pci_cmd & _IO)

    def write_config(self, offset: int, data: bytes) -> None:
        """Take the bytes of a config write that overlap PCI_COMMAND or BAR0."""
        for start, width in ((_COMMAND, 2), (_BAR0, 4)):
            overlap = intersect(offset, len(data), start, width)
            if overlap is None:
                continue
            at, pos, length = overlap
            current = self.pci_cmd if start == _COMMAND else self.pci_base_addr_0
            value = bytearray(current.to_bytes(width, "little"))
            value[pos : pos + length] = data[at : at + length]
            if start == _COMMAND:
                self.pci_cmd = int.from_bytes(value, "little")
            else:
                self.pci_base_addr_0 = int.from_bytes(value, "little")

    def command(self, device_command: int) -> int:
        """PCI_COMMAND as presented: the device's, with this IO decode bit."""
        return (device_command & ~_IO) | (self.pci_cmd & _IO)

    def bar0(self) -> int:
        """BAR0 as presented: the written address aligned to the BAR's size, IO space;
        after a sizing write of all ones it reads back the size mask
        (virtiovf_pci_read_config)."""
        return (self.pci_base_addr_0 & ~(self.bar0_size - 1) & 0xFFFFFFFF) | pcifmt.BAR_SPACE_IO

    def reset(self) -> None:
        """IO decode is off after a reset (virtiovf_legacy_io_reset_done)."""
        self.pci_cmd = 0


class TransitionalConfig:
    """Config space: the modern function's, with the identity and the shadow laid over
    reads; writes are shadowed, then passed through (as vfio_pci_core_write)."""

    def __init__(self, modern: Region, config: ConfigSpace, shadow: LegacyIoShadow,
                 identity: dict[int, bytes]) -> None:
        self.modern = modern
        self.config = config
        self.shadow = shadow
        self.identity = identity

    def read(self, offset: int, size: int) -> bytes:
        data = bytearray(self.modern.read(offset, size))
        shadow = self.shadow
        overlay: dict[int, bytes] = {
            **self.identity,
            _COMMAND: shadow.command(self.config.command).to_bytes(2, "little"),
            _BAR0: shadow.bar0().to_bytes(4, "little"),
        }
        for position, value in overlay_ranges(offset, size, overlay):
            data[position : position + len(value)] = value
        return bytes(data)

    def write(self, offset: int, data: bytes) -> None:
        self.shadow.write_config(offset, data)
        self.modern.write(offset, data)


class _Route(NamedTuple):
    """What an access at one BAR0 offset becomes, worked out once per offset and MSI-X
    state (the hot path then does one tuple lookup instead of the area arithmetic)."""

    read_counter: str
    read_command: bytes
    """The whole admin command: header and LEGACY_*_CFG_READ data."""
    write_counter: str
    write_prefix: bytes
    """Header and LEGACY_*_CFG_WRITE header; the written bytes follow."""


def _route(offset: int, msix_enabled: bool, member_id: int) -> _Route:
    area, area_offset = legacy.locate(offset, msix_enabled)
    if area is legacy.Area.COMMON:
        name = _REGISTER_NAMES.get(offset, "common")
        read_opcode, write_opcode = _COMMON_READ, _COMMON_WRITE
    else:
        name = "device-config"
        read_opcode, write_opcode = _DEVICE_READ, _DEVICE_WRITE
    return _Route(
        "read:" + name, _PACK_HEADER(read_opcode, _SRIOV, member_id) + _PACK_READ(area_offset),
        "write:" + name,
        _PACK_HEADER(write_opcode, _SRIOV, member_id) + _PACK_WRITE(area_offset),
    )


class LegacyBar0:
    """The emulated IO BAR0: access rules of virtiovf_pci_bar0_rw (see the module doc).

    ``notify`` is the member's notify address (region, offset) from LEGACY_NOTIFY_INFO;
    ``msix_enabled`` tells where the device config starts.
    """

    def __init__(self, shadow: LegacyIoShadow, owner: AdminOwner, member_id: int,
                 stats: LegacyStats, notify: tuple[Region, int],
                 msix_enabled: Callable[[], bool]) -> None:
        self.shadow = shadow
        self.owner = owner
        self.member_id = member_id
        self.stats = stats
        self.accesses = stats.accesses
        self.notify_region, self.notify_offset = notify
        self.msix_enabled = msix_enabled
        self._routes = {
            msix: tuple(_route(offset, msix, member_id) for offset in range(shadow.bar0_size))
            for msix in (False, True)
        }

    def read(self, offset: int, size: int) -> bytes:
        if self._notify_access(offset, size, "read"):
            self.accesses["read:QUEUE_NOTIFY"] += 1
            return self.notify_region.read(self.notify_offset, 2)
        route = self._route(offset)
        self.accesses[route.read_counter] += 1
        return self._execute(route.read_command, size)

    def write(self, offset: int, data: bytes) -> None:
        if self._notify_access(offset, len(data), "write"):
            # the fast path: the queue index goes straight to the member's notify address
            self.stats.fast_notifies += 1
            self.notify_region.write(self.notify_offset, data)
            return
        route = self._route(offset)
        self.accesses[route.write_counter] += 1
        self._execute(route.write_prefix + data, 0)

    def _route(self, offset: int) -> _Route:
        msix = self.msix_enabled()
        routes = self._routes[msix]
        # libvfio-user keeps accesses inside the region; an offset beyond it still gets
        # the owner's answer rather than an IndexError
        return routes[offset] if offset < len(routes) else _route(offset, msix, self.member_id)

    def _notify_access(self, offset: int, size: int, verb: str) -> bool:
        """The kernel's first checks: IO decode (EIO), then offset 16 = QUEUE_NOTIFY,
        which must be 2 bytes wide and takes the fast path."""
        if not self.shadow.pci_cmd & _IO:
            self.stats.refused["io-decode-off"] += 1
            raise GuestError(f"legacy BAR0 {verb} while IO decode is off", errno=errno.EIO)
        if offset != NOTIFY_OFFSET:
            return False
        if size != 2:
            self.stats.refused["notify-width"] += 1
            raise GuestError(f"QUEUE_NOTIFY {verb} of {size} bytes")
        return True

    def _execute(self, command: bytes, result_size: int) -> bytes:
        """One admin command for one access; its status becomes the access's errno."""
        reply = self.owner.execute(command, result_size)
        status = _UNPACK_STATUS(reply)[0]
        if status:
            raise GuestError(f"legacy access refused by the owner: admin status "
                             f"{name_or_number(admin.Status, status)}", errno=status)
        return reply[_STATUS_SIZE : _STATUS_SIZE + result_size]


def run_admin(owner: AdminOwner, opcode: int, member_id: int, data: bytes,
              result_size: int) -> tuple[int, int, bytes]:
    """One admin command of the SR-IOV group as its virtqueue buffers would carry it:
    (status, status_qualifier, result of ``result_size`` bytes)."""
    reply = owner.execute(_PACK_HEADER(opcode, _SRIOV, member_id) + data, result_size)
    status, qualifier = _UNPACK_STATUS(reply)
    return status, qualifier, reply[_STATUS_SIZE : _STATUS_SIZE + result_size]


class TransitionalFunction:
    """A modern virtio function presented as a transitional one (see the module doc).

    Joins the owner's SR-IOV group at construction and enables the legacy commands there
    (the kernel's ``virtiovf_init_legacy_io``); :class:`HostError` if the owner cannot
    serve them or names no usable notify address.
    """

    def __init__(self, modern: VirtioPciFunction, owner: AdminOwner) -> None:
        self.modern = modern
        self.name = modern.name
        self.config = modern.config
        self.msix_vectors = modern.msix_vectors
        self.intx = modern.intx
        self.owner = owner
        self.stats = LegacyStats()
        self.bar0_size = legacy.bar0_size(modern.device.legacy_config_size)
        identity = transitional_identity(modern.device.device_id)
        self.shadow = LegacyIoShadow(self.bar0_size)
        self.member = LegacyInterface(modern.transport, notify_bar=4,
                                      notify_offset=Layout.NOTIFY, ignored=self.stats.ignored)
        self.member_id = owner.add_member(self.member)
        self._enable_legacy_commands()
        notify = self._notify_location()
        self._config = TransitionalConfig(modern.config_region(), modern.config, self.shadow,
                                          identity)
        self.bar0 = LegacyBar0(self.shadow, owner, self.member_id, self.stats, notify,
                               modern.transport.msix_enabled)

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

    def _admin(self, opcode: admin.Opcode, data: bytes, result_size: int, *,
               member_id: int | None = None) -> bytes:
        member = self.member_id if member_id is None else member_id
        status, qualifier, result = run_admin(self.owner, opcode, member, data, result_size)
        if status != admin.Status.OK:
            raise HostError(f"admin command {opcode.name} failed: status "
                            f"{name_or_number(admin.Status, status)}, qualifier "
                            f"{name_or_number(admin.StatusQualifier, qualifier)}")
        return result

    # -- PciFunction --------------------------------------------------------------------

    def bars(self) -> list[Bar]:
        return [Bar(0, self.bar0_size, BarKind.IO, self.bar0), *self.modern.bars()]

    def config_region(self) -> Region:
        return self._config

    def attach_interrupts(self, interrupts: Interrupts) -> None:
        self.modern.attach_interrupts(interrupts)

    # -- the fast path (vfuserver.devices.pci.FastPath) -------------------------------

    def fast_registers(self) -> list[FastRegister]:
        """What a running legacy driver does all the time (QUEUE_NOTIFY; ISR and STATUS
        reads under INTx), then the modern function's. The same answers as
        :class:`LegacyBar0` (the kicked queue goes to the member's notify address, as
        LEGACY_NOTIFY_INFO says), without an admin command: the counters tell them apart.
        """
        return [
            FastRegister("legacy-notify", 0, NOTIFY_OFFSET, 2, True, FastKind.NOTIFY,
                         legacy=True),
            FastRegister("legacy-isr-read", 0, legacy.Register.ISR, 1, False,
                         FastKind.ISR_READ, legacy=True),
            FastRegister("legacy-status-read", 0, legacy.Register.STATUS, 1, False,
                         FastKind.STATUS_READ, legacy=True),
            # the rest of BAR0, after the exact registers above: reads without side
            # effect, QUEUE_SEL and a STATUS write that changes nothing
            FastRegister("legacy-read", 0, 0, self.bar0_size, False, FastKind.LEGACY_READ,
                         legacy=True),
            FastRegister("legacy-write", 0, 0, self.bar0_size, True, FastKind.LEGACY_WRITE,
                         legacy=True),
            *self.modern.fast_registers(),
        ]

    def fast_state(self) -> FastState:
        """A legacy STATUS read switches a fresh device to legacy mode
        (:meth:`LegacyInterface.legacy_common_read`); only once it cannot is it fast.
        The image follows the registers (both interfaces write them), the device config,
        the mode (HOST_FEATURES), MSI-X (where the config starts) and bus mastering."""
        modern = self.modern
        device = modern.device
        return FastState(device.status, io_enabled=self.shadow.io_enabled,
                         settled=device.legacy or device.status != 0,
                         active_queues=device.active_queues(),
                         image_key=(modern.transport.register_generation,
                                    device.config_revision, device.legacy,
                                    modern.transport.msix_enabled(),
                                    self.config.data[_COMMAND] & _MASTER))

    def fast_image(self) -> FastImage:
        return self.modern.fast_image()._replace(legacy=self.member.register_image())

    def use_isr(self, cell: IsrCell) -> None:
        self.modern.use_isr(cell)

    def use_legacy_queue_select(self, cell: RegisterCell) -> None:
        cell.store(self.member.queue_select)
        self.member.queue_select_cell = cell

    def kick(self, queue_index: int) -> None:
        self.modern.kick(queue_index)

    def reset(self, kind: ResetKind) -> None:
        self.modern.reset(kind)
        self.member.reset()
        self.shadow.reset()

    def close(self) -> None:
        """Leave the owner's group (idempotent)."""
        if self.member_id in self.owner.members:
            self.owner.remove_member(self.member_id)

    def counters(self) -> dict[str, dict[str, int]]:
        """Legacy accesses by register and fast notifies; the owner's admin commands by
        opcode and by (opcode, status), named as the spec names them."""
        return {"legacy": self.stats.as_dict(), "admin": self.owner.stats.as_dict()}
