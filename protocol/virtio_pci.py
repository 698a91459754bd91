"""Virtio over PCI: identity, vendor capabilities, common configuration, ISR status.

Sources: virtio spec §4.1 "Virtio Over PCI Bus" (transport-pci.tex); Linux
include/uapi/linux/virtio_pci.h, virtio_ids.h (VIRTIO_TRANS_ID_*). Everything here is modern
(virtio 1.x, little-endian); the legacy IO BAR layout lives in
:mod:`vfuserver.protocol.virtio_legacy`, and what is not PCI-specific (device status,
feature bits, device types) in :mod:`vfuserver.protocol.virtio`.

For comparison, QEMU's virtio-net-pci (hw/virtio/virtio-pci.c) places its modern
structures in BAR4: common @0x0000, ISR @0x1000, device @0x2000, notify @0x3000
(notify_off_multiplier 4), followed by a VIRTIO_PCI_CAP_PCI_CFG capability (bar 0, offset 0,
length 0). The device side chooses its own layout; this module only describes the formats.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from vfuserver.protocol.fields import IntEnumAdapter
from vfuserver.protocol.pci import CapabilityId, ClassCode
from vfuserver.protocol.virtio import DeviceType

# --------------------------------------------------------------------------------------
# Identity (§4.1.2 PCI Device Discovery; virtio_ids.h)

VENDOR_ID = 0x1AF4
"""PCI vendor id of every virtio device (also the subsystem vendor id of transitional ones)."""
MODERN_DEVICE_ID_BASE = 0x1040
"""Non-transitional PCI device id = 0x1040 + virtio device id (§4.1.2)."""
MODERN_REVISION_ID = 1
"""Non-transitional devices SHOULD have a PCI Revision ID of 1 or higher (§4.1.2.1)."""
MODERN_MIN_SUBSYSTEM_ID = 0x40
"""Non-transitional devices SHOULD have a Subsystem Device ID of 0x40 or higher (§4.1.2.1)."""
MSI_NO_VECTOR = 0xFFFF
"""VIRTIO_MSI_NO_VECTOR: "no MSI-X vector" in config_msix_vector / queue_msix_vector."""


class TransitionalDeviceId(enum.IntEnum):
    """PCI device ids of transitional devices (§4.1.2.3, virtio_ids.h VIRTIO_TRANS_ID_*).

    Pitfall: an old virtio_ids.h spelled these in decimal (1000); they are hex.
    """

    NET = 0x1000
    BLOCK = 0x1001
    BALLOON = 0x1002
    CONSOLE = 0x1003
    SCSI = 0x1004
    ENTROPY = 0x1005
    NINEP = 0x1009


def modern_device_id(device_type: int) -> int:
    """PCI device id of a non-transitional device of ``device_type`` (§4.1.2)."""
    if not 0 <= device_type <= 0xFFFF - MODERN_DEVICE_ID_BASE:
        raise ValueError(f"virtio device type {device_type} out of range")
    return MODERN_DEVICE_ID_BASE + device_type


class PciIdInfo(NamedTuple):
    """What a PCI transport presents for one virtio device type besides 0x1040 + type."""

    transitional_device_id: TransitionalDeviceId
    """The device id of the transitional presentation; its subsystem id is the type."""
    class_code: ClassCode


PCI_ID_INFO: dict[DeviceType, PciIdInfo] = {
    DeviceType.NET: PciIdInfo(TransitionalDeviceId.NET, ClassCode.NETWORK_ETHERNET),
    DeviceType.BLOCK: PciIdInfo(TransitionalDeviceId.BLOCK, ClassCode.STORAGE_SCSI),
}
"""By virtio device type, the device types this project serves: QEMU's
virtio_pci_id_info[] (hw/virtio/virtio-pci.c), whose class codes Linux and firmware match
on (SeaBIOS probes virtio-blk by id, the guest's lspci names the class)."""


def pci_id_info(device_type: int) -> PciIdInfo:
    """:data:`PCI_ID_INFO` of ``device_type``; ValueError for a type without an entry."""
    try:
        return PCI_ID_INFO[DeviceType(device_type)]
    except (KeyError, ValueError):
        raise ValueError(f"no PCI identity for virtio device type {device_type}") from None


# --------------------------------------------------------------------------------------
# Vendor-specific capabilities (§4.1.4 Virtio Structure PCI Capabilities)


class CfgType(enum.IntEnum):
    """``cfg_type`` of a virtio PCI capability (VIRTIO_PCI_CAP_*_CFG). Other values are
    reserved and must be ignored by drivers (§4.1.4)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5
    SHARED_MEMORY = 8
    VENDOR = 9


CAP_SIZE = 16
"""sizeof(struct virtio_pci_cap)."""
NOTIFY_CAP_SIZE = 20
"""sizeof(struct virtio_pci_notify_cap)."""
PCI_CFG_CAP_SIZE = 20
"""sizeof(struct virtio_pci_cfg_cap)."""
CAP64_SIZE = 24
"""sizeof(struct virtio_pci_cap64) (shared memory regions, §4.1.4.7)."""
VENDOR_DATA_CAP_SIZE = 6
"""sizeof(struct virtio_pci_vndr_data) header (§4.1.4.10); the capability pads to 4 bytes."""


class CapOffset(enum.IntEnum):
    """Byte offsets inside a virtio PCI capability (virtio_pci.h VIRTIO_PCI_CAP_*)."""

    VNDR = 0
    NEXT = 1
    LEN = 2
    CFG_TYPE = 3
    BAR = 4
    ID = 5
    OFFSET = 8
    LENGTH = 12
    TAIL = 16
    """notify_off_multiplier (NOTIFY), pci_cfg_data (PCI) or offset_hi (cap64)."""


VirtioPciCap = Struct(
    "cap_vndr" / Const(int(CapabilityId.VENDOR), Int8ul) * "PCI_CAP_ID_VNDR",
    "cap_next" / Int8ul * "offset of the next capability, 0 = end of list",
    "cap_len" / Int8ul * "length of this capability including the virtio tail",
    "cfg_type" / IntEnumAdapter(CfgType, Int8ul) * "which structure this describes",
    "bar" / Int8ul * "BAR index 0..5 holding the structure",
    "id" / Int8ul * "tells apart several capabilities of the same cfg_type",
    Padding(2),
    "offset" / Int32ul * "offset of the structure within the BAR",
    "length" / Int32ul * "length of the structure in bytes",
)
"""struct virtio_pci_cap (§4.1.4)."""

VirtioPciNotifyCap = Struct(
    "cap" / VirtioPciCap,
    "notify_off_multiplier" / Int32ul * "queue notify address = offset + queue_notify_off * this",
)
"""struct virtio_pci_notify_cap (§4.1.4.4)."""

VirtioPciCfgCap = Struct(
    "cap" / VirtioPciCap,
    "pci_cfg_data" / Bytes(4) * "window onto BAR cap.bar at cap.offset, cap.length 1/2/4 bytes",
)
"""struct virtio_pci_cfg_cap (§4.1.4.9): BAR access through PCI configuration space."""

VirtioPciCap64 = Struct(
    "cap" / VirtioPciCap,
    "offset_hi" / Int32ul * "upper 32 bits of the offset",
    "length_hi" / Int32ul * "upper 32 bits of the length",
)
"""struct virtio_pci_cap64 (§4.1.4.7, shared memory regions)."""

VirtioPciVendorData = Struct(
    "cap_vndr" / Const(int(CapabilityId.VENDOR), Int8ul) * "PCI_CAP_ID_VNDR",
    "cap_next" / Int8ul,
    "cap_len" / Int8ul,
    "cfg_type" / IntEnumAdapter(CfgType, Int8ul) * "VIRTIO_PCI_CAP_VENDOR_CFG",
    "vendor_id" / Int16ul * "PCI vendor id that defines the format of what follows",
)
"""struct virtio_pci_vndr_data (§4.1.4.10), the fixed head of a vendor data capability."""


def notify_offset(cap_offset: int, queue_notify_off: int, notify_off_multiplier: int) -> int:
    """Offset within the notify BAR at which queue notifications are written (§4.1.4.4)."""
    return cap_offset + queue_notify_off * notify_off_multiplier


# --------------------------------------------------------------------------------------
# Common configuration structure (§4.1.4.3)

COMMON_CFG_SIZE = 64
"""sizeof(struct virtio_pci_modern_common_cfg), i.e. with the admin queue fields.
Linux (vp_check_common_size) requires this much when VIRTIO_F_ADMIN_VQ is negotiated."""
COMMON_CFG_BASE_SIZE = 56
"""sizeof(struct virtio_pci_common_cfg): up to queue_device; queue_notify_data (needs
VIRTIO_F_NOTIFICATION_DATA) and queue_reset (VIRTIO_F_RING_RESET) follow."""

CommonCfg = Struct(
    "device_feature_select" / Int32ul * "read-write: which 32-bit word device_feature shows",
    "device_feature" / Int32ul * "read-only for driver",
    "driver_feature_select" / Int32ul * "read-write: which 32-bit word driver_feature takes",
    "driver_feature" / Int32ul * "read-write",
    "config_msix_vector" / Int16ul * "read-write (Linux: msix_config)",
    "num_queues" / Int16ul * "read-only for driver",
    "device_status" / Int8ul * "read-write; writing 0 resets the device",
    "config_generation" / Int8ul * "read-only for driver",
    "queue_select" / Int16ul * "read-write: selects the queue the queue_* fields show",
    "queue_size" / Int16ul * "read-write",
    "queue_msix_vector" / Int16ul * "read-write",
    "queue_enable" / Int16ul * "read-write",
    "queue_notify_off" / Int16ul * "read-only for driver",
    "queue_desc" / Int64ul * "read-write: descriptor area",
    "queue_driver" / Int64ul * "read-write: driver (avail) area",
    "queue_device" / Int64ul * "read-write: device (used) area",
    "queue_notify_data" / Int16ul * "read-only for driver (spec: queue_notif_config_data)",
    "queue_reset" / Int16ul * "read-write",
    "admin_queue_index" / Int16ul * "read-only for driver",
    "admin_queue_num" / Int16ul * "read-only for driver; 0 = no admin queues",
)
"""struct virtio_pci_common_cfg with the modern tail (64 bytes)."""


class CommonCfgRegister(enum.IntEnum):
    """Registers of the common configuration, by byte offset (Linux VIRTIO_PCI_COMMON_*).

    64-bit fields appear as their low and high 32-bit halves, which a driver may access
    independently (§4.1.3.1); :func:`common_cfg_access` maps an access onto these.
    """

    DEVICE_FEATURE_SELECT = 0
    DEVICE_FEATURE = 4
    DRIVER_FEATURE_SELECT = 8
    DRIVER_FEATURE = 12
    CONFIG_MSIX_VECTOR = 16
    NUM_QUEUES = 18
    DEVICE_STATUS = 20
    CONFIG_GENERATION = 21
    QUEUE_SELECT = 22
    QUEUE_SIZE = 24
    QUEUE_MSIX_VECTOR = 26
    QUEUE_ENABLE = 28
    QUEUE_NOTIFY_OFF = 30
    QUEUE_DESC_LO = 32
    QUEUE_DESC_HI = 36
    QUEUE_DRIVER_LO = 40
    QUEUE_DRIVER_HI = 44
    QUEUE_DEVICE_LO = 48
    QUEUE_DEVICE_HI = 52
    QUEUE_NOTIFY_DATA = 56
    QUEUE_RESET = 58
    ADMIN_QUEUE_INDEX = 60
    ADMIN_QUEUE_NUM = 62

    @property
    def width(self) -> int:
        """Access width in bytes."""
        return _COMMON_CFG_WIDTH[self]

    @property
    def writable(self) -> bool:
        """False for the fields §4.1.4.3 marks "read-only for driver"."""
        return self not in _COMMON_CFG_READ_ONLY


_COMMON_CFG_WIDTH: dict[CommonCfgRegister, int] = {
    CommonCfgRegister.DEVICE_FEATURE_SELECT: 4,
    CommonCfgRegister.DEVICE_FEATURE: 4,
    CommonCfgRegister.DRIVER_FEATURE_SELECT: 4,
    CommonCfgRegister.DRIVER_FEATURE: 4,
    CommonCfgRegister.CONFIG_MSIX_VECTOR: 2,
    CommonCfgRegister.NUM_QUEUES: 2,
    CommonCfgRegister.DEVICE_STATUS: 1,
    CommonCfgRegister.CONFIG_GENERATION: 1,
    CommonCfgRegister.QUEUE_SELECT: 2,
    CommonCfgRegister.QUEUE_SIZE: 2,
    CommonCfgRegister.QUEUE_MSIX_VECTOR: 2,
    CommonCfgRegister.QUEUE_ENABLE: 2,
    CommonCfgRegister.QUEUE_NOTIFY_OFF: 2,
    CommonCfgRegister.QUEUE_DESC_LO: 4,
    CommonCfgRegister.QUEUE_DESC_HI: 4,
    CommonCfgRegister.QUEUE_DRIVER_LO: 4,
    CommonCfgRegister.QUEUE_DRIVER_HI: 4,
    CommonCfgRegister.QUEUE_DEVICE_LO: 4,
    CommonCfgRegister.QUEUE_DEVICE_HI: 4,
    CommonCfgRegister.QUEUE_NOTIFY_DATA: 2,
    CommonCfgRegister.QUEUE_RESET: 2,
    CommonCfgRegister.ADMIN_QUEUE_INDEX: 2,
    CommonCfgRegister.ADMIN_QUEUE_NUM: 2,
}
_COMMON_CFG_READ_ONLY = frozenset(
    {
        CommonCfgRegister.DEVICE_FEATURE,
        CommonCfgRegister.NUM_QUEUES,
        CommonCfgRegister.CONFIG_GENERATION,
        CommonCfgRegister.QUEUE_NOTIFY_OFF,
        CommonCfgRegister.QUEUE_NOTIFY_DATA,
        CommonCfgRegister.ADMIN_QUEUE_INDEX,
        CommonCfgRegister.ADMIN_QUEUE_NUM,
    }
)
_QWORD_HALVES: dict[int, tuple[CommonCfgRegister, CommonCfgRegister]] = {
    low: (low, CommonCfgRegister(low + 4))
    for low in (
        CommonCfgRegister.QUEUE_DESC_LO,
        CommonCfgRegister.QUEUE_DRIVER_LO,
        CommonCfgRegister.QUEUE_DEVICE_LO,
    )
}
"""64-bit fields: low-half offset -> (low, high) registers."""


def common_cfg_access(offset: int, size: int) -> tuple[CommonCfgRegister, ...]:
    """The registers a driver access of ``size`` bytes at ``offset`` addresses, in order.

    §4.1.3.1: the driver MUST use natural-width accesses; a 64-bit field may be accessed
    whole (returned as its two halves, low first) or as two independent 32-bit halves.
    Anything else (partial, straddling, beyond the structure) returns ``()`` and is for the
    transport to reject.
    """
    if size == 8 and offset in _QWORD_HALVES:
        return _QWORD_HALVES[offset]
    try:
        reg = CommonCfgRegister(offset)
    except ValueError:
        return ()
    return (reg,) if reg.width == size else ()


# --------------------------------------------------------------------------------------
# ISR status (§4.1.4.5)


class IsrStatus(enum.IntFlag):
    """ISR status bits (§4.1.4.5); reading the ISR byte clears it."""

    QUEUE = 0x1
    CONFIG = 0x2
