"""The virtio PCI transport (virtio 1.x §4.1): maps BARs and capabilities onto a device.

The layout follows QEMU's modern virtio-*-pci: BAR1 holds the MSI-X table and PBA,
BAR4 is a 64-bit prefetchable memory BAR with the common configuration at 0x0000, the ISR
at 0x1000, the device configuration at 0x2000 and the notify area at 0x3000
(``notify_off_multiplier`` 4, queue ``n`` notifies at 0x3000 + 4n). The virtio device
behind it knows nothing of PCI; :class:`VirtioPciFunction` composes the two.
"""

from __future__ import annotations

import enum
import errno
import logging
from typing import TYPE_CHECKING

from vfuserver.devices.errors import GuestError
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
    LocalIsr,
    NoInterrupts,
    Region,
    RegisterCell,
    ResetKind,
)
from vfuserver.devices.virtqueue import VirtQueue, VirtQueueError
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import pci_caps as caps
from vfuserver.protocol import virtio_pci as vpci
from vfuserver.protocol.virtio_pci import CommonCfgRegister as Reg

if TYPE_CHECKING:
    from vfuserver.devices.virtio import VirtioDevice

NO_VECTOR = vpci.MSI_NO_VECTOR


class Layout(enum.IntEnum):
    """Offsets in the modern BAR (QEMU virtio-pci's defaults)."""

    COMMON = 0x0000
    ISR = 0x1000
    DEVICE = 0x2000
    NOTIFY = 0x3000
    SIZE = 0x4000


NOTIFY_OFF_MULTIPLIER = 4
MODERN_BAR = 4
FAST_NOTIFY_QUEUES = 3
"""Queues whose modern notify address the fast path serves (the native side has room for
16 fast registers; a transitional function adds its 5 legacy ones)."""
MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800

PCI_CFG_DATA = 16
"""offsetof(struct virtio_pci_cfg_cap, pci_cfg_data): the 4-byte window data."""

MSIX_CONTROL_ENABLE = int(caps.MsixControl.ENABLE)  # plain ints: IntFlag ops cost µs
MSIX_CONTROL_FUNCTION_MASK = int(caps.MsixControl.FUNCTION_MASK)


class MsixTableBar:
    """BAR holding the MSI-X table and PBA. QEMU emulates the table itself and forwards
    only PBA reads ("the server's copy is what matters"); we keep no pending bits, so the
    table and PBA read as zero and writes are accepted and ignored."""

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


class VirtioPciTransport:
    """Common/ISR/device/notify areas of the modern BAR and interrupt routing."""

    NO_VECTOR = NO_VECTOR

    def __init__(self, device: VirtioDevice, config: ConfigSpace, msix_cap: int,
                 msix_vectors: int) -> None:
        self.device = device
        self.msix_vectors = msix_vectors
        self.config = config
        self.msix_cap = msix_cap
        self._msix_enabled = False
        self.interrupts: Interrupts = NoInterrupts()
        self.isr_cell: IsrCell = LocalIsr()
        self.config_msix_vector = NO_VECTOR
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.register_generation = 0
        """Bumped by every register write of either interface and by a reset: what a
        copy of the registers (a fast path's) compares to know it may be stale."""
        self.absent_queue_vectors: dict[int, int] = {}
        """MSI-X vectors the legacy interface took for queue indexes the device does not
        have (QEMU keeps one for each of its VIRTIO_QUEUE_MAX queues); cleared on reset."""
        self.log = logging.getLogger(f"vfuserver.{getattr(device, 'name', 'virtio')}")

    # -- interrupts (VirtioInterrupts, called by the device) ------------------------------

    def msix_enabled(self) -> bool:
        """The MSI-X Enable bit, kept by :meth:`msix_control_written` (hot path)."""
        return self._msix_enabled

    def msix_control_written(self) -> None:
        """The MSI-X message control register may have changed (a config write or reset)."""
        self._msix_enabled = bool(self.config.u16(self.msix_cap + 2) & MSIX_CONTROL_ENABLE)

    def queue_interrupt(self, queue: VirtQueue) -> None:
        self._raise(vpci.IsrStatus.QUEUE, queue.msix_vector)

    def config_interrupt(self) -> None:
        self._raise(vpci.IsrStatus.CONFIG, self.config_msix_vector)

    def interrupt_route(self, queue: VirtQueue) -> tuple[int | None, bool]:
        """How :meth:`queue_interrupt` raises ``queue``'s interrupt now: its MSI-X vector
        (NO_VECTOR: none), or None with MSI-X off (the ISR bit, then INTx), and whether
        INTx is raised (PCI_COMMAND's INTX_DISABLE clear). For a native engine that raises
        it the same way (vfuserver/netpath.py NetRun)."""
        return self._route(queue.msix_vector)

    def _route(self, vector: int) -> tuple[int | None, bool]:
        return (vector if self.msix_enabled() else None,
                not self.config.command & pcifmt.Command.INTX_DISABLE)

    def _raise(self, isr_bit: int, vector: int) -> None:
        msix_vector, intx = self._route(vector)
        if msix_vector is not None:
            if msix_vector != NO_VECTOR:
                self.interrupts.trigger(msix_vector)
            return
        # INTx: the ISR bit says why; QEMU asserts the line on the eventfd and deasserts
        # it on the guest's next BAR access, after which the ISR read clears the bit.
        self.isr_cell.set(isr_bit)
        if intx:
            self.interrupts.trigger(0)

    def read_isr(self) -> int:
        """ISR read: returns and clears the pending bits (§4.1.4.5)."""
        return self.isr_cell.take()

    @property
    def isr(self) -> int:
        """The pending ISR bits, without clearing them."""
        return self.isr_cell.peek()

    @isr.setter
    def isr(self, value: int) -> None:
        self.isr_cell.store(value)

    # -- common configuration ---------------------------------------------------------

    def _selected_queue(self) -> VirtQueue | None:
        queues = self.device.queues
        return queues[self.queue_select] if self.queue_select < len(queues) else None

    def read_common(self, offset: int, size: int) -> bytes:
        regs = vpci.common_cfg_access(offset, size)
        if not regs:
            raise GuestError(f"common cfg read of {size} bytes at {offset:#x}")
        return b"".join(self._read_reg(reg).to_bytes(reg.width, "little") for reg in regs)

    def _read_reg(self, reg: Reg) -> int:
        dev = self.device
        queue = self._selected_queue()
        match reg:
            case Reg.DEVICE_FEATURE_SELECT:
                return self.device_feature_select
            case Reg.DEVICE_FEATURE:
                return dev.get_device_features(self.device_feature_select)
            case Reg.DRIVER_FEATURE_SELECT:
                return self.driver_feature_select
            case Reg.DRIVER_FEATURE:
                sel = self.driver_feature_select
                return (dev.driver_features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
            case Reg.CONFIG_MSIX_VECTOR:
                return self.config_msix_vector
            case Reg.NUM_QUEUES:
                return len(dev.queues)
            case Reg.DEVICE_STATUS:
                return dev.status
            case Reg.CONFIG_GENERATION:
                return dev.config_generation & 0xFF
            case Reg.QUEUE_SELECT:
                return self.queue_select
            case Reg.QUEUE_NOTIFY_OFF:
                return self.queue_select if queue is not None else 0
            case Reg.ADMIN_QUEUE_INDEX | Reg.ADMIN_QUEUE_NUM | Reg.QUEUE_NOTIFY_DATA:
                return 0
        if queue is None:
            return NO_VECTOR if reg is Reg.QUEUE_MSIX_VECTOR else 0
        match reg:
            case Reg.QUEUE_SIZE:
                return queue.size
            case Reg.QUEUE_MSIX_VECTOR:
                return queue.msix_vector
            case Reg.QUEUE_ENABLE:
                return int(queue.enabled)
            case Reg.QUEUE_DESC_LO | Reg.QUEUE_DESC_HI:
                return _half(queue.desc_addr, reg is Reg.QUEUE_DESC_HI)
            case Reg.QUEUE_DRIVER_LO | Reg.QUEUE_DRIVER_HI:
                return _half(queue.avail_addr, reg is Reg.QUEUE_DRIVER_HI)
            case Reg.QUEUE_DEVICE_LO | Reg.QUEUE_DEVICE_HI:
                return _half(queue.used_addr, reg is Reg.QUEUE_DEVICE_HI)
            case Reg.QUEUE_RESET:
                return 0
        raise AssertionError(reg)  # pragma: no cover - the match covers every register

    def write_common(self, offset: int, data: bytes) -> None:
        self.register_generation += 1
        regs = vpci.common_cfg_access(offset, len(data))
        if not regs:
            raise GuestError(f"common cfg write of {len(data)} bytes at {offset:#x}")
        for i, reg in enumerate(regs):
            value = int.from_bytes(data[4 * i : 4 * i + reg.width], "little")
            self._write_reg(reg, value)

    def _write_reg(self, reg: Reg, value: int) -> None:
        dev = self.device
        if not reg.writable:
            self.log.debug("write to read-only common cfg %s ignored", reg.name)
            return
        match reg:
            case Reg.DEVICE_FEATURE_SELECT:
                self.device_feature_select = value
                return
            case Reg.DRIVER_FEATURE_SELECT:
                self.driver_feature_select = value
                return
            case Reg.DRIVER_FEATURE:
                dev.set_driver_features(self.driver_feature_select, value)
                return
            case Reg.CONFIG_MSIX_VECTOR:
                self.config_msix_vector = self.accept_vector(value)
                return
            case Reg.DEVICE_STATUS:
                if value == 0:
                    self.reset_transport_state()
                if value == 0 or dev.status == 0:
                    # a driver using the modern interface on a fresh device drives it in
                    # modern mode (the legacy interface does the opposite)
                    dev.legacy = False
                dev.set_status(value)
                return
            case Reg.QUEUE_SELECT:
                self.queue_select = value
                return
        queue = self._selected_queue()
        if queue is None:
            self.log.debug("write to %s of absent queue %d ignored", reg.name, self.queue_select)
            return
        if queue.enabled and reg is not Reg.QUEUE_MSIX_VECTOR and reg is not Reg.QUEUE_RESET:
            # §4.1.4.3.2: the driver MUST NOT change a queue's layout once it is enabled
            raise GuestError(f"{reg.name} written while queue {queue.index} is enabled")
        match reg:
            case Reg.QUEUE_SIZE:
                try:
                    queue.set_size(value)
                except VirtQueueError as exc:
                    self.device.needs_reset(str(exc))
            case Reg.QUEUE_MSIX_VECTOR:
                queue.msix_vector = self.accept_vector(value)
            case Reg.QUEUE_ENABLE:
                if value == 1:
                    queue.enable()
            case Reg.QUEUE_DESC_LO | Reg.QUEUE_DESC_HI:
                queue.desc_addr = _set_half(queue.desc_addr, value, reg is Reg.QUEUE_DESC_HI)
            case Reg.QUEUE_DRIVER_LO | Reg.QUEUE_DRIVER_HI:
                queue.avail_addr = _set_half(queue.avail_addr, value,
                                             reg is Reg.QUEUE_DRIVER_HI)
            case Reg.QUEUE_DEVICE_LO | Reg.QUEUE_DEVICE_HI:
                queue.used_addr = _set_half(queue.used_addr, value, reg is Reg.QUEUE_DEVICE_HI)
            case Reg.QUEUE_RESET:
                pass  # VIRTIO_F_RING_RESET is not offered

    def accept_vector(self, vector: int) -> int:
        """A vector the driver asks for, or NO_VECTOR if the device has no such vector
        (the driver reads it back to learn it was refused, §4.1.5.1.2)."""
        return vector if vector < self.msix_vectors else NO_VECTOR

    def reset_transport_state(self) -> None:
        self.register_generation += 1
        self.isr_cell.store(0)
        self.config_msix_vector = NO_VECTOR
        self.device_feature_select = self.driver_feature_select = self.queue_select = 0
        self.absent_queue_vectors.clear()

    # -- the other areas ----------------------------------------------------------------

    def notify(self, offset: int, data: bytes) -> None:
        """A driver notification: the 16-bit virtqueue index written to the notify area
        (§4.1.5.2). The value names the queue, so one address serves every queue too, as
        LEGACY_NOTIFY_INFO's single notify address requires."""
        if len(data) not in (2, 4):
            raise GuestError(f"notify write of {len(data)} bytes at {offset:#x}")
        self.device.notify(int.from_bytes(data[:2], "little"))


class ModernBar:
    """The modern virtio BAR: dispatches each access to its area."""

    def __init__(self, transport: VirtioPciTransport) -> None:
        self.transport = transport

    def read(self, offset: int, size: int) -> bytes:
        t = self.transport
        if offset < Layout.ISR:
            return t.read_common(offset, size)
        if offset < Layout.DEVICE:
            if offset != Layout.ISR or size != 1:
                raise GuestError(f"ISR read of {size} bytes at {offset:#x}")
            return bytes([t.read_isr()])
        if offset < Layout.NOTIFY:
            return t.device.read_config(offset - Layout.DEVICE, size)
        return bytes(size)  # notify area reads carry nothing

    def write(self, offset: int, data: bytes) -> None:
        t = self.transport
        if offset < Layout.ISR:
            t.write_common(offset, data)
        elif offset < Layout.DEVICE:
            raise GuestError(f"write of {len(data)} bytes to the read-only ISR at {offset:#x}")
        elif offset < Layout.NOTIFY:
            t.device.write_config(offset - Layout.DEVICE, data)
        else:
            t.notify(offset - Layout.NOTIFY, data)


def _half(value: int, high: bool) -> int:
    return (value >> 32) & 0xFFFFFFFF if high else value & 0xFFFFFFFF


def _set_half(value: int, half: int, high: bool) -> int:
    if high:
        return (value & 0xFFFFFFFF) | (half << 32)
    return (value & ~0xFFFFFFFF) | half


class VirtioPciFunction:
    """A virtio device behind the modern virtio PCI transport: the PCI function to serve.

    Identity as the spec asks of a modern-only device (§4.1.2.1): vendor 0x1af4, device
    0x1040 + type, revision 1, subsystem 0x1af4:0x1100 (QEMU's choice, >= 0x40), and the
    class code of the device's type (:data:`~vfuserver.protocol.virtio_pci.PCI_ID_INFO`)
    unless ``class_code`` says otherwise. ``msix_vectors`` should cover the queues plus
    the configuration vector (Linux falls back to shared vectors otherwise).
    """

    SUBSYSTEM_ID = 0x1100

    def __init__(self, device: VirtioDevice, *, name: str, class_code: int | None = None,
                 msix_vectors: int = 4) -> None:
        if class_code is None:
            class_code = vpci.pci_id_info(device.device_id).class_code
        self.name = name
        self.device = device
        self.msix_vectors = msix_vectors
        self.intx = True
        self.config = ConfigSpace()
        self.config.set_header(
            vendor_id=vpci.VENDOR_ID,
            device_id=vpci.modern_device_id(device.device_id),
            revision_id=vpci.MODERN_REVISION_ID,
            base_class=class_code >> 8, subclass=class_code & 0xFF, prog_if=0,
            subsystem_vendor_id=vpci.VENDOR_ID, subsystem_id=self.SUBSYSTEM_ID,
            interrupt_pin=1,
        )
        self._add_pm_capability()
        self.msix_cap = self._add_msix_capability()
        self.transport = VirtioPciTransport(device, self.config, self.msix_cap, msix_vectors)
        device.interrupts = self.transport
        self._add_virtio_capabilities()
        self.config.add_bar(Bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind.MEM32,
                                MsixTableBar(msix_vectors)))
        self.modern_bar = ModernBar(self.transport)
        self.config.add_bar(Bar(MODERN_BAR, Layout.SIZE, BarKind.MEM64, self.modern_bar,
                                prefetchable=True))

    def _add_pm_capability(self) -> None:
        # PCI PM 1.2, D0 only; the power state field is writable as on QEMU's devices.
        raw = caps.PmCapability.build({"next": 0, "pmc": caps.PMC_VERSION_1_2, "pmcsr": 0,
                                       "pmcsr_bse": 0, "data": 0})
        wmask = caps.PMCSR_STATE_MASK.to_bytes(2, "little")
        self.config.add_capability(pcifmt.CapabilityId.PM, raw[2:], wmask=bytes(2) + wmask)

    def _add_msix_capability(self) -> int:
        # Table at BAR1 offset 0, PBA at BAR1 offset 0x800; enable and function mask are
        # the only writable bits of message control.
        raw = caps.MsixCapability.build({
            "next": 0,
            "message_control": caps.msix_message_control(self.msix_vectors),
            "table": caps.encode_offset_bir(0, MSIX_BAR),
            "pba": caps.encode_offset_bir(MSIX_PBA_OFFSET, MSIX_BAR),
        })
        wmask = int(caps.MsixControl.ENABLE | caps.MsixControl.FUNCTION_MASK).to_bytes(2, "little")
        return self.config.add_capability(pcifmt.CapabilityId.MSIX, raw[2:], wmask=wmask,
                                          hook=self._msix_written)

    def _msix_written(self, offset: int, old: bytes, new: bytes) -> None:
        self.transport.msix_control_written()

    def _add_virtio_capabilities(self) -> None:
        areas = [
            (vpci.CfgType.COMMON, Layout.COMMON, 0x1000),
            (vpci.CfgType.ISR, Layout.ISR, 0x1000),
            (vpci.CfgType.DEVICE, Layout.DEVICE, 0x1000),
        ]
        for cfg_type, offset, length in areas:
            self._add_virtio_cap(vpci.VirtioPciCap, cfg_type, offset, length)
        self._add_virtio_cap(vpci.VirtioPciNotifyCap, vpci.CfgType.NOTIFY, Layout.NOTIFY,
                             0x1000, notify_off_multiplier=NOTIFY_OFF_MULTIPLIER)
        self.pci_cfg_cap = self._add_virtio_cap(
            vpci.VirtioPciCfgCap, vpci.CfgType.PCI, 0, 0, pci_cfg_data=bytes(4),
            # writable: bar, offset, length, pci_cfg_data (the body starts at cap_len)
            wmask=bytes(2) + b"\xff" + bytes(3) + b"\xff" * 12,
            hook=self._pci_cfg_written)

    def _add_virtio_cap(self, fmt: object, cfg_type: vpci.CfgType, offset: int, length: int,
                        *, wmask: bytes = b"", hook: object = None, **tail: object) -> int:
        cap = {"cap_next": 0, "cap_len": 0, "cfg_type": cfg_type,
               "bar": MODERN_BAR if cfg_type is not vpci.CfgType.PCI else 0, "id": 0,
               "offset": offset, "length": length}
        size = fmt.sizeof()  # type: ignore[attr-defined]
        cap["cap_len"] = size
        value = {"cap": cap, **tail} if tail else cap
        raw = fmt.build(value)  # type: ignore[attr-defined]
        return self.config.add_capability(pcifmt.CapabilityId.VENDOR, raw[2:], wmask=wmask,
                                          hook=hook)  # type: ignore[arg-type]

    def _pci_cfg_written(self, offset: int, old: bytes, new: bytes) -> None:
        """§4.1.4.9: a write to pci_cfg_data writes the BAR window the cap points at.

        As QEMU's virtio_write_config: the config write itself always lands; a window
        that points nowhere, or an access the region refuses, writes nothing.
        """
        data_at = self.pci_cfg_cap + PCI_CFG_DATA
        if offset + len(new) <= data_at:
            return
        bar, window, length = self._pci_cfg_window()
        if bar is None:
            return
        data = bytes(self.config.data[data_at : data_at + length])
        try:
            bar.region.write(window, data)
        except GuestError as err:
            self.transport.log.debug("PCI_CFG window write of BAR%d at %#x ignored: %s",
                                     bar.index, window, err)

    def pci_cfg_read(self) -> None:
        """Refresh pci_cfg_data from the window the cap points at (QEMU virtio_read_config,
        before any config read that overlaps it).

        Never raises for what the guest programmed: a window that points nowhere
        (bar, length or range invalid) or an access the region refuses leaves
        pci_cfg_data unchanged, as QEMU's virtio_address_space_read does.
        """
        bar, window, length = self._pci_cfg_window()
        if bar is None:
            return
        try:
            value = bar.region.read(window, length)
        except GuestError as err:
            self.transport.log.debug("PCI_CFG window read of BAR%d at %#x ignored: %s",
                                     bar.index, window, err)
            return
        if len(value) == length:  # a region answering another width is ignored, too
            data_at = self.pci_cfg_cap + PCI_CFG_DATA
            self.config.data[data_at : data_at + length] = value

    def _pci_cfg_window(self) -> tuple[Bar | None, int, int]:
        """(BAR, offset, length) of the window, or (None, 0, 0) if it points nowhere.

        The offset is aligned down to the length, as QEMU's virtio_address_space_read
        and _write do ("as address is under guest control, handle illegal values").
        """
        cap = self.pci_cfg_cap
        bar_index = self.config.data[cap + 4]
        length = self.config.u32(cap + 12)
        bar = self.config.bars.get(bar_index)
        if bar is None or length not in (1, 2, 4):
            return None, 0, 0
        window = self.config.u32(cap + 8) & ~(length - 1)
        if window + length > bar.size:
            return None, 0, 0
        return bar, window, length

    def config_region(self) -> Region:
        return _VirtioConfigRegion(self)

    def bars(self) -> list[Bar]:
        return list(self.config.bars.values())

    def attach_interrupts(self, interrupts: Interrupts) -> None:
        self.transport.interrupts = interrupts

    # -- the fast path (vfuserver.devices.pci.FastPath) -------------------------------

    def fast_registers(self) -> list[FastRegister]:
        """The modern BAR's ISR and device_status reads, device config reads and the
        first queues' notify addresses (``queue_notify_off`` is the queue index)."""
        registers = [
            FastRegister("isr-read", MODERN_BAR, Layout.ISR, 1, False, FastKind.ISR_READ),
            FastRegister("status-read", MODERN_BAR, Reg.DEVICE_STATUS, 1, False,
                         FastKind.STATUS_READ),
            FastRegister("config-read", MODERN_BAR, Layout.DEVICE,
                         Layout.NOTIFY - Layout.DEVICE, False, FastKind.CONFIG_READ),
        ]
        for index in range(min(len(self.device.queues), FAST_NOTIFY_QUEUES)):
            registers.append(FastRegister(f"notify-{index}", MODERN_BAR,
                                          Layout.NOTIFY + NOTIFY_OFF_MULTIPLIER * index, 2,
                                          True, FastKind.NOTIFY))
        return registers

    def fast_state(self) -> FastState:
        device = self.device
        return FastState(device.status, io_enabled=False, settled=True,
                         active_queues=device.active_queues(),
                         image_key=device.config_revision)

    def fast_image(self) -> FastImage:
        """The device config (virtio 1.x config reads have no side effect; a driver
        reading config_generation through the model sees a new one only after the bytes
        it guards were published, since both are published under the device lock)."""
        size = self.device.config_size
        return FastImage(self.device.read_config(0, size) if size else b"")

    def use_isr(self, cell: IsrCell) -> None:
        cell.store(self.transport.isr_cell.peek())
        self.transport.isr_cell = cell

    def use_legacy_queue_select(self, cell: RegisterCell) -> None:
        pass  # no legacy interface here

    def kick(self, queue_index: int) -> None:
        """A notify the fast path took: what :meth:`VirtioPciTransport.notify` does."""
        self.device.notify(queue_index)

    def counters(self) -> dict[str, dict[str, int]]:
        return {}

    def close(self) -> None:
        pass

    def reset(self, kind: ResetKind) -> None:
        self.device.reset()
        self.transport.reset_transport_state()
        # Power-on state of what the guest programs in config space: command register,
        # BAR addresses and MSI-X enable, as after a function-level reset.
        command = pcifmt.Offset.COMMAND
        self.config.data[command : command + 2] = bytes(2)
        control = self.msix_cap + 2
        value = self.config.u16(control) & ~(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
        self.config.data[control : control + 2] = value.to_bytes(2, "little")
        self.transport.msix_control_written()
        for bar in self.config.bars.values():
            reg = pcifmt.Offset.BASE_ADDRESS_0 + 4 * bar.index
            self.config.data[reg : reg + 4] = bar.type_bits.to_bytes(4, "little")
            if bar.kind is BarKind.MEM64:
                self.config.data[reg + 4 : reg + 8] = bytes(4)


class _VirtioConfigRegion:
    """Config-space accesses, with the virtio PCI_CFG window read on demand."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self.function = function

    def read(self, offset: int, size: int) -> bytes:
        fn = self.function
        data_at = fn.pci_cfg_cap + PCI_CFG_DATA
        if offset < data_at + 4 and data_at < offset + size:
            fn.pci_cfg_read()
        return fn.config.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            raise GuestError("empty config write", errno=errno.EINVAL)
        self.function.config.write(offset, data)
