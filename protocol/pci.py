"""PCI type-0 configuration header (PCI Local Bus Spec 3.0, ch. 6.1; Linux uapi pci_regs.h)."""

from __future__ import annotations

import enum

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

CONFIG_SPACE_SIZE = 256
"""Conventional PCI configuration space; PCI Express extends it to 4096."""
HEADER_SIZE = 64
CAPABILITY_LIST_START = 0x40
"""First byte after the type-0 header: capabilities are placed from here."""


class Offset(enum.IntEnum):
    """Register offsets in the type-0 header (pci_regs.h PCI_*)."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_PROG = 0x09
    CLASS_DEVICE = 0x0A
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BASE_ADDRESS_0 = 0x10
    CARDBUS_CIS = 0x28
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITY_LIST = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D
    MIN_GNT = 0x3E
    MAX_LAT = 0x3F


class Command(enum.IntFlag):
    """PCI_COMMAND bits."""

    IO = 0x1
    MEMORY = 0x2
    MASTER = 0x4
    SPECIAL = 0x8
    INVALIDATE = 0x10
    VGA_PALETTE = 0x20
    PARITY = 0x40
    WAIT = 0x80
    SERR = 0x100
    FAST_BACK = 0x200
    INTX_DISABLE = 0x400


class Status(enum.IntFlag):
    """PCI_STATUS bits."""

    IMM_READY = 0x01
    INTERRUPT = 0x08
    CAP_LIST = 0x10
    MHZ66 = 0x20
    FAST_BACK = 0x80
    PARITY = 0x100
    DEVSEL_MEDIUM = 0x200
    SIG_TARGET_ABORT = 0x800
    REC_TARGET_ABORT = 0x1000
    REC_MASTER_ABORT = 0x2000
    SIG_SYSTEM_ERROR = 0x4000
    DETECTED_PARITY = 0x8000


STATUS_W1C = (
    Status.PARITY
    | Status.SIG_TARGET_ABORT
    | Status.REC_TARGET_ABORT
    | Status.REC_MASTER_ABORT
    | Status.SIG_SYSTEM_ERROR
    | Status.DETECTED_PARITY
)
"""Status bits a write of 1 clears (PCI 3.0 §6.2.3)."""

BAR_COUNT = 6
BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
BAR_IO_MASK = ~0x3 & 0xFFFFFFFF
BAR_MEM_MASK = ~0xF & 0xFFFFFFFF


class ClassCode(enum.IntEnum):
    """Base/sub class pairs used here, as the 16-bit PCI_CLASS_DEVICE value."""

    STORAGE_SCSI = 0x0100
    """What QEMU gives virtio-blk and virtio-scsi (PCI_CLASS_STORAGE_SCSI)."""
    NETWORK_ETHERNET = 0x0200


Type0Header = Struct(
    "vendor_id" / Int16ul * "PCI_VENDOR_ID",
    "device_id" / Int16ul * "PCI_DEVICE_ID",
    "command" / Int16ul * "PCI_COMMAND",
    "status" / Int16ul * "PCI_STATUS",
    "revision_id" / Int8ul * "PCI_REVISION_ID",
    "prog_if" / Int8ul * "programming interface (PCI_CLASS_PROG)",
    "subclass" / Int8ul * "sub class",
    "base_class" / Int8ul * "base class",
    "cache_line_size" / Int8ul,
    "latency_timer" / Int8ul,
    "header_type" / Const(0, Int8ul) * "0 = normal (type-0) header, single function",
    "bist" / Int8ul,
    "bars" / Int32ul[BAR_COUNT] * "PCI_BASE_ADDRESS_0..5",
    "cardbus_cis" / Int32ul,
    "subsystem_vendor_id" / Int16ul,
    "subsystem_id" / Int16ul,
    "rom_address" / Int32ul * "expansion ROM BAR; 0 = not implemented",
    "capabilities_pointer" / Int8ul * "offset of the first capability, 0 = none",
    "reserved" / Bytes(7),
    "interrupt_line" / Int8ul,
    "interrupt_pin" / Int8ul * "1 = INTA#, 0 = no INTx",
    "min_gnt" / Int8ul,
    "max_lat" / Int8ul,
)
"""The 64-byte type-0 configuration header."""

CapabilityHeader = Struct(
    "cap_id" / Int8ul * "PCI_CAP_ID_*",
    "next" / Int8ul * "offset of the next capability, 0 = end of list",
)


class CapabilityId(enum.IntEnum):
    """PCI_CAP_ID_* (PCI Code and ID Assignment Spec)."""

    PM = 0x01
    MSI = 0x05
    VENDOR = 0x09
    EXPRESS = 0x10
    MSIX = 0x11
