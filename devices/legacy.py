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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vfuserver.devices.errors import GuestError
from vfuserver.protocol import virtio_legacy as legacy
from vfuserver.protocol.virtio_admin import NotifyInfoEntry, NotifyInfoFlags
from vfuserver.protocol.virtio_legacy import Register

if TYPE_CHECKING:
    from vfuserver.devices.virtio_pci import VirtioPciTransport
    from vfuserver.devices.virtqueue import VirtQueue

class LegacyInterface:
    """Legacy register file of one device; the member an :class:`AdminOwner` talks to."""

    def __init__(self, transport: VirtioPciTransport, *, notify_bar: int,
                 notify_offset: int) -> None:
        self.transport = transport
        self.device = transport.device
        self.queue_select = 0
        self.notify_bar = notify_bar
        self.notify_offset = notify_offset
        self._readers: dict[Register, Callable[[], int]] = {
            Register.HOST_FEATURES: self._host_features,
            Register.GUEST_FEATURES: self._guest_features,
            Register.QUEUE_PFN: self._queue_pfn,
            Register.QUEUE_NUM: self._queue_num,
            Register.QUEUE_SEL: self._queue_sel,
            Register.QUEUE_NOTIFY: self._zero,
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

    # -- LegacyMember -------------------------------------------------------------------

    def legacy_common_read(self, offset: int, size: int) -> bytes:
        reg, start = self._register(offset, size)
        if reg is not Register.ISR:
            self._enter_legacy_mode()
        value = self._readers[reg]().to_bytes(_WIDTH[reg], "little")
        return value if size == _WIDTH[reg] else value[start : start + size]

    def legacy_common_write(self, offset: int, data: bytes) -> None:
        reg, start = self._register(offset, len(data))
        writer = self._writers.get(reg)
        if writer is None:
            raise GuestError(f"legacy {reg.name} is read-only")
        if len(data) != _WIDTH[reg]:
            # a partial write updates those bytes of the register (read-modify-write)
            current = bytearray(self._peek(reg).to_bytes(_WIDTH[reg], "little"))
            current[start : start + len(data)] = data
            data = bytes(current)
        if reg is not Register.STATUS:
            self._enter_legacy_mode()
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
        return queues[self.queue_select] if self.queue_select < len(queues) else None

    def _peek(self, reg: Register) -> int:
        """A register's value without side effects (ISR is not cleared)."""
        return self.transport.isr if reg is Register.ISR else self._readers[reg]()

    # one small method per register, dispatched through a dict (hot path)

    def _host_features(self) -> int:
        return self.device.get_device_features(0)

    def _guest_features(self) -> int:
        return self.device.driver_features & legacy.FEATURES_MASK

    def _queue_pfn(self) -> int:
        queue = self._selected_queue()
        return (queue.desc_addr >> legacy.QUEUE_ADDR_SHIFT) if queue else 0

    def _queue_num(self) -> int:
        queue = self._selected_queue()
        return queue.size if queue else 0

    def _queue_sel(self) -> int:
        return self.queue_select

    def _zero(self) -> int:
        return 0

    def _status(self) -> int:
        return self.device.status

    def _isr(self) -> int:
        return self.transport.read_isr()  # read-to-clear; QEMU deasserts INTx on it

    def _config_vector(self) -> int:
        return self.transport.config_msix_vector

    def _queue_vector(self) -> int:
        queue = self._selected_queue()
        return queue.msix_vector if queue else self.transport.NO_VECTOR

    def _set_guest_features(self, value: int) -> None:
        self.device.set_driver_features(0, value)

    def _set_queue_pfn(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            raise GuestError(f"QUEUE_PFN written for absent queue {self.queue_select}")
        # PFN 0 deactivates the queue (Linux legacy del_vq)
        queue.place_contiguous(value << legacy.QUEUE_ADDR_SHIFT)

    def _set_queue_sel(self, value: int) -> None:
        self.queue_select = value

    def _notify(self, value: int) -> None:
        self.device.notify(value)

    def _set_status(self, value: int) -> None:
        dev = self.device
        if value == 0:
            # status 0 resets the device and the transport state; the next access by a
            # driver decides the mode again
            self.transport.reset_transport_state()
            self.queue_select = 0
            dev.reset()
            dev.legacy = True
            return
        self._enter_legacy_mode()
        dev.set_status(value)

    def _set_config_vector(self, value: int) -> None:
        self.transport.config_msix_vector = self.transport.accept_vector(value)

    def _set_queue_vector(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is not None:
            queue.msix_vector = self.transport.accept_vector(value)



_WIDTH = {reg: reg.width for reg in Register}
_ACCESSES: dict[tuple[int, int, bool], tuple[Register, int]] = {}
"""(offset, size, MSI-X enabled) -> (register, offset within it): register_for_access,
memoized (a few dozen keys at most)."""
