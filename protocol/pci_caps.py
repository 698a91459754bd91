"""PCI capability structures: Power Management, MSI-X, PCI Express (v2 endpoint).

Sources: PCI Bus Power Management Interface Spec 1.2 ch. 3; PCI Local Bus Spec 3.0 §6.8.2
(MSI-X); PCI Express Base Spec §7.5.3 (PCI Express Capability); Linux
include/uapi/linux/pci_regs.h (names in docstrings); libvfio-user include/pci_caps/*.h.

Only formats and constants: placing capabilities and chaining ``next`` pointers is the
device side's job. Multi-bit register fields are plain little-endian integers here, with
IntFlag bits plus ``*_MASK`` constants and small pure helpers for the packed fields.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from construct import Const, Int8ul, Int16ul, Int32ul, Struct

from vfuserver.protocol.pci import BAR_COUNT, CapabilityId

# --------------------------------------------------------------------------------------
# Power Management (PCI_CAP_ID_PM)

PM_CAP_SIZE = 8
"""PCI_PM_SIZEOF."""


class PmOffset(enum.IntEnum):
    """Register offsets inside the PM capability."""

    PMC = 2
    """PCI_PM_PMC: Power Management Capabilities (read-only)."""
    PMCSR = 4
    """PCI_PM_CTRL: Power Management Control/Status."""
    PMCSR_BSE = 6
    """PCI_PM_PPB_EXTENSIONS: bridge support extensions."""
    DATA = 7
    """PCI_PM_DATA_REGISTER."""


PmCapability = Struct(
    "cap_id" / Const(int(CapabilityId.PM), Int8ul) * "PCI_CAP_ID_PM",
    "next" / Int8ul * "offset of the next capability, 0 = end of list",
    "pmc" / Int16ul * "PMC: version, D1/D2 support, PME support (PmCapabilities)",
    "pmcsr" / Int16ul * "PMCSR: power state, PME enable/status (PmControl)",
    "pmcsr_bse" / Int8ul * "bridge support extensions, 0 for endpoints",
    "data" / Int8ul * "optional data register, 0 if unused",
)
"""The 8-byte Power Management capability."""

PMC_VERSION_MASK = 0x0007
"""PCI_PM_CAP_VER_MASK."""
PMC_VERSION_1_2 = 3
"""Version field value for PCI PM 1.2, what QEMU and libvfio-user advertise."""
PMC_AUX_CURRENT_MASK = 0x01C0
"""PCI_PM_CAP_AUX_POWER."""


class PmCapabilities(enum.IntFlag):
    """Single-bit fields of PMC (PCI_PM_CAP_*)."""

    PME_CLOCK = 0x0008
    IMMEDIATE_READINESS = 0x0010
    """Reserved in PM 1.2; PCIe's Immediate_Readiness_on_Return_to_D0."""
    DSI = 0x0020
    D1 = 0x0200
    D2 = 0x0400
    PME_D0 = 0x0800
    PME_D1 = 0x1000
    PME_D2 = 0x2000
    PME_D3HOT = 0x4000
    PME_D3COLD = 0x8000


PMCSR_STATE_MASK = 0x0003
"""PCI_PM_CTRL_STATE_MASK: current power state (PowerState)."""
PMCSR_DATA_SELECT_MASK = 0x1E00
PMCSR_DATA_SCALE_MASK = 0x6000


class PmControl(enum.IntFlag):
    """Single-bit fields of PMCSR (PCI_PM_CTRL_*)."""

    NO_SOFT_RESET = 0x0008
    """Read-only: D3hot -> D0 does not reset the function."""
    PME_ENABLE = 0x0100
    PME_STATUS = 0x8000
    """Write 1 to clear."""


class PowerState(enum.IntEnum):
    """PMCSR power state field."""

    D0 = 0
    D1 = 1
    D2 = 2
    D3HOT = 3


# --------------------------------------------------------------------------------------
# MSI-X (PCI_CAP_ID_MSIX)

MSIX_CAP_SIZE = 12
"""PCI_CAP_MSIX_SIZEOF."""
MSIX_ENTRY_SIZE = 16
"""PCI_MSIX_ENTRY_SIZE: one table entry."""
MSIX_MAX_VECTORS = 2048
"""Table size is an 11-bit N-1 field."""
MSIX_TABLE_SIZE_MASK = 0x07FF
"""PCI_MSIX_FLAGS_QSIZE: table size minus one."""
MSIX_BIR_MASK = 0x7
"""PCI_MSIX_TABLE_BIR / PCI_MSIX_PBA_BIR."""
MSIX_OFFSET_MASK = 0xFFFF_FFF8
"""PCI_MSIX_TABLE_OFFSET / PCI_MSIX_PBA_OFFSET: QWORD-aligned offset within the BAR."""


class MsixOffset(enum.IntEnum):
    """Register offsets inside the MSI-X capability (PCI_MSIX_*)."""

    MESSAGE_CONTROL = 2
    """PCI_MSIX_FLAGS."""
    TABLE = 4
    """PCI_MSIX_TABLE: table offset | BIR."""
    PBA = 8
    """PCI_MSIX_PBA: pending bit array offset | BIR."""


class MsixControl(enum.IntFlag):
    """Single-bit fields of Message Control (PCI_MSIX_FLAGS_*); bits 0..10 are the size."""

    FUNCTION_MASK = 0x4000
    """PCI_MSIX_FLAGS_MASKALL."""
    ENABLE = 0x8000


MsixCapability = Struct(
    "cap_id" / Const(int(CapabilityId.MSIX), Int8ul) * "PCI_CAP_ID_MSIX",
    "next" / Int8ul * "offset of the next capability, 0 = end of list",
    "message_control" / Int16ul * "table size - 1 (bits 0..10), function mask, enable",
    "table" / Int32ul * "table offset (8-aligned) | BAR indicator (bits 0..2)",
    "pba" / Int32ul * "pending bit array offset (8-aligned) | BAR indicator (bits 0..2)",
)
"""The 12-byte MSI-X capability."""


class MsixEntryOffset(enum.IntEnum):
    """Offsets inside an MSI-X table entry (PCI_MSIX_ENTRY_*)."""

    LOWER_ADDR = 0
    UPPER_ADDR = 4
    DATA = 8
    VECTOR_CTRL = 12


MSIX_ENTRY_CTRL_MASKED = 0x1
"""PCI_MSIX_ENTRY_CTRL_MASKBIT: the vector is masked (its reset value)."""

MsixTableEntry = Struct(
    "msg_addr_lo" / Int32ul * "message address bits 0..31 (DWORD-aligned)",
    "msg_addr_hi" / Int32ul * "message address bits 32..63",
    "msg_data" / Int32ul * "message data",
    "vector_control" / Int32ul * "bit 0 = masked",
)
"""One 16-byte MSI-X table entry."""


class OffsetBir(NamedTuple):
    """A decoded MSI-X table/PBA register: BAR index and offset within that BAR."""

    offset: int
    bir: int


def msix_table_size(message_control: int) -> int:
    """Number of table entries encoded in Message Control."""
    return (message_control & MSIX_TABLE_SIZE_MASK) + 1


def msix_message_control(table_size: int, *, enable: bool = False, mask: bool = False) -> int:
    """Message Control for ``table_size`` vectors with the given enable / function-mask bits."""
    if not 1 <= table_size <= MSIX_MAX_VECTORS:
        raise ValueError(f"MSI-X table size {table_size} not in 1..{MSIX_MAX_VECTORS}")
    control = table_size - 1
    if enable:
        control |= MsixControl.ENABLE
    if mask:
        control |= MsixControl.FUNCTION_MASK
    return control


def encode_offset_bir(offset: int, bir: int) -> int:
    """The table/PBA register value for a QWORD-aligned ``offset`` in BAR ``bir``."""
    if not 0 <= bir < BAR_COUNT:
        raise ValueError(f"BAR indicator {bir} not in 0..{BAR_COUNT - 1}")
    if offset & ~MSIX_OFFSET_MASK or not 0 <= offset <= MSIX_OFFSET_MASK:
        raise ValueError(f"MSI-X offset {offset:#x} is not a QWORD-aligned 32-bit value")
    return offset | bir


def decode_offset_bir(value: int) -> OffsetBir:
    """Split a table/PBA register into offset and BAR indicator."""
    return OffsetBir(value & MSIX_OFFSET_MASK, value & MSIX_BIR_MASK)


def msix_table_bytes(vectors: int) -> int:
    """Bytes of the MSI-X table for ``vectors`` entries."""
    return vectors * MSIX_ENTRY_SIZE


def msix_pba_bytes(vectors: int) -> int:
    """Bytes of the pending bit array: one bit per vector, in whole QWORDs."""
    return (vectors + 63) // 64 * 8


# --------------------------------------------------------------------------------------
# PCI Express capability (PCI_CAP_ID_EXP), version 2

EXPRESS_CAP_SIZE = 0x3C
"""The complete v2 structure, through Slot Status 2."""
EXPRESS_ENDPOINT_SIZE_V1 = 0x14
"""PCI_CAP_EXP_ENDPOINT_SIZEOF_V1: v1 endpoints end after Link Status."""
EXPRESS_ENDPOINT_SIZE_V2 = 0x34
"""PCI_CAP_EXP_ENDPOINT_SIZEOF_V2: v2 endpoints with a link end after Link Status 2.
Pitfall: Linux pci_regs.h carried the wrong value 0x32 from commit fb82437fdd8c until the
v7.0 fix "PCI: Correct PCI_CAP_EXP_ENDPOINT_SIZEOF_V2 value"."""
EXPRESS_RC_ENDPOINT_SIZE_V2 = 0x2C
"""PCI_CAP_EXP_RC_ENDPOINT_SIZEOF_V2: v2 endpoints without a link end after DevSta2."""

EXPRESS_FLAGS_VERSION_MASK = 0x000F
"""PCI_EXP_FLAGS_VERS: capability version (2 here)."""
EXPRESS_FLAGS_TYPE_MASK = 0x00F0
"""PCI_EXP_FLAGS_TYPE: device/port type, ExpressPortType << 4."""
EXPRESS_FLAGS_SLOT = 0x0100
"""PCI_EXP_FLAGS_SLOT: slot implemented (ports only)."""
EXPRESS_FLAGS_IRQ_MASK = 0x3E00
"""PCI_EXP_FLAGS_IRQ: interrupt message number."""


class ExpressPortType(enum.IntEnum):
    """Device/port type field of the PCIe capability register (PCI_EXP_TYPE_*)."""

    ENDPOINT = 0x0
    LEGACY_ENDPOINT = 0x1
    ROOT_PORT = 0x4
    UPSTREAM = 0x5
    DOWNSTREAM = 0x6
    PCI_BRIDGE = 0x7
    PCIE_BRIDGE = 0x8
    RC_END = 0x9
    """Root complex integrated endpoint."""
    RC_EC = 0xA
    """Root complex event collector."""


class ExpressOffset(enum.IntEnum):
    """Register offsets inside the PCIe capability (PCI_EXP_*)."""

    FLAGS = 0x02
    DEVCAP = 0x04
    DEVCTL = 0x08
    DEVSTA = 0x0A
    LNKCAP = 0x0C
    LNKCTL = 0x10
    LNKSTA = 0x12
    SLTCAP = 0x14
    SLTCTL = 0x18
    SLTSTA = 0x1A
    RTCTL = 0x1C
    RTCAP = 0x1E
    RTSTA = 0x20
    DEVCAP2 = 0x24
    DEVCTL2 = 0x28
    DEVSTA2 = 0x2A
    LNKCAP2 = 0x2C
    LNKCTL2 = 0x30
    LNKSTA2 = 0x32
    SLTCAP2 = 0x34
    SLTCTL2 = 0x38
    SLTSTA2 = 0x3A


class ExpressDevCap(enum.IntFlag):
    """Device Capabilities bits used here (PCI_EXP_DEVCAP_*); payload size is bits 0..2."""

    RBER = 0x0000_8000
    """Role-based error reporting (required of PCIe 1.1+ functions)."""
    FLR = 0x1000_0000
    """Function Level Reset capable."""


class ExpressDevCtl(enum.IntFlag):
    """Device Control bits (PCI_EXP_DEVCTL_*); payload and read request size are fields."""

    CERE = 0x0001
    NFERE = 0x0002
    FERE = 0x0004
    URRE = 0x0008
    RELAX_EN = 0x0010
    EXT_TAG = 0x0100
    NOSNOOP_EN = 0x0800
    BCR_FLR = 0x8000
    """Initiate Function Level Reset; always reads 0."""


EXPRESS_DEVCTL_PAYLOAD_MASK = 0x00E0
EXPRESS_DEVCTL_READRQ_MASK = 0x7000

ExpressCapability = Struct(
    "cap_id" / Const(int(CapabilityId.EXPRESS), Int8ul) * "PCI_CAP_ID_EXP",
    "next" / Int8ul * "offset of the next capability, 0 = end of list",
    "flags" / Int16ul * "version, device/port type, slot implemented, IRQ message number",
    "devcap" / Int32ul * "Device Capabilities",
    "devctl" / Int16ul * "Device Control",
    "devsta" / Int16ul * "Device Status",
    "lnkcap" / Int32ul * "Link Capabilities",
    "lnkctl" / Int16ul * "Link Control",
    "lnksta" / Int16ul * "Link Status",
    "sltcap" / Int32ul * "Slot Capabilities (ports with a slot only)",
    "sltctl" / Int16ul * "Slot Control",
    "sltsta" / Int16ul * "Slot Status",
    "rtctl" / Int16ul * "Root Control (root ports only)",
    "rtcap" / Int16ul * "Root Capabilities",
    "rtsta" / Int32ul * "Root Status",
    "devcap2" / Int32ul * "Device Capabilities 2",
    "devctl2" / Int16ul * "Device Control 2",
    "devsta2" / Int16ul * "Device Status 2",
    "lnkcap2" / Int32ul * "Link Capabilities 2",
    "lnkctl2" / Int16ul * "Link Control 2",
    "lnksta2" / Int16ul * "Link Status 2",
    "sltcap2" / Int32ul * "Slot Capabilities 2",
    "sltctl2" / Int16ul * "Slot Control 2",
    "sltsta2" / Int16ul * "Slot Status 2",
)
"""The 60-byte PCI Express capability, version 2 layout."""


def express_flags(
    port_type: ExpressPortType = ExpressPortType.ENDPOINT, *, version: int = 2, irq: int = 0
) -> int:
    """The PCIe capability register value for ``port_type``."""
    if not 0 <= version <= 0xF:
        raise ValueError(f"PCIe capability version {version} out of range")
    if not 0 <= irq <= 31:
        raise ValueError(f"interrupt message number {irq} out of range")
    return version | port_type << 4 | irq << 9
