"""The device the BAR and admin targets drive: the test driver's transitional rig, built
once per fuzzing process and brought back to power-on state before every input.

Building a rig costs milliseconds (construct builds the capabilities), a reset tens of
microseconds; the reset is the one a client's disconnect causes in the server
(ResetKind.LOST_CONNECTION), so state that survives it would survive between two VMs too.
"""

from __future__ import annotations

from tests.devices.driver import GuestRam
from tests.devices.legacy_driver import Rig
from tests.fuzz.harness import ByteReader, Finding
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.errors import GuestError
from vfuserver.devices.legacy_io import LEGACY_OPCODES, run_admin
from vfuserver.devices.pci import Region, ResetKind
from vfuserver.protocol import virtio_admin as admin

RAM_SIZE = 64 << 10
"""Small guest RAM: rings and buffers fit, and zeroing it per input costs nothing."""

WIDTHS = (1, 2, 4, 8, 1, 2, 4)
"""Access widths QEMU forwards (a region access of another count is rarer, not absent)."""


class CheckedInterrupts:
    """The function's interrupt sink: a vector beyond the MSI-X table is a finding."""

    def __init__(self, vectors: int) -> None:
        self.vectors = vectors
        self.triggered = 0

    def trigger(self, vector: int) -> None:
        if not 0 <= vector < max(self.vectors, 1):
            raise Finding(f"interrupt vector {vector} of {self.vectors}")
        self.triggered += 1


class FuzzRig:
    """A transitional virtio-net function over small guest RAM, with its admin owner."""

    def __init__(self, owner: AdminOwner | None = None) -> None:
        self.owner = owner or AdminOwner()
        self.rig = Rig(self.owner, ram=GuestRam(RAM_SIZE))
        self.interrupts = CheckedInterrupts(self.rig.fn.msix_vectors)
        self.rig.fn.attach_interrupts(self.interrupts)

    def restore(self) -> None:
        """Power-on state: the function reset as on a client's disconnect, the owner's
        command lists back to what the transitional function enabled, RAM zeroed."""
        rig = self.rig
        rig.fn.reset(ResetKind.LOST_CONNECTION)
        self.owner.reset()
        bitmap = admin.build_bitmap(LEGACY_OPCODES | admin.LIST_OPCODES)
        status, _, _ = run_admin(self.owner, admin.Opcode.LIST_USE, 0, bitmap, 0)
        if status:
            raise RuntimeError(f"LIST_USE of the legacy commands failed: {status}")
        rig.ram.backing[:] = bytes(len(rig.ram.backing))
        rig.peer.sent.clear()

    def guest_step(self, op: int, reader: ByteReader) -> None:
        """What happens around register accesses, by ``op`` % 4: the driver writes guest
        RAM (rings, buffers), the peer delivers a frame, the transmit bottom half runs, the
        function is reset (by kind). Input: RAM offset u16, length u8, bytes; frame length
        u8, bytes; reset kind u8."""
        rig = self.rig
        op %= 4
        if op == 0:
            ram = rig.ram.backing
            offset = reader.u16() % len(ram)
            chunk = reader.take(reader.u8())
            ram[offset : offset + len(chunk)] = chunk[: len(ram) - offset]
        elif op == 1:
            rig.net.receive(reader.take(reader.u8()))
        elif op == 2:
            rig.net.run_tx()
        else:
            rig.fn.reset(tuple(ResetKind)[reader.u8() % len(ResetKind)])

    def check_owner(self) -> None:
        """The owner answers a member's bug with a status and counts it: a finding here."""
        if self.owner.stats.bugs:
            raise Finding(f"{self.owner.stats.bugs} unexpected exception(s) in admin commands")


class RigOperations:
    """A target that runs the input as a sequence of operations on one :class:`FuzzRig`,
    restored before every input; subclasses decode one operation in :meth:`step`."""

    def __init__(self) -> None:
        self.rig = FuzzRig()

    def __call__(self, data: bytes) -> None:
        self.rig.restore()
        reader = ByteReader(data)
        while reader.remaining:
            self.step(reader)
        self.rig.check_owner()

    def step(self, reader: ByteReader) -> None:
        raise NotImplementedError


def region_access(reader: ByteReader, region: Region, size: int) -> None:
    """One access as libvfio-user lets it through (is_valid_region_access): an offset
    inside the region, 1..size-offset bytes. A read must answer exactly that many bytes;
    the only error allowed is GuestError.

    Input: offset u16, width selector u8 (>= 0xF0: any count, u16 follows), direction u8
    (odd: write), value u64 for a write (little-endian, zero-extended to the width).
    """
    offset = reader.u16() % size
    selector = reader.u8()
    width = WIDTHS[selector % len(WIDTHS)] if selector < 0xF0 else 1 + reader.u16()
    width = min(width, size - offset)
    try:
        if reader.u8() & 1:
            region.write(offset, reader.u64().to_bytes(8, "little")[:width].ljust(width, b"\0"))
        else:
            data = region.read(offset, width)
            if len(data) != width:
                raise Finding(f"read of {width} bytes at {offset:#x} returned {len(data)}")
    except GuestError:
        pass


def encode_access(op: int, offset: int, width: int, value: int | None = None) -> bytes:
    """The input bytes of operation ``op`` doing one :func:`region_access` (a read when
    ``value`` is None)."""
    selector = {1: 0, 2: 1, 4: 2, 8: 3}.get(width)
    head = bytes([op]) + offset.to_bytes(2, "little")
    if selector is None:  # any count: the escape selector, then the count - 1
        head += b"\xf0" + (width - 1).to_bytes(2, "little")
    else:
        head += bytes([selector])
    if value is None:
        return head + b"\0"
    return head + b"\1" + value.to_bytes(8, "little")
