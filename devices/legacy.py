"""The member side of the legacy interface: virtio 0.9.5 register semantics on a device.

The spec routes a transitional function's legacy register accesses through the group
owner's admin commands to the *member device*, which "has the same effect as member
device accesses through a legacy interface" (admin-cmds-legacy-interface.tex). So the
device itself runs in legacy mode — feature bits 0-31, no FEATURES_OK, rings placed by
QUEUE_PFN at 4096-byte alignment, the 10/12-byte net header, ISR read-to-clear, status 0
resets — rather than legacy registers being remapped onto a modern-only engine.

:class:`LegacyInterface` implements :class:`vfuserver.devices.admin.LegacyMember` over the
same device and transport state the modern interface uses (one device, two interfaces,
as in QEMU's transitional virtio-pci): the ISR, the MSI-X vectors and the MSI-X enable
state are shared. References: QEMU hw/virtio/virtio-pci.c ``virtio_ioport_read/write``,
Linux drivers/virtio/virtio_pci_legacy_dev.c.

QEMU is the oracle, register by register (the table is in tests/devices/test_legacy_qemu.py):
an access is decided by its start offset and its value is the access zero-extended;
a write QEMU ignores (a read-only register, an offset inside a register, a QUEUE_SEL
beyond VIRTIO_QUEUE_MAX, a QUEUE_PFN for a queue without a size, GUEST_FEATURES after
FEATURES_OK) completes and changes nothing; QUEUE_PFN 0, like STATUS 0, resets the whole
device (``virtio_pci_reset``). Only what the admin commands must refuse is refused: an
access not inside a single register (admin-cmds-legacy-interface.tex "MUST fail"), which
QEMU ignores as well, so the guest sees the same nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from vfuserver.devices.errors import GuestError
from vfuserver.devices.pci import LegacyImage, LocalCell, RegisterCell
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import virtio_legacy as legacy
from vfuserver.protocol.virtio import DeviceStatus
from vfuserver.protocol.virtio_admin import NotifyInfoEntry, NotifyInfoFlags
from vfuserver.protocol.virtio_legacy import Register

if TYPE_CHECKING:
    from vfuserver.devices.virtio_pci import VirtioPciTransport
    from vfuserver.devices.virtqueue import VirtQueue

_BAD_FEATURE = 1 << legacy.BAD_FEATURE
_FEATURES_OK = int(DeviceStatus.FEATURES_OK)
_ACKNOWLEDGE_DRIVER = int(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
_MASTER = int(pcifmt.Command.MASTER)


class LegacyInterface:
    """Legacy register file of one device; the member an :class:`AdminOwner` talks to."""

    def __init__(self, transport: VirtioPciTransport, *, notify_bar: int,
                 notify_offset: int, ignored: defaultdict[str, int] | None = None) -> None:
        self.transport = transport
        self.device = transport.device
        self.queue_select_cell: RegisterCell = LocalCell()
        """Where QUEUE_SEL is kept: a fast path may write it (QEMU's vdev->queue_sel)."""
        self.notify_bar = notify_bar
        self.notify_offset = notify_offset
        self.ignored: defaultdict[str, int] = defaultdict(int) if ignored is None else ignored
        """Writes that completed without effect, as QEMU ignores them, by reason (a
        counter the presentation may pass in to report with its own)."""
        self._readers: dict[Register, Callable[[], int]] = {
            Register.HOST_FEATURES: self._host_features,
            Register.GUEST_FEATURES: self._guest_features,
            Register.QUEUE_PFN: self._queue_pfn,
            Register.QUEUE_NUM: self._queue_num,
            Register.QUEUE_SEL: self._queue_sel,
            Register.QUEUE_NOTIFY: self._no_register,
            Register.STATUS: self._status,
            Register.ISR: self._isr,
            Register.MSI_CONFIG_VECTOR: self._config_vector,
            Register.MSI_QUEUE_VECTOR: self._queue_vector,
        }
        self._writers: dict[Register, Callable[[int], None]] = {
            Register.GUEST_FEATURES: self._set_guest_features,
            Register.QUEUE_PFN: self._set_queue_pfn,
            Register.QUEUE_SEL: self._set_queue_sel,
            Register.QUEUE_NOTIFY: self._notify,
            Register.STATUS: self._set_status,
            Register.MSI_CONFIG_VECTOR: self._set_config_vector,
            Register.MSI_QUEUE_VECTOR: self._set_queue_vector,
        }

    @property
    def queue_select(self) -> int:
        return self.queue_select_cell.load()

    @queue_select.setter
    def queue_select(self, value: int) -> None:
        self.queue_select_cell.store(value)

    # -- LegacyMember -------------------------------------------------------------------

    def legacy_common_read(self, offset: int, size: int) -> bytes:
        reg, start = self._register(offset, size)
        if start:
            # QEMU virtio_ioport_read: an offset that starts no register reads all ones
            return b"\xff" * size
        if reg is not Register.ISR:
            self._enter_legacy_mode()
        # the register's low bytes: QEMU's value truncated to the access width
        return (self._readers[reg]() & _LOW_BYTES[size]).to_bytes(size, "little")

    def legacy_common_write(self, offset: int, data: bytes) -> None:
        reg, start = self._register(offset, len(data))
        writer = self._writers.get(reg) if not start else None
        if writer is None:
            # QEMU virtio_ioport_write's default case: logged as a guest error, ignored
            what = "inside " + reg.name if start else reg.name + " (read-only)"
            self._ignore(f"write of {len(data)} bytes {what}", "read-only" if not start
                         else "inside-register")
            return
        if reg is not Register.STATUS:
            self._enter_legacy_mode()
        self.transport.register_generation += 1
        # QEMU passes the access's value zero-extended, whatever its width
        writer(int.from_bytes(data, "little"))

    def legacy_device_read(self, offset: int, size: int) -> bytes:
        self._enter_legacy_mode()
        return self.device.read_config(offset, size)

    def legacy_device_write(self, offset: int, data: bytes) -> None:
        self._enter_legacy_mode()
        self.device.write_config(offset, data)

    def legacy_notify_info(self) -> list[NotifyInfoEntry]:
        # A BAR of the member itself (flags 0x2, Linux's misnamed ..._OWNER_MEM): the
        # modern notify area, where a 16-bit write of the queue index kicks that queue.
        return [NotifyInfoEntry(NotifyInfoFlags.MEMBER_DEVICE, self.notify_bar,
                                self.notify_offset)]

    def register_image(self) -> LegacyImage:
        """The registers whose reads have no side effect once the mode is settled, as
        :meth:`legacy_common_read` answers them, for every queue QUEUE_SEL can select."""
        transport = self.transport
        return LegacyImage(
            config_offset=legacy.config_offset(transport.msix_enabled()),
            host_features=self._host_features(),
            guest_features=self._guest_features(),
            config_vector=self._config_vector(),
            queue_count=len(self.device.queues),
            queues=tuple((_pfn(queue), queue.size, queue.msix_vector)
                         for queue in self.device.queues),
            absent_vectors=bool(transport.absent_queue_vectors),
            bus_master=bool(transport.config.data[pcifmt.Offset.COMMAND] & _MASTER),
        )

    # -- registers ----------------------------------------------------------------------

    def _register(self, offset: int, size: int) -> tuple[Register, int]:
        """The register an access addresses and the access's offset in it; GuestError if
        it is not within a single register (looked up in a table: the hot path)."""
        key = (offset, size, self.transport.msix_enabled())
        found = _ACCESSES.get(key)
        if found is None:
            reg = legacy.register_for_access(offset, size, key[2])
            if reg is None:
                raise GuestError(f"legacy common access of {size} bytes at {offset} is not "
                                 "within a single register")
            found = _ACCESSES[key] = (reg, offset - reg)
        return found

    def _enter_legacy_mode(self) -> None:
        """A driver speaking the legacy interface to a fresh device drives it in legacy
        mode until the next reset (the modern transport does the opposite)."""
        if self.device.status == 0 and not self.device.legacy:
            self.device.legacy = True

    def _selected_queue(self) -> VirtQueue | None:
        queues = self.device.queues
        select = self.queue_select
        return queues[select] if select < len(queues) else None

    def _ignore(self, what: str, reason: str) -> None:
        """A write QEMU ignores: counted, logged at debug (QEMU's LOG_GUEST_ERROR is off
        by default), and the admin command completes OK."""
        self.ignored[reason] += 1
        self.transport.log.debug("legacy %s ignored", what)

    def _reset(self) -> None:
        """virtio_pci_reset: the device and the transport state (vectors, ISR, selects);
        the driver's next access decides the mode again."""
        self.transport.reset_transport_state()
        self.reset()
        self.device.reset()
        self.device.legacy = True

    def reset(self) -> None:
        """The function was reset: QUEUE_SEL is 0 again, as virtio_reset leaves it."""
        self.queue_select = 0

    # one small method per register, dispatched through a dict (hot path)

    def _host_features(self) -> int:
        return self.device.get_device_features(0) | _BAD_FEATURE

    def _guest_features(self) -> int:
        return self.device.driver_features & legacy.FEATURES_MASK

    def _queue_pfn(self) -> int:
        queue = self._selected_queue()
        return _pfn(queue) if queue else 0

    def _queue_num(self) -> int:
        queue = self._selected_queue()
        return queue.size if queue else 0

    def _queue_sel(self) -> int:
        return self.queue_select

    def _no_register(self) -> int:
        return legacy.NO_REGISTER  # QUEUE_NOTIFY is write-only: QEMU's default read

    def _status(self) -> int:
        return self.device.status

    def _isr(self) -> int:
        return self.transport.read_isr()  # read-to-clear; QEMU deasserts INTx on it

    def _config_vector(self) -> int:
        return self.transport.config_msix_vector

    def _queue_vector(self) -> int:
        queue = self._selected_queue()
        if queue is None:
            return self.transport.absent_queue_vectors.get(self.queue_select,
                                                           self.transport.NO_VECTOR)
        return queue.msix_vector

    def _set_guest_features(self, value: int) -> None:
        dev = self.device
        if value & _BAD_FEATURE:
            # "Guest does not negotiate properly? We have to assume nothing."
            self.transport.log.debug("legacy driver accepted VIRTIO_F_BAD_FEATURE; using "
                                     "the bad features %#x", dev.bad_features)
            value = dev.bad_features
        if dev.status & _FEATURES_OK:
            # virtio_set_features refuses once FEATURES_OK is set, even for legacy
            self._ignore("GUEST_FEATURES write after FEATURES_OK", "features-after-features-ok")
            return
        # virtio_set_features_nocheck: what the device does not offer is dropped, and the
        # register reads back what is in effect
        dev.set_driver_features(0, value & dev.get_device_features(0))

    def _set_queue_pfn(self, value: int) -> None:
        if value == 0:
            # pa == 0 resets the whole device, as STATUS 0 does (Linux's del_vq writes it
            # for each queue after the reset; each resets again, harmlessly)
            self._reset()
            return
        queue = self._selected_queue()
        if queue is None:
            # virtio_queue_set_addr: a queue without a size takes no address
            self._ignore(f"QUEUE_PFN for queue {self.queue_select}, which has no size",
                         "pfn-without-queue")
            return
        queue.place_contiguous(value << legacy.QUEUE_ADDR_SHIFT)

    def _set_queue_sel(self, value: int) -> None:
        if value >= legacy.QUEUE_MAX:
            self._ignore(f"QUEUE_SEL {value} (>= VIRTIO_QUEUE_MAX)", "queue-sel-beyond-max")
            return
        self.queue_select = value

    def _notify(self, value: int) -> None:
        self.device.notify(value)  # a queue without a size is ignored there

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset()  # virtio_set_status(0), then virtio_pci_reset
            return
        self._enter_legacy_mode()
        self.device.set_status(value)
        if value == _ACKNOWLEDGE_DRIVER:
            # "Linux before 2.6.34 drives the device without enabling the PCI device bus
            # master bit. Enable it automatically for the guest." (virtio_ioport_write)
            config = self.transport.config
            config.data[pcifmt.Offset.COMMAND] |= _MASTER

    def _set_config_vector(self, value: int) -> None:
        self.transport.config_msix_vector = self.transport.accept_vector(value)

    def _set_queue_vector(self, value: int) -> None:
        vector = self.transport.accept_vector(value)
        queue = self._selected_queue()
        if queue is not None:
            queue.msix_vector = vector
        elif vector == self.transport.NO_VECTOR:
            self.transport.absent_queue_vectors.pop(self.queue_select, None)
        else:
            # QEMU keeps a vector for each of its VIRTIO_QUEUE_MAX queues, sized or not
            self.transport.absent_queue_vectors[self.queue_select] = vector



def _pfn(queue: VirtQueue) -> int:
    """QUEUE_PFN of ``queue``: its descriptor address >> 12, the register's 32 bits."""
    return (queue.desc_addr >> legacy.QUEUE_ADDR_SHIFT) & 0xFFFF_FFFF


_LOW_BYTES = {size: (1 << (8 * size)) - 1 for size in (1, 2, 3, 4)}
_ACCESSES: dict[tuple[int, int, bool], tuple[Register, int]] = {}
"""(offset, size, MSI-X enabled) -> (register, offset within it): register_for_access,
memoized (a few dozen keys at most)."""
