"""vfio-user wire format (QEMU docs/interop/vfio-user.rst; libvfio-user include/vfio-user.h).

Every message starts with a 16-byte header; all fields are host-endian, which is
little-endian on every platform vfuserver runs on.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

from construct import Bytes, GreedyBytes, Int16ul, Int32ul, Int64ul, Struct

MAX_DATA_XFER_SIZE = 1 << 20
"""The default ``max_data_xfer_size`` capability (and libvfio-user's limit)."""


class Command(enum.IntEnum):
    """vfio-user command numbers."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13


class HeaderFlags(enum.IntFlag):
    """Header flags: bits 0-3 are the message type, then No_reply and Error."""

    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


TYPE_MASK = 0xF

Header = Struct(
    "msg_id" / Int16ul * "chosen by the sender, echoed in the reply",
    "command" / Int16ul * "Command, also set in the reply",
    "msg_size" / Int32ul * "whole message including this header",
    "flags" / Int32ul * "HeaderFlags; bits 0-3 type (0 command, 1 reply)",
    "error_no" / Int32ul * "errno, valid in a reply with ERROR set",
)
HEADER = struct.Struct("<HHIII")
"""The header as a precomputed struct for the hot path (checked against Header by a test)."""

Version = Struct(
    "major" / Int16ul,
    "minor" / Int16ul,
    "json" / GreedyBytes * "NUL-terminated JSON capabilities, may be empty",
)


class DeviceFlags(enum.IntFlag):
    RESET = 0x1
    PCI = 0x2


DeviceInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul * "DeviceFlags",
    "num_regions" / Int32ul,
    "num_irqs" / Int32ul,
)


class RegionFlags(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2
    MMAP = 0x4
    CAPS = 0x8


class PciRegion(enum.IntEnum):
    """vfio-pci region indices."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


RegionInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul * "RegionFlags",
    "index" / Int32ul,
    "cap_offset" / Int32ul,
    "size" / Int64ul,
    "offset" / Int64ul * "file offset for mmap; vfio-user servers may use it freely",
)


class PciIrq(enum.IntEnum):
    """vfio-pci interrupt indices."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 0x1
    MASKABLE = 0x2
    AUTOMASKED = 0x4
    NORESIZE = 0x8


IrqInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul * "IrqInfoFlags",
    "index" / Int32ul,
    "count" / Int32ul,
)


class IrqSetFlags(enum.IntFlag):
    DATA_NONE = 0x1
    DATA_BOOL = 0x2
    DATA_EVENTFD = 0x4
    ACTION_MASK = 0x8
    ACTION_UNMASK = 0x10
    ACTION_TRIGGER = 0x20


IrqSet = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul * "IrqSetFlags: one DATA_* and one ACTION_*",
    "index" / Int32ul,
    "start" / Int32ul,
    "count" / Int32ul,
)

RegionAccess = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
)
REGION_ACCESS = struct.Struct("<QII")


class DmaFlags(enum.IntFlag):
    READ = 0x1
    WRITE = 0x2


DmaMap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul * "DmaFlags",
    "offset" / Int64ul * "offset into the file descriptor sent with the message",
    "address" / Int64ul * "IOVA (guest-physical address without a vIOMMU)",
    "size" / Int64ul,
)

DMA_UNMAP_FLAG_ALL = 0x2

DmaUnmap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "address" / Int64ul,
    "size" / Int64ul,
)

ErrorReply = Bytes(0)
"""An error reply carries no payload: the header's error_no says why."""


def build_version(major: int, minor: int, capabilities: dict[str, Any] | None) -> bytes:
    """A VERSION payload with optional JSON capabilities."""
    text = b"" if capabilities is None else json.dumps(
        {"capabilities": capabilities}).encode() + b"\0"
    return bytes(Version.build({"major": major, "minor": minor, "json": text}))


def parse_version(payload: bytes) -> tuple[int, int, dict[str, Any]]:
    """(major, minor, capabilities) from a VERSION payload; ValueError if malformed."""
    parsed = Version.parse(payload)
    text = bytes(parsed.json)
    caps: dict[str, Any] = {}
    if text:
        if not text.endswith(b"\0"):
            raise ValueError("VERSION JSON is not NUL-terminated")
        caps = json.loads(text[:-1]).get("capabilities", {})
    return parsed.major, parsed.minor, caps
