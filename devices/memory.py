"""Guest memory as the device sees it: the DMA maps the vfio-user client registered.

Every guest-physical address a device model touches goes through :class:`GuestMemory`,
which checks the whole range against the maps and the map's protection. Nothing else in
the project dereferences a guest address.

A range may span adjacent maps: the same guest RAM can arrive as several maps (a vIOMMU,
a RAM block split around a hole), and a driver's buffer or ring may cross the boundary.
:meth:`GuestMemory.view` is the fast path for the common case of a range inside one map;
:meth:`GuestMemory.pieces` gives the views of a range across maps, as QEMU's
address_space_map loop splits such a buffer into several iovecs (virtqueue_map_desc).

The server adds a map from libvfio-user's DMA register callback (a buffer over the
library's mmap of the client's memory fd) and removes it in the unregister callback;
tests add maps backed by a ``bytearray``. Views handed out by :meth:`GuestMemory.view` are
valid only until control returns to the server loop: a map may be removed after that.

Guest memory is shared with a driver running at the same time on another CPU, so two rules
hold for every access the device makes to the fields of a ring:

* **One store per field, of its final value.** Never ``struct.pack_into`` into guest
  memory: CPython's ``s_pack_internal`` (Modules/_struct.c) memsets the destination to zero
  before it stores the value, so a driver that reads in between sees 0 (a used ``idx`` of 0
  made Linux read a used element from the previous lap: "input.0:id N is not a head!").
  :func:`store_u16` and :func:`store_u64` store through a memoryview item assignment, one
  ``memcpy`` of the item (PACK_SINGLE in Objects/memoryobject.c). Loads are single too
  (``unpack_from`` copies the item once).
* **Barriers as QEMU places them** (hw/virtio/virtio.c), from :attr:`GuestMemory.barriers`.
"""

from __future__ import annotations

import bisect
import mmap
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vfuserver.devices.errors import GuestMemoryError

Buffer = bytes | bytearray | memoryview
"""Byte buffers accepted for guest memory copies (collections.abc.Buffer is 3.12+)."""


@dataclass(eq=False)
class DmaMap:
    """One contiguous guest-physical range backed by host memory."""

    iova: int
    size: int
    writable: bool
    buffer: memoryview = field(repr=False)
    """Byte view of the backing memory, ``size`` bytes, format 'B'."""

    @property
    def end(self) -> int:
        return self.iova + self.size


_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def store_u16(view: memoryview, index: int, value: int) -> None:
    """Store little-endian ``value`` into element ``index`` of ``view`` (format 'H'), as one
    16-bit store (see the module docstring: never ``struct.pack_into`` on guest memory)."""
    view[index] = value if _LITTLE_ENDIAN_HOST else int.from_bytes(value.to_bytes(2, "little"))


def store_u32(view: memoryview, index: int, value: int) -> None:
    """Store little-endian ``value`` into element ``index`` of ``view`` (format 'I'), as one
    32-bit store."""
    view[index] = value if _LITTLE_ENDIAN_HOST else int.from_bytes(value.to_bytes(4, "little"))


def store_u64(view: memoryview, index: int, value: int) -> None:
    """Store little-endian ``value`` into element ``index`` of ``view`` (format 'Q'), as one
    64-bit store."""
    view[index] = value if _LITTLE_ENDIAN_HOST else int.from_bytes(value.to_bytes(8, "little"))


_FENCE_LOCK = threading.Lock()


def _locked_fence() -> None:
    # Acquiring a lock is an atomic read-modify-write, a full barrier on x86 (a LOCK-prefixed
    # instruction); the server replaces this with __atomic_thread_fence (the cffi extension).
    with _FENCE_LOCK:
        pass


@dataclass(frozen=True)
class Barriers:
    """Memory barriers between the device's and the driver's accesses to shared memory:
    QEMU's smp_mb/smp_wmb/smp_rmb, Linux's virt_mb/virt_wmb/virt_rmb."""

    mb: Callable[[], None]
    """Full barrier: earlier loads and stores before later loads and stores (the only one
    that orders a store before a later load)."""
    wmb: Callable[[], None]
    """Earlier stores before later stores."""
    rmb: Callable[[], None]
    """Earlier loads before later loads."""


LOCK_BARRIERS = Barriers(_locked_fence, _locked_fence, _locked_fence)
"""Barriers without the C extension (device models under test); the server installs
``__atomic_thread_fence`` ones (vfuserver.context)."""


IOVA_LIMIT = 1 << 64
"""Guest addresses are 64-bit (a descriptor's ``addr`` is le64): no map may reach past."""


class LostPages(Protocol):
    """Pages of guest memory the host lost under the device (the client shrank the file
    behind a map). The server's SIGBUS guard counts them (vfuserver/csrc/vfuserver.c)."""

    count: int
    """Faults absorbed so far in this memory's maps; only ever grows."""
    iova: int
    """Guest address of the latest one."""


@dataclass
class NoLostPages:
    """:class:`LostPages` for memory no guard watches (tests' ``bytearray`` maps)."""

    count: int = 0
    iova: int = 0


class GuestMemory:
    """The set of DMA maps of one device, with bounds-checked access."""

    def __init__(self, barriers: Barriers = LOCK_BARRIERS) -> None:
        self._starts: list[int] = []
        self._maps: list[DmaMap] = []
        self.generation = 0
        """Changes whenever a map is added or removed: a copy of the maps made elsewhere
        (the server's C data path, vfuserver/netpath.py) is current while it matches."""
        self.barriers = barriers
        """The barriers the rings use; the server sets real CPU fences."""
        self.lost: LostPages = NoLostPages()
        """Where the server's SIGBUS guard counts pages lost under these maps: a client
        that shrinks the file behind a map makes the host's next access there fault; the
        guard maps a zero page over it and counts it here, and the queues stop
        (NEEDS_RESET) at the end of their batch instead of the process dying."""

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._maps))

    def add(self, iova: int, backing: Buffer | mmap.mmap, *, writable: bool) -> DmaMap:
        """Register ``backing`` as guest memory at ``iova``.

        ValueError for an empty map, one that reaches past 2**64 or one that overlaps a
        map already present (libvfio-user refuses overlaps itself).
        """
        view = memoryview(backing).cast("B")
        size = view.nbytes
        if size == 0:
            raise ValueError("empty DMA map")
        if iova < 0 or iova + size > IOVA_LIMIT:
            raise ValueError(f"DMA map [{iova:#x}, +{size:#x}) wraps around 2**64")
        i = bisect.bisect_right(self._starts, iova)
        if i > 0 and self._maps[i - 1].end > iova:
            raise ValueError(f"DMA map at {iova:#x} overlaps {self._maps[i - 1]}")
        if i < len(self._maps) and self._maps[i].iova < iova + size:
            raise ValueError(f"DMA map at {iova:#x} overlaps {self._maps[i]}")
        dma_map = DmaMap(iova, size, writable, view)
        self._starts.insert(i, iova)
        self._maps.insert(i, dma_map)
        self.generation += 1
        return dma_map

    def remove(self, iova: int) -> DmaMap:
        """Forget the map starting at ``iova`` and release its view."""
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._starts) or self._starts[i] != iova:
            raise KeyError(f"no DMA map at {iova:#x}")
        del self._starts[i]
        dma_map = self._maps.pop(i)
        dma_map.buffer.release()
        self.generation += 1
        return dma_map

    def clear(self) -> None:
        for dma_map in self._maps:
            dma_map.buffer.release()
        self._starts.clear()
        self._maps.clear()
        self.generation += 1

    def _locate(self, addr: int, length: int, writable: bool) -> tuple[DmaMap, int]:
        """The map holding all of [addr, addr+length) and the offset of addr in it."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            dma_map = self._maps[i]
            offset = addr - dma_map.iova
            if offset + length <= dma_map.size and length >= 0:
                if writable and not dma_map.writable:
                    raise GuestMemoryError(addr, length, "is read-only")
                return dma_map, offset
        raise GuestMemoryError(addr, length)

    def view(self, addr: int, length: int, *, writable: bool = False) -> memoryview:
        """A zero-copy view of [addr, addr+length) inside one map, valid until control
        returns to the server loop.

        GuestMemoryError if the range is not inside one map (even when adjacent maps
        cover it: :meth:`pieces` handles that case) or, with ``writable``, the map is
        read-only.
        """
        if addr < 0 or length < 0:
            raise GuestMemoryError(addr, length, "is negative")
        dma_map, offset = self._locate(addr, length, writable)
        return dma_map.buffer[offset : offset + length]

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes from guest memory; the range may span adjacent maps."""
        try:
            return bytes(self.view(addr, length))
        except GuestMemoryError:
            return b"".join(bytes(v) for v in self.pieces(addr, length))

    def write(self, addr: int, data: Buffer) -> None:
        """Copy ``data`` into guest memory; the range may span adjacent maps."""
        src = memoryview(data).cast("B")
        try:
            self.view(addr, src.nbytes, writable=True)[:] = src
        except GuestMemoryError:
            pos = 0
            for part in self.pieces(addr, src.nbytes, writable=True):
                part[:] = src[pos : pos + part.nbytes]
                pos += part.nbytes

    def pieces(self, addr: int, length: int, *, writable: bool = False) -> list[memoryview]:
        """Views covering [addr, addr+length) in address order, one per map it crosses
        (QEMU virtqueue_map_desc: one iovec per piece); valid as :meth:`view`'s.

        GuestMemoryError if any byte of the range is outside every map (a hole, or past
        2**64) or, with ``writable``, in a read-only map.
        """
        if addr < 0 or length < 0:
            raise GuestMemoryError(addr, length, "is negative")
        parts: list[memoryview] = []
        pos, remaining = addr, length
        while remaining:
            i = bisect.bisect_right(self._starts, pos) - 1
            if i < 0 or self._maps[i].end <= pos:
                reason = "not mapped" if pos == addr else f"not mapped from {pos:#x}"
                raise GuestMemoryError(addr, length, reason)
            dma_map = self._maps[i]
            if writable and not dma_map.writable:
                raise GuestMemoryError(addr, length, "is read-only")
            offset = pos - dma_map.iova
            take = min(remaining, dma_map.size - offset)
            parts.append(dma_map.buffer[offset : offset + take])
            pos += take
            remaining -= take
        return parts
