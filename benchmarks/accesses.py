"""The register accesses the region-access and in-process benchmarks time, as one table.

Each kind is a cycle of accesses issued one at a time; the same table drives the C client
(``r:REGION:OFFSET:WIDTH`` / ``w:REGION:OFFSET:WIDTH:VALUE``) and the in-process loop that
calls the BAR region objects directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from vfuserver.devices.virtio_pci import MODERN_BAR, Layout
from vfuserver.protocol.pci import Command, Offset
from vfuserver.protocol.virtio_legacy import COMMON_HEADER_SIZE, Register
from vfuserver.protocol.virtio_pci import CommonCfgRegister as Common

LEGACY_BAR = 0
CONFIG_REGION = 7
"""VFU_PCI_DEV_CFG_REGION_IDX: config space as a vfio-user region."""

STATUS_ACKNOWLEDGE = 1
"""virtio 1.2 §2.1: the first status bit a driver sets."""


@dataclass(frozen=True)
class Access:
    """One region access; a write when value is not None."""

    region: int
    offset: int
    width: int
    value: int | None = None

    @property
    def is_write(self) -> bool:
        return self.value is not None

    @property
    def data(self) -> bytes:
        return (self.value or 0).to_bytes(self.width, "little")

    @property
    def spec(self) -> str:
        """The C client's notation."""
        if self.value is None:
            return f"r:{self.region}:{self.offset}:{self.width}"
        return f"w:{self.region}:{self.offset}:{self.width}:{self.value}"


def read(region: int, offset: int, width: int) -> Access:
    return Access(int(region), int(offset), width)


def write(region: int, offset: int, width: int, value: int) -> Access:
    return Access(int(region), int(offset), width, int(value))


ENABLE_DECODE = write(CONFIG_REGION, Offset.COMMAND, 2,
                      Command.IO | Command.MEMORY | Command.MASTER)
"""A function comes out of reset (and every client connection resets it) with IO and memory
decode off; like the kernel's vfio-pci, a BAR access then fails with EIO."""


@dataclass(frozen=True)
class AccessKind:
    """A named cycle of accesses on a device of one profile."""

    key: str
    label: str
    profile: str
    """The vfuserver profile whose device has these registers."""
    group: str
    """register: a register read or write; notify: a queue notify; mix: several kinds."""
    accesses: tuple[Access, ...]
    setup: tuple[Access, ...] = ()
    """Issued once before timing, after ENABLE_DECODE."""

    @property
    def all_setup(self) -> tuple[Access, ...]:
        return (ENABLE_DECODE, *self.setup)


_L = LEGACY_BAR
_M = MODERN_BAR
_LEGACY_MAC = COMMON_HEADER_SIZE  # device config follows the 20-byte header while MSI-X is off
_SET_ACK = write(_L, Register.STATUS, 1, STATUS_ACKNOWLEDGE)

LEGACY_KINDS = (
    AccessKind("legacy-isr-read", "legacy ISR read (BAR0 19/1)", "transitional", "register",
               (read(_L, Register.ISR, 1),)),
    AccessKind("legacy-status-read", "legacy STATUS read (BAR0 18/1)", "transitional",
               "register", (read(_L, Register.STATUS, 1),)),
    AccessKind("legacy-mac-read-1", "legacy config MAC read (BAR0 20/1)", "transitional",
               "register", (read(_L, _LEGACY_MAC, 1),)),
    AccessKind("legacy-mac-read-4", "legacy config MAC read (BAR0 20/4)", "transitional",
               "register", (read(_L, _LEGACY_MAC, 4),)),
    AccessKind("legacy-queue-sel-write", "legacy QUEUE_SEL write (BAR0 14/2)", "transitional",
               "register", (write(_L, Register.QUEUE_SEL, 2, 0),)),
    AccessKind("legacy-status-write", "legacy STATUS write, same value (BAR0 18/1)",
               "transitional", "register", (_SET_ACK,), setup=(_SET_ACK,)),
    AccessKind("legacy-notify", "legacy QUEUE_NOTIFY write (BAR0 16/2)", "transitional",
               "notify", (write(_L, Register.QUEUE_NOTIFY, 2, 0),)),
    AccessKind("legacy-mix", "legacy mix: ISR, STATUS, MAC/1 reads, QUEUE_SEL write, notify",
               "transitional", "mix",
               (read(_L, Register.ISR, 1), read(_L, Register.STATUS, 1),
                read(_L, _LEGACY_MAC, 1), write(_L, Register.QUEUE_SEL, 2, 0),
                write(_L, Register.QUEUE_NOTIFY, 2, 0))),
)

MODERN_KINDS = (
    AccessKind("modern-status-read", "modern device_status read (BAR4 20/1)", "modern",
               "register", (read(_M, Common.DEVICE_STATUS, 1),)),
    AccessKind("modern-isr-read", "modern ISR read (BAR4 0x1000/1)", "modern", "register",
               (read(_M, Layout.ISR, 1),)),
    AccessKind("modern-mac-read-4", "modern config MAC read (BAR4 0x2000/4)", "modern",
               "register", (read(_M, Layout.DEVICE, 4),)),
    AccessKind("modern-queue-select-write", "modern queue_select write (BAR4 22/2)", "modern",
               "register", (write(_M, Common.QUEUE_SELECT, 2, 0),)),
    AccessKind("modern-notify", "modern notify write (BAR4 0x3000/2)", "modern", "notify",
               (write(_M, Layout.NOTIFY, 2, 0),)),
)

ALL_KINDS = LEGACY_KINDS + MODERN_KINDS
