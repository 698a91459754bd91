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

from typing import TYPE_CHECKING

from vfuserver.devices.errors import GuestError
from vfuserver.protocol import virtio_legacy as legacy
from vfuserver.protocol.virtio_admin import NotifyInfoEntry, NotifyInfoFlags
from vfuserver.protocol.virtio_legacy import Register

if TYPE_CHECKING:
    from vfuserver.devices.virtio_pci import VirtioPciTransport
    from vfuserver.devices.virtqueue import VirtQueue

LEGACY_DEVICE_CONFIG_BYTES = 8
"""What the legacy BAR exposes of virtio-net's config: offsetofend(virtio_net_config,
status), as Linux's virtio-vfio-pci sizes it."""


class LegacyInterface:
    """Legacy register file of one device; the member an :class:`AdminOwner` talks to."""

    def __init__(self, transport: VirtioPciTransport, *, notify_bar: int,
                 notify_offset: int) -> None:
        self.transport = transport
        self.device = transport.device
        self.queue_select = 0
        self.notify_bar = notify_bar
        self.notify_offset = notify_offset

    # -- LegacyMember -------------------------------------------------------------------

    def legacy_common_read(self, offset: int, size: int) -> bytes:
        reg = self._register(offset, size)
        value = self._read(reg).to_bytes(reg.width, "little")
        start = offset - reg
        return value[start : start + size]

    def legacy_common_write(self, offset: int, data: bytes) -> None:
        reg = self._register(offset, len(data))
        if not reg.writable:
            raise GuestError(f"legacy {reg.name} is read-only")
        start = offset - reg
        if start or len(data) != reg.width:
            # a partial write updates those bytes of the register (read-modify-write)
            current = bytearray(self._peek(reg).to_bytes(reg.width, "little"))
            current[start : start + len(data)] = data
            data = bytes(current)
        self._write(reg, int.from_bytes(data, "little"))

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

    def _register(self, offset: int, size: int) -> Register:
        reg = legacy.register_for_access(offset, size, self.transport.msix_enabled())
        if reg is None:
            raise GuestError(f"legacy common access of {size} bytes at {offset} is not "
                             "within a single register")
        return reg

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
        return self.transport.isr if reg is Register.ISR else self._read(reg)

    def _read(self, reg: Register) -> int:
        dev, transport = self.device, self.transport
        if reg is not Register.ISR:
            self._enter_legacy_mode()
        queue = self._selected_queue()
        match reg:
            case Register.HOST_FEATURES:
                return dev.get_device_features(0)
            case Register.GUEST_FEATURES:
                return dev.driver_features & legacy.FEATURES_MASK
            case Register.QUEUE_PFN:
                return (queue.desc_addr >> legacy.QUEUE_ADDR_SHIFT) if queue else 0
            case Register.QUEUE_NUM:
                return queue.size if queue else 0
            case Register.QUEUE_SEL:
                return self.queue_select
            case Register.QUEUE_NOTIFY:
                return 0
            case Register.STATUS:
                return dev.status
            case Register.ISR:
                return transport.read_isr()  # read-to-clear; QEMU deasserts INTx on it
            case Register.MSI_CONFIG_VECTOR:
                return transport.config_msix_vector
            case Register.MSI_QUEUE_VECTOR:
                return queue.msix_vector if queue else transport.NO_VECTOR
        raise AssertionError(reg)  # pragma: no cover - every register is matched

    def _write(self, reg: Register, value: int) -> None:
        dev, transport = self.device, self.transport
        if reg is Register.STATUS and value == 0:
            # status 0 resets the device and the transport state; the next access by a
            # driver decides the mode again
            transport.reset_transport_state()
            self.queue_select = 0
            dev.reset()
            dev.legacy = True
            return
        self._enter_legacy_mode()
        queue = self._selected_queue()
        match reg:
            case Register.GUEST_FEATURES:
                dev.set_driver_features(0, value)
            case Register.QUEUE_PFN:
                if queue is None:
                    raise GuestError(f"QUEUE_PFN written for absent queue {self.queue_select}")
                # PFN 0 deactivates the queue (Linux legacy del_vq)
                queue.place_contiguous(value << legacy.QUEUE_ADDR_SHIFT)
            case Register.QUEUE_SEL:
                self.queue_select = value
            case Register.QUEUE_NOTIFY:
                dev.notify(value)
            case Register.STATUS:
                dev.set_status(value)
            case Register.MSI_CONFIG_VECTOR:
                transport.config_msix_vector = transport.accept_vector(value)
            case Register.MSI_QUEUE_VECTOR:
                if queue is not None:
                    queue.msix_vector = transport.accept_vector(value)
