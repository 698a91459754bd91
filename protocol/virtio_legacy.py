"""Legacy (virtio 0.9.5) PCI IO BAR0 register layout and legacy virtqueue placement.

Sources: virtio spec §4.1.4.8 "Legacy Interfaces: A Note on PCI Device Layout" and
§4.1.5.1.1 "Legacy Interface: A Note on Virtqueue Configuration" (transport-pci.tex),
§2.7.2 "Legacy Interfaces: A Note on Virtqueue Layout" (split-ring.tex); Linux
include/uapi/linux/virtio_pci.h (the ``#ifndef VIRTIO_PCI_NO_LEGACY`` block) and
drivers/vfio/pci/virtio/legacy_io.c.

The common header is little-endian. Its last two registers exist only while MSI-X is enabled:
"the other fields move. If you turn it off again, they move back", so the device-specific
configuration starts at 20 or 24 (``VIRTIO_PCI_CONFIG_OFF(msix_enabled)``), decided at access
time. Device-specific configuration is guest-native endian in legacy mode; the admin
commands that carry these accesses are always little-endian
(:mod:`vfuserver.protocol.virtio_admin`).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from construct import Int8ul, Int16ul, Int32ul, Struct

ABI_VERSION = 0
"""VIRTIO_PCI_ABI_VERSION: legacy devices have PCI Revision ID 0 (Linux vp_legacy_probe)."""
LEGACY_DEVICE_ID_FIRST = 0x1000
LEGACY_DEVICE_ID_LAST = 0x103F
"""Legacy drivers bind device ids 0x1000..0x103f; the virtio type is the subsystem id."""
FEATURES_MASK = 0xFFFF_FFFF
"""Only feature bits 0..31 are visible through HOST_FEATURES / GUEST_FEATURES."""

COMMON_HEADER_SIZE = 20
"""Size of the common header while MSI-X is disabled."""
COMMON_HEADER_SIZE_MSIX = 24
"""Size of the common header while MSI-X is enabled (adds the two vector registers)."""

BAD_FEATURE = 30
"""QEMU's VIRTIO_F_BAD_FEATURE: offered in HOST_FEATURES by every virtio-pci device
(virtio_pci_pre_plugged); a driver that accepts it shows it does not negotiate, and the
device takes its device type's "bad features" instead (virtio_ioport_write)."""
QUEUE_MAX = 1024
"""QEMU's VIRTIO_QUEUE_MAX: a QUEUE_SEL write of this or more is ignored; queue indexes
below it name a queue, present (a size) or not (size 0)."""
NO_REGISTER = 0xFFFF_FFFF
"""What a read at an offset that starts no readable register returns (QEMU
virtio_ioport_read's default, truncated to the access width)."""

QUEUE_ADDR_SHIFT = 12
"""VIRTIO_PCI_QUEUE_ADDR_SHIFT: QUEUE_PFN holds the ring's physical address >> 12."""
VRING_ALIGN = 4096
"""VIRTIO_PCI_VRING_ALIGN: the used ring starts at the next multiple of this."""


class Register(enum.IntEnum):
    """Legacy common header registers, by offset (virtio_pci.h VIRTIO_PCI_*)."""

    HOST_FEATURES = 0
    """Read-only: device feature bits 0..31."""
    GUEST_FEATURES = 4
    """Read-write: driver-accepted feature bits 0..31."""
    QUEUE_PFN = 8
    """Read-write: selected queue's address >> 12; 0 = inactive."""
    QUEUE_NUM = 12
    """Read-only: selected queue's size (no negotiation in legacy)."""
    QUEUE_SEL = 14
    """Read-write: queue selector."""
    QUEUE_NOTIFY = 16
    """Write: index of the queue to kick."""
    STATUS = 18
    """Read-write: device status; writing 0 resets."""
    ISR = 19
    """Read-only, read-to-clear."""
    MSI_CONFIG_VECTOR = 20
    """Read-write; present only while MSI-X is enabled."""
    MSI_QUEUE_VECTOR = 22
    """Read-write, for QUEUE_SEL; present only while MSI-X is enabled."""

    @property
    def width(self) -> int:
        """Register width in bytes."""
        return _WIDTH[self]

    @property
    def writable(self) -> bool:
        """False for HOST_FEATURES, QUEUE_NUM and ISR."""
        return self not in _READ_ONLY

    @property
    def needs_msix(self) -> bool:
        """True for the registers that exist only while MSI-X is enabled."""
        return self >= Register.MSI_CONFIG_VECTOR


_WIDTH: dict[Register, int] = {
    Register.HOST_FEATURES: 4,
    Register.GUEST_FEATURES: 4,
    Register.QUEUE_PFN: 4,
    Register.QUEUE_NUM: 2,
    Register.QUEUE_SEL: 2,
    Register.QUEUE_NOTIFY: 2,
    Register.STATUS: 1,
    Register.ISR: 1,
    Register.MSI_CONFIG_VECTOR: 2,
    Register.MSI_QUEUE_VECTOR: 2,
}
_READ_ONLY = frozenset({Register.HOST_FEATURES, Register.QUEUE_NUM, Register.ISR})
_REGISTER_OF_BYTE: tuple[Register, ...] = tuple(reg for reg in Register for _ in range(_WIDTH[reg]))
"""Byte offset 0..23 -> the register that byte belongs to."""

LegacyCommonHeader = Struct(
    "host_features" / Int32ul * "device feature bits 0..31",
    "guest_features" / Int32ul * "driver feature bits 0..31",
    "queue_pfn" / Int32ul * "selected queue address >> QUEUE_ADDR_SHIFT",
    "queue_num" / Int16ul * "selected queue size",
    "queue_sel" / Int16ul * "queue selector",
    "queue_notify" / Int16ul * "queue index written to notify",
    "status" / Int8ul * "device status (virtio.DeviceStatus)",
    "isr" / Int8ul * "ISR status (virtio_pci.IsrStatus), read-to-clear",
)
"""The 20-byte common header seen while MSI-X is disabled."""

LegacyCommonHeaderMsix = Struct(
    *LegacyCommonHeader.subcons,
    "msi_config_vector" / Int16ul * "config change vector, MSI_NO_VECTOR = none",
    "msi_queue_vector" / Int16ul * "vector of the selected queue, MSI_NO_VECTOR = none",
)
"""The 24-byte common header seen while MSI-X is enabled."""


def config_offset(msix_enabled: bool) -> int:
    """Where the device-specific configuration starts (VIRTIO_PCI_CONFIG_OFF)."""
    return COMMON_HEADER_SIZE_MSIX if msix_enabled else COMMON_HEADER_SIZE


def register_at(offset: int, msix_enabled: bool) -> Register | None:
    """The common header register containing byte ``offset``, or None.

    None means the offset is in the device-specific area (or, for negative offsets,
    nowhere); the MSI vector registers only exist while ``msix_enabled``.
    """
    if not 0 <= offset < config_offset(msix_enabled):
        return None
    return _REGISTER_OF_BYTE[offset]


def register_for_access(offset: int, size: int, msix_enabled: bool) -> Register | None:
    """The register an access of ``size`` bytes at ``offset`` lies entirely within, or None.

    This is the rule the legacy admin commands impose: "the resulting access refers to a
    single field and is completely within the virtio common configuration"
    (admin-cmds-legacy-interface.tex); accesses that straddle registers, are empty, or reach
    into the device-specific area give None.
    """
    reg = register_at(offset, msix_enabled)
    if reg is None or size <= 0 or offset + size > reg + reg.width:
        return None
    return reg


class Area(enum.Enum):
    """The two parts of legacy BAR0."""

    COMMON = "common"
    DEVICE = "device"


class Location(NamedTuple):
    """Where a BAR0 offset falls: area and the offset relative to that area's start."""

    area: Area
    offset: int


def locate(offset: int, msix_enabled: bool) -> Location:
    """Split a BAR0 offset into common header or device-specific area.

    Like Linux virtiovf_pci_bar0_rw, only the start offset decides: an access that starts
    in the common header goes there whole, and the owner rejects it if it straddles.
    """
    if offset < 0:
        raise ValueError(f"negative BAR0 offset {offset}")
    start = config_offset(msix_enabled)
    if offset < start:
        return Location(Area.COMMON, offset)
    return Location(Area.DEVICE, offset - start)


def bar0_size(device_config_bytes: int) -> int:
    """Size of the legacy IO BAR: the smallest power of two >= 24 + device config bytes.

    The Linux variant driver always reserves the MSI-X header (24) and virtio-net's
    offsetofend(struct virtio_net_config, status) = 8 bytes, giving 32. QEMU uses 20 when
    the device has no MSI-X; this project always has it.
    """
    if device_config_bytes < 0:
        raise ValueError(f"negative device config size {device_config_bytes}")
    needed = COMMON_HEADER_SIZE_MSIX + device_config_bytes
    return 1 << (needed - 1).bit_length()


# --------------------------------------------------------------------------------------
# Legacy split-ring placement


class QueueLayout(NamedTuple):
    """Guest-physical addresses of a legacy queue's three areas."""

    desc: int
    avail: int
    used: int


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def queue_layout(pfn: int, queue_size: int) -> QueueLayout:
    """Where a legacy queue of ``queue_size`` entries written as ``pfn`` lives.

    split-ring.tex legacy layout: descriptors (16 bytes each) at the base, the available
    ring (flags, idx, ring[N], used_event) right after them, the used ring at the next
    VRING_ALIGN boundary.
    """
    if not 0 <= pfn <= 0xFFFF_FFFF:
        raise ValueError(f"QUEUE_PFN {pfn:#x} is not a 32-bit value")
    if queue_size <= 0:
        raise ValueError(f"queue size {queue_size} must be positive")
    desc = pfn << QUEUE_ADDR_SHIFT
    avail = desc + 16 * queue_size
    used = _align_up(avail + 6 + 2 * queue_size, VRING_ALIGN)
    return QueueLayout(desc, avail, used)


def queue_bytes(queue_size: int) -> int:
    """Bytes a legacy queue occupies: the spec's virtq_size() (split-ring.tex legacy note).

    ALIGN(16 N + 6 + 2 N) + ALIGN(6 + 8 N); e.g. 256 entries -> 12288 bytes. (Linux
    vring_size() does not round up the used ring's tail, so it reports less; the device
    only ever touches the unrounded part.)
    """
    if queue_size <= 0:
        raise ValueError(f"queue size {queue_size} must be positive")
    driver_part = _align_up(16 * queue_size + 6 + 2 * queue_size, VRING_ALIGN)
    return driver_part + _align_up(6 + 8 * queue_size, VRING_ALIGN)
