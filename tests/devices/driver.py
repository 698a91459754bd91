"""A test-side virtio driver: the other end of the fake link (STYLE 9).

It lays out rings and buffers in a bytearray-backed :class:`GuestMemory` the way Linux
drivers/virtio/virtio_ring.c and drivers/net/virtio_net.c do, programs the device's queues
the way a transport would, and reads back what the device wrote. Nothing here mocks the
device: tests drive the real VirtioDevice/VirtQueue through it.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from vfuserver.devices.errors import HostError
from vfuserver.devices.memory import GuestMemory
from vfuserver.devices.virtio import VirtioDevice
from vfuserver.devices.virtqueue import VirtQueue
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio import DeviceStatus

RAM_BASE = 0x4000_0000
RAM_SIZE = 8 << 20

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


class GuestRam:
    """Guest RAM with a bump allocator for rings and buffers: one DMA map, or the same RAM
    as adjacent maps split at the guest addresses ``splits`` (as a vIOMMU or a RAM block
    split around a hole presents it)."""

    def __init__(self, size: int = RAM_SIZE, base: int = RAM_BASE,
                 splits: Sequence[int] = (), *, shared: mmap.mmap | None = None) -> None:
        self.backing: bytearray | mmap.mmap = bytearray(size) if shared is None else shared
        self.memory = GuestMemory()
        """The maps as a device sees them; empty for ``shared`` RAM (a memfd's mmap),
        which a server's device gets through the client's DMA maps instead."""
        if shared is None:
            whole = memoryview(self.backing)
            bounds = [base, *sorted(splits), base + size]
            for start, end in itertools.pairwise(bounds):
                self.memory.add(start, whole[start - base : end - base], writable=True)
        self.base = base
        self.size = size
        self._next = base

    def skip_to(self, addr: int) -> None:
        """Allocate from ``addr`` on (to place the next ring or buffer across a split)."""
        self._next = addr

    @property
    def end(self) -> int:
        return self.base + self.size

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + max(size, 1) > self.end:
            raise MemoryError("test guest RAM exhausted")
        self._next = addr + max(size, 1)
        return addr

    def read(self, addr: int, length: int) -> bytes:
        offset = addr - self.base
        return bytes(self.backing[offset : offset + length])

    def write(self, addr: int, data: bytes) -> None:
        offset = addr - self.base
        self.backing[offset : offset + len(data)] = data

    def u16(self, addr: int) -> int:
        value: int = U16.unpack_from(self.backing, addr - self.base)[0]
        return value

    def put_u16(self, addr: int, value: int) -> None:
        U16.pack_into(self.backing, addr - self.base, value & 0xFFFF)


@dataclass
class Buf:
    addr: int
    length: int
    writable: bool


@dataclass
class Used:
    """One used ring entry as the driver sees it."""

    head: int
    length: int
    data: bytes
    """The first ``length`` bytes of the chain's writable buffers."""


@dataclass
class _Outstanding:
    bufs: list[Buf]
    descs: list[int] = field(default_factory=list)


class DriverQueue:
    """The driver side of one split ring (Linux vring_virtqueue, split flavour)."""

    def __init__(
        self,
        ram: GuestRam,
        queue: VirtQueue,
        *,
        size: int | None = None,
        contiguous: bool = False,
        event_idx: bool = False,
    ) -> None:
        self.ram = ram
        self.queue = queue
        self.size = size = size or queue.max_size
        self.event_idx = event_idx
        queue.set_size(size)
        if contiguous:
            base = ram.alloc(ring.contiguous_size(size), align=ring.VRING_ALIGN)
            queue.place_contiguous(base)
            self.desc, self.avail, self.used = ring.contiguous_layout(base, size)
        else:
            self.desc = ram.alloc(ring.descriptor_table_size(size), 16)
            self.avail = ram.alloc(ring.avail_ring_size(size), 2)
            self.used = ram.alloc(ring.used_ring_size(size), 4)
            queue.desc_addr, queue.avail_addr, queue.used_addr = self.desc, self.avail, self.used
            queue.enable()
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.outstanding: dict[int, _Outstanding] = {}

    # -- descriptors and buffers ---------------------------------------------------------

    def write_desc(
        self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0,
        *, table: int | None = None,
    ) -> None:
        base = self.desc if table is None else table
        self.ram.write(base + ring.DESC_SIZE * index, DESC.pack(addr, length, flags, next_))

    def buffers(self, out: list[bytes], in_sizes: list[int]) -> list[Buf]:
        bufs = []
        for data in out:
            addr = self.ram.alloc(len(data))
            self.ram.write(addr, data)
            bufs.append(Buf(addr, len(data), False))
        for size in in_sizes:
            bufs.append(Buf(self.ram.alloc(size), size, True))
        return bufs

    def add(
        self,
        out: list[bytes] | None = None,
        in_sizes: list[int] | None = None,
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Add a chain of device-readable ``out`` buffers then device-writable buffers of
        ``in_sizes`` bytes, directly or through an indirect table; returns the head."""
        bufs = self.buffers(out or [], in_sizes or [])
        return self.add_bufs(bufs, indirect=indirect, publish=publish)

    def add_bufs(self, bufs: list[Buf], *, indirect: bool = False, publish: bool = True) -> int:
        if indirect:
            table = self.ram.alloc(ring.DESC_SIZE * len(bufs), 16)
            for i, buf in enumerate(bufs):
                flags = (ring.DescFlag.WRITE if buf.writable else 0) | (
                    ring.DescFlag.NEXT if i + 1 < len(bufs) else 0
                )
                self.write_desc(i, buf.addr, buf.length, flags, i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, ring.DESC_SIZE * len(bufs), ring.DescFlag.INDIRECT)
            self.outstanding[head] = _Outstanding(bufs, [head])
        else:
            descs = [self.free.pop(0) for _ in bufs]
            for i, (index, buf) in enumerate(zip(descs, bufs, strict=True)):
                last = i + 1 == len(bufs)
                flags = (ring.DescFlag.WRITE if buf.writable else 0) | (
                    0 if last else ring.DescFlag.NEXT
                )
                self.write_desc(index, buf.addr, buf.length, flags, 0 if last else descs[i + 1])
            head = descs[0]
            self.outstanding[head] = _Outstanding(bufs, descs)
        if publish:
            self.publish(head)
        return head

    def publish(self, *heads: int) -> bool:
        """Put ``heads`` on the avail ring, then update avail.idx; returns whether Linux
        would kick (virtqueue_kick_prepare)."""
        old = self.avail_idx
        for head in heads:
            slot = self.avail_idx % self.size
            self.ram.put_u16(self.avail + ring.AVAIL_RING_OFFSET + 2 * slot, head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)
        return self.kick_needed(old)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.ram.put_u16(self.avail + ring.AVAIL_IDX_OFFSET, self.avail_idx)

    def kick_needed(self, old: int) -> bool:
        new = self.avail_idx
        if self.event_idx:
            return ring.vring_need_event(self.avail_event, new, old)
        return not self.used_flags & ring.UsedFlag.NO_NOTIFY

    # -- what the device wrote --------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self.ram.u16(self.used + ring.USED_IDX_OFFSET)

    @property
    def used_flags(self) -> int:
        return self.ram.u16(self.used + ring.USED_FLAGS_OFFSET)

    @property
    def avail_event(self) -> int:
        return self.ram.u16(self.used + ring.avail_event_offset(self.size))

    def set_used_event(self, value: int) -> None:
        self.ram.put_u16(self.avail + ring.used_event_offset(self.size), value)

    def set_no_interrupt(self, on: bool) -> None:
        flags = ring.AvailFlag.NO_INTERRUPT if on else 0
        self.ram.put_u16(self.avail + ring.AVAIL_FLAGS_OFFSET, flags)

    def get_used(self) -> list[Used]:
        """Harvest new used entries (Linux virtqueue_get_buf), free their descriptors and,
        with EVENT_IDX, re-arm the interrupt for the next entry (virtqueue_enable_cb)."""
        entries = []
        end = self.used_idx
        while self.last_used != end:
            slot = self.last_used % self.size
            head, length = USED_ELEM.unpack_from(
                self.ram.backing,
                self.used - self.ram.base + ring.USED_RING_OFFSET + ring.USED_ELEM_SIZE * slot,
            )
            info = self.outstanding.pop(head)
            data = b"".join(self.ram.read(b.addr, b.length) for b in info.bufs if b.writable)
            entries.append(Used(head, length, data[:length]))
            self.free.extend(info.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)
        return entries


class RecordingInterrupts:
    """VirtioInterrupts that remembers what was raised."""

    def __init__(self) -> None:
        self.queue: list[int] = []
        self.config = 0

    def queue_interrupt(self, queue: VirtQueue) -> None:
        self.queue.append(queue.index)

    def config_interrupt(self) -> None:
        self.config += 1

    def interrupt_route(self, queue: VirtQueue) -> tuple[int | None, bool]:
        """VirtioPciTransport.interrupt_route: MSI-X, one vector per queue (its index)."""
        return queue.index, True

    def clear(self) -> None:
        self.queue.clear()
        self.config = 0


class RecordingPeer:
    """NetPeer that keeps every frame sent; ``fail`` makes send raise HostError."""

    def __init__(self, vnet_hdr: bool = False) -> None:
        self.vnet_hdr = vnet_hdr
        self.sent: list[bytes] = []
        self.fail = False

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        if self.fail:
            raise HostError("peer is gone")
        self.sent.append(bytes(frame))


STATUS_ACK_DRIVER = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER


def negotiate_modern(device: VirtioDevice, want: int | None = None) -> int:
    """Linux virtio_dev_probe up to FEATURES_OK; returns the accepted features."""
    device.set_status(0)
    device.set_status(DeviceStatus.ACKNOWLEDGE)
    device.set_status(STATUS_ACK_DRIVER)
    offered = device.get_device_features(0) | device.get_device_features(1) << 32
    accepted = offered if want is None else offered & want
    device.set_driver_features(0, accepted & 0xFFFF_FFFF)
    device.set_driver_features(1, accepted >> 32)
    device.set_status(STATUS_ACK_DRIVER | DeviceStatus.FEATURES_OK)
    if not device.status & DeviceStatus.FEATURES_OK:
        raise RuntimeError(f"device refused features {accepted:#x}")
    return accepted


def negotiate_legacy(device: VirtioDevice, want: int | None = None) -> int:
    """Linux virtio_pci_legacy probe up to the feature write (no FEATURES_OK)."""
    device.legacy = True
    device.set_status(0)
    device.set_status(DeviceStatus.ACKNOWLEDGE)
    device.set_status(STATUS_ACK_DRIVER)
    offered = device.get_device_features(0)
    accepted = offered if want is None else offered & want
    device.set_driver_features(0, accepted)
    return accepted


def driver_ok(device: VirtioDevice) -> None:
    device.set_status(device.status | DeviceStatus.DRIVER_OK)
