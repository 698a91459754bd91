"""A PCI function as the server exposes it: emulated config space, BAR regions, IRQ counts.

The config space is emulated entirely here (libvfio-user hands us every config access):
bytes built from :mod:`vfuserver.protocol.pci` definitions, a write mask and a
write-1-to-clear mask per byte (QEMU's ``wmask``/``w1cmask`` idea), BAR registers that
answer sizing writes, and capabilities whose registers can intercept writes. A
presentation that rewrites part of the header (the transitional profile) wraps a
:class:`ConfigSpace` instead of patching it (see :func:`overlay_ranges`).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from vfuserver.devices.errors import GuestError
from vfuserver.protocol import pci as pcifmt


class Region(Protocol):
    """Something a BAR (or the config space) forwards accesses to."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass
class Bar:
    """One implemented BAR: its index, size (a power of two) and the region behind it."""

    index: int
    size: int
    kind: BarKind
    region: Region
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size & (self.size - 1) or self.size < (4 if self.kind is BarKind.IO else 16):
            raise ValueError(f"BAR{self.index} size {self.size:#x} is not a valid power of two")

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register (PCI 3.0 §6.2.5.1)."""
        if self.kind is BarKind.IO:
            return pcifmt.BAR_SPACE_IO
        bits = pcifmt.BAR_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return bits | (pcifmt.BAR_MEM_PREFETCH if self.prefetchable else 0)


class ResetKind(enum.Enum):
    """Why a function is reset (libvfio-user's vfu_reset_type_t, plus our own)."""

    DEVICE = "device"  # VFIO_USER_DEVICE_RESET from the client
    LOST_CONNECTION = "lost-connection"  # the client went away
    FLR = "flr"  # function-level reset through config space


class Interrupts(Protocol):
    """How a function raises interrupts; the server implements it over libvfio-user."""

    def trigger(self, vector: int) -> None:
        """Signal MSI-X ``vector`` (or, with index 0 while MSI-X is off, INTx)."""
        ...


class NoInterrupts:
    """Interrupt sink used while no client is attached."""

    def trigger(self, vector: int) -> None:
        pass


WriteHook = Callable[[int, bytes, bytes], None]
"""Called after a config write landed: (offset of the register, old bytes, new bytes)."""


@dataclass
class _Hook:
    start: int
    end: int
    fn: WriteHook


@dataclass
class ConfigSpace:
    """Emulated PCI configuration space of one function."""

    size: int = pcifmt.CONFIG_SPACE_SIZE
    data: bytearray = field(init=False)
    wmask: bytearray = field(init=False)
    w1cmask: bytearray = field(init=False)
    bars: dict[int, Bar] = field(default_factory=dict)
    _hooks: list[_Hook] = field(default_factory=list)
    _last_cap: int = 0
    _next_free: int = pcifmt.CAPABILITY_LIST_START

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1cmask = bytearray(self.size)

    # -- construction ---------------------------------------------------------------------

    def set_header(self, **fields: int) -> None:
        """Build the type-0 header from protocol.pci.Type0Header field values."""
        values = {
            "vendor_id": 0, "device_id": 0, "command": 0, "status": 0, "revision_id": 0,
            "prog_if": 0, "subclass": 0, "base_class": 0, "cache_line_size": 0,
            "latency_timer": 0, "header_type": 0, "bist": 0, "bars": [0] * pcifmt.BAR_COUNT,
            "cardbus_cis": 0, "subsystem_vendor_id": 0, "subsystem_id": 0, "rom_address": 0,
            "capabilities_pointer": 0, "reserved": bytes(7), "interrupt_line": 0,
            "interrupt_pin": 0, "min_gnt": 0, "max_lat": 0,
        }
        values.update(fields)
        self.data[: pcifmt.HEADER_SIZE] = pcifmt.Type0Header.build(values)
        # Writable header registers (PCI 3.0 §6.2): command bits a function of this kind
        # implements, cache line size, latency timer, interrupt line; status errors are RW1C.
        command = (pcifmt.Command.IO | pcifmt.Command.MEMORY | pcifmt.Command.MASTER
                   | pcifmt.Command.PARITY | pcifmt.Command.SERR | pcifmt.Command.INTX_DISABLE)
        self._set_mask(self.wmask, pcifmt.Offset.COMMAND, command.to_bytes(2, "little"))
        self._set_mask(self.w1cmask, pcifmt.Offset.STATUS,
                       int(pcifmt.STATUS_W1C).to_bytes(2, "little"))
        for reg in (pcifmt.Offset.CACHE_LINE_SIZE, pcifmt.Offset.LATENCY_TIMER,
                    pcifmt.Offset.INTERRUPT_LINE):
            self.wmask[reg] = 0xFF

    def add_bar(self, bar: Bar) -> None:
        if bar.index in self.bars or not 0 <= bar.index < pcifmt.BAR_COUNT:
            raise ValueError(f"BAR{bar.index} is already defined or out of range")
        if bar.kind is BarKind.MEM64 and (bar.index == pcifmt.BAR_COUNT - 1
                                          or bar.index + 1 in self.bars):
            raise ValueError(f"64-bit BAR{bar.index} needs BAR{bar.index + 1} free")
        self.bars[bar.index] = bar
        reg = pcifmt.Offset.BASE_ADDRESS_0 + 4 * bar.index
        self.data[reg : reg + 4] = bar.type_bits.to_bytes(4, "little")
        low_mask = (pcifmt.BAR_IO_MASK if bar.kind is BarKind.IO else pcifmt.BAR_MEM_MASK)
        self.wmask[reg : reg + 4] = (low_mask & ~(bar.size - 1) & 0xFFFFFFFF).to_bytes(4, "little")
        if bar.kind is BarKind.MEM64:
            self.wmask[reg + 4 : reg + 8] = (~((bar.size - 1) >> 32) & 0xFFFFFFFF).to_bytes(
                4, "little")

    def add_capability(self, cap_id: int, body: bytes, *, wmask: bytes = b"",
                       hook: WriteHook | None = None, align: int = 4) -> int:
        """Append a capability (``body`` excludes the 2-byte id/next header); its offset.

        ``wmask`` covers the body from its first byte; ``hook`` is called after any write
        that touches the capability.
        """
        offset = (self._next_free + align - 1) & ~(align - 1)
        end = offset + 2 + len(body)
        if end > self.size:
            raise ValueError("capability list does not fit the config space")
        self.data[offset : offset + 2] = pcifmt.CapabilityHeader.build(
            {"cap_id": cap_id, "next": 0})
        self.data[offset + 2 : end] = body
        self.wmask[offset + 2 : offset + 2 + len(wmask)] = wmask
        if self._last_cap:
            self.data[self._last_cap + 1] = offset
        else:
            self.data[pcifmt.Offset.CAPABILITY_LIST] = offset
            status = int.from_bytes(self.data[pcifmt.Offset.STATUS : pcifmt.Offset.STATUS + 2],
                                    "little") | pcifmt.Status.CAP_LIST
            self.data[pcifmt.Offset.STATUS : pcifmt.Offset.STATUS + 2] = status.to_bytes(
                2, "little")
        if hook is not None:
            self._hooks.append(_Hook(offset, end, hook))
        self._last_cap = offset
        self._next_free = end
        return offset

    def capabilities(self) -> Iterator[tuple[int, int]]:
        """(offset, cap_id) of each capability, walking the list like a guest does."""
        offset = self.data[pcifmt.Offset.CAPABILITY_LIST]
        seen: set[int] = set()
        while offset and offset not in seen:
            seen.add(offset)
            yield offset, self.data[offset]
            offset = self.data[offset + 1]

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, value: bytes) -> None:
        mask[offset : offset + len(value)] = value

    # -- guest access ---------------------------------------------------------------------

    def _check(self, offset: int, size: int) -> None:
        # Any size: QEMU reads the whole config space in one access when it sets up.
        if size <= 0 or offset < 0 or offset + size > self.size:
            raise GuestError(f"config access [{offset:#x}, +{size}) beyond {self.size:#x}",
                             errno=errno.EINVAL)

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        old = bytes(self.data[offset : offset + len(data)])
        for i, value in enumerate(data):
            pos = offset + i
            cur = self.data[pos]
            cur = (cur & ~self.wmask[pos]) | (value & self.wmask[pos])
            cur &= ~(value & self.w1cmask[pos])
            self.data[pos] = cur & 0xFF
        end = offset + len(data)
        for hook in self._hooks:
            if offset < hook.end and hook.start < end:
                hook.fn(offset, old, bytes(self.data[offset:end]))

    # -- typed views ------------------------------------------------------------------------

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 4], "little")

    @property
    def command(self) -> int:
        return self.u16(pcifmt.Offset.COMMAND)


def intersect(offset: int, size: int, start: int, length: int) -> tuple[int, int, int] | None:
    """Where an access [offset, offset+size) overlaps a field [start, start+length).

    (position in the access, position in the field, bytes in common), or None: the
    kernel's ``vfio_pci_core_range_intersect_range``, the one helper through which every
    partial or unaligned access to a rewritten or shadowed field goes.
    """
    lo, hi = max(offset, start), min(offset + size, start + length)
    if lo >= hi:
        return None
    return lo - offset, lo - start, hi - lo


def overlay_ranges(offset: int, size: int,
                   fields: Mapping[int, bytes]) -> Iterator[tuple[int, bytes]]:
    """(position in the access, bytes to present there) for each field an access overlaps.

    ``fields`` maps a field's start offset to the bytes presented there, so byte-wise and
    unaligned reads (``setpci 2.b``) see the rewritten value.
    """
    for field_start, value in fields.items():
        overlap = intersect(offset, size, field_start, len(value))
        if overlap is not None:
            at, pos, length = overlap
            yield at, value[pos : pos + length]


class FastKind(enum.Enum):
    """What a fast register does (vfuserver/csrc/serve.h answers it without the model)."""

    NOTIFY = "notify"
    """A write whose 16-bit value names the queue kicked; the model runs it later
    (:meth:`FastPath.kick`), as QEMU runs an ioeventfd's kick."""
    ISR_READ = "isr-read"
    """A 1-byte read-to-clear of the ISR (:class:`IsrCell`)."""
    STATUS_READ = "status-read"
    """A 1-byte read of the device status (:attr:`FastState.status`)."""
    LEGACY_READ = "legacy-read"
    """Any read starting in the register's range of the legacy BAR0 that has no side
    effect, answered from :class:`LegacyImage` (common registers, device config)."""
    LEGACY_WRITE = "legacy-write"
    """A write starting in the range: QUEUE_SEL (the shared cell, see
    :meth:`FastPath.use_legacy_queue_select`) and a STATUS write that changes nothing."""
    CONFIG_READ = "config-read"
    """A read of the device config, whose first byte is at the register's offset, from
    :attr:`FastImage.config`."""


RANGE_KINDS = frozenset({FastKind.LEGACY_READ, FastKind.LEGACY_WRITE, FastKind.CONFIG_READ})
"""Kinds whose register is a range: it matches every access starting inside
[offset, offset + width), which the fast path answers or leaves to the model."""


@dataclass(frozen=True)
class FastRegister:
    """An access the fast path may answer: exactly this BAR, offset, width and direction.

    ``legacy``: the access is to the legacy IO BAR, so it is only served while IO decode
    is on (:attr:`FastState.io_enabled`), and a read only while it cannot change the
    device's mode (:attr:`FastState.settled`); otherwise the model answers it.
    """

    name: str
    bar: int
    offset: int
    width: int
    is_write: bool
    kind: FastKind
    legacy: bool = False


class FastState(NamedTuple):
    """What the fast path reads, published by the model whenever its lock is released
    (a tuple: it is built and compared on every release)."""

    status: int
    io_enabled: bool
    settled: bool
    active_queues: int = 0
    """Bit n: a kick of queue n has work to do; kicks of the others are dropped."""
    image_key: object = None
    """Changes whenever :meth:`FastPath.fast_image` may have changed (generation
    counters, compared on every release: the image itself is built only then)."""


class LegacyImage(NamedTuple):
    """The legacy common registers whose reads have no side effect, as the model reads
    them (devices/legacy.py LegacyInterface); ``queues`` per queue index, the first ones."""

    config_offset: int
    """Where the device config starts in BAR0: 20, or 24 while MSI-X is on."""
    host_features: int
    guest_features: int
    config_vector: int
    queue_count: int
    """Queues the device has; a selector at or beyond reads no address and size 0."""
    queues: tuple[tuple[int, int, int], ...]
    """(QUEUE_PFN, QUEUE_NUM, MSI queue vector) of queues 0, 1, ..."""
    absent_vectors: bool
    """Queue indexes without a queue hold vectors (their vector reads go to the model)."""
    bus_master: bool
    """PCI_COMMAND bus mastering is on (a STATUS write of ACK|DRIVER turns it on)."""


class FastImage(NamedTuple):
    """What the fast path answers register reads from (published when
    :attr:`FastState.image_key` changes)."""

    config: bytes
    """The device config, as the device's read_config returns it."""
    legacy: LegacyImage | None = None
    """The legacy BAR0 registers (a transitional function), or None."""


class IsrCell(Protocol):
    """The ISR (virtio 1.2 §4.1.4.5), in one place both the model and a fast path can
    reach: bits are set when an interrupt is raised and all cleared by a read."""

    def set(self, bits: int) -> None: ...

    def take(self) -> int: ...

    def peek(self) -> int: ...

    def store(self, value: int) -> None: ...


class RegisterCell(Protocol):
    """A register both the model and a fast path can change, kept where both reach it."""

    def load(self) -> int: ...

    def store(self, value: int) -> None: ...


class LocalCell:
    """A :class:`RegisterCell` in a Python value; the server substitutes one in native
    memory (vfuserver.native.NativeQueueSelect)."""

    def __init__(self, value: int = 0) -> None:
        self._value = value

    def load(self) -> int:
        return self._value

    def store(self, value: int) -> None:
        self._value = value


class LocalIsr:
    """An :class:`IsrCell` in a Python value; the server substitutes one in native memory
    that its fast path reads atomically (vfuserver.native.NativeIsr)."""

    def __init__(self) -> None:
        self._value = 0

    def set(self, bits: int) -> None:
        self._value |= bits

    def take(self) -> int:
        value, self._value = self._value, 0
        return value

    def peek(self) -> int:
        return self._value

    def store(self, value: int) -> None:
        self._value = value


@runtime_checkable
class FastPath(Protocol):
    """What a function offers the native fast path (optional on a :class:`PciFunction`)."""

    def fast_registers(self) -> list[FastRegister]: ...

    def fast_state(self) -> FastState: ...

    def fast_image(self) -> FastImage: ...

    def use_isr(self, cell: IsrCell) -> None:
        """Keep the ISR in ``cell`` from now on (its current bits move there)."""
        ...

    def use_legacy_queue_select(self, cell: RegisterCell) -> None:
        """Keep the legacy QUEUE_SEL in ``cell`` from now on (its value moves there); a
        function without a legacy interface has none."""
        ...

    def kick(self, queue_index: int) -> None:
        """The driver kicked queue ``queue_index`` on the fast path."""
        ...


class PciFunction(Protocol):
    """What the server needs of a device to expose it over vfio-user."""

    name: str
    config: ConfigSpace
    msix_vectors: int
    intx: bool

    def config_region(self) -> Region:
        """The region serving config-space accesses (the presentation's view)."""
        ...

    def bars(self) -> list[Bar]:
        """The implemented BARs and the regions behind them."""
        ...

    def attach_interrupts(self, interrupts: Interrupts) -> None: ...

    def reset(self, kind: ResetKind) -> None: ...

    def counters(self) -> dict[str, dict[str, int]]:
        """The presentation's own counters, by group (none for a plain function)."""
        ...

    def close(self) -> None:
        """Release what the presentation holds beyond its context (idempotent)."""
        ...
