"""Split virtqueue formats (virtio 1.x §2.7, split-ring.tex; Linux uapi virtio_ring.h).

A split virtqueue of ``N`` entries is three guest-memory areas:

* the descriptor table, ``N`` 16-byte :data:`Descriptor` entries;
* the available ring (driver area): ``flags``, ``idx``, ``ring[N]`` of le16 heads and, with
  VIRTIO_F_EVENT_IDX, ``used_event``;
* the used ring (device area): ``flags``, ``idx``, ``ring[N]`` of :data:`UsedElem` and, with
  VIRTIO_F_EVENT_IDX, ``avail_event``.

Everything is little-endian (legacy guests are guest-native endian, which is little-endian
on every guest this project serves). The construct definitions document and test the
formats; the device's hot path uses the precomputed :class:`struct.Struct` objects below,
which tests check against the construct definitions.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, NamedTuple

from construct import Array, Int16ul, Int32ul, Int64ul, Struct

MAX_QUEUE_SIZE = 32768
"""Queue Size is a power of two and at most 32768 (split-ring.tex §2.7)."""
VRING_ALIGN = 4096
"""Legacy alignment of the used ring (VIRTIO_PCI_VRING_ALIGN)."""

DESC_SIZE = 16
"""sizeof(struct virtq_desc)."""
USED_ELEM_SIZE = 8
"""sizeof(struct virtq_used_elem)."""
RING_HEADER_SIZE = 4
"""``flags`` + ``idx`` in front of the avail and used rings."""

AVAIL_FLAGS_OFFSET = 0
AVAIL_IDX_OFFSET = 2
AVAIL_RING_OFFSET = 4
USED_FLAGS_OFFSET = 0
USED_IDX_OFFSET = 2
USED_RING_OFFSET = 4


class DescFlag(enum.IntFlag):
    """virtq_desc.flags (VIRTQ_DESC_F_*)."""

    NEXT = 1
    """The buffer continues via ``next``."""
    WRITE = 2
    """Device write-only (otherwise device read-only)."""
    INDIRECT = 4
    """``addr``/``len`` refer to a table of descriptors."""


class AvailFlag(enum.IntFlag):
    """virtq_avail.flags (VIRTQ_AVAIL_F_*): used buffer notification suppression."""

    NO_INTERRUPT = 1


class UsedFlag(enum.IntFlag):
    """virtq_used.flags (VIRTQ_USED_F_*): available buffer notification suppression."""

    NO_NOTIFY = 1


Descriptor = Struct(
    "addr" / Int64ul * "guest-physical address of the buffer (or indirect table)",
    "len" / Int32ul * "length of the buffer in bytes",
    "flags" / Int16ul * "DescFlag bits",
    "next" / Int16ul * "index of the next descriptor if flags & NEXT",
)
"""struct virtq_desc (§2.7.5)."""

UsedElem = Struct(
    "id" / Int32ul * "head index of the used descriptor chain (le32 for padding reasons)",
    "len" / Int32ul * "bytes written into the chain's device-writable buffers",
)
"""struct virtq_used_elem (§2.7.8)."""


def descriptor_table(size: int) -> Any:
    """The descriptor table of a queue of ``size`` entries."""
    return Array(size, Descriptor)


def avail_ring(size: int) -> Any:
    """struct virtq_avail for ``size`` entries, including ``used_event`` (§2.7.6)."""
    return Struct(
        "flags" / Int16ul * "AvailFlag bits",
        "idx" / Int16ul * "where the driver puts the next entry (mod size); free-running",
        "ring" / Array(size, Int16ul) * "descriptor chain heads",
        "used_event" / Int16ul * "only meaningful with VIRTIO_F_EVENT_IDX",
    )


def used_ring(size: int) -> Any:
    """struct virtq_used for ``size`` entries, including ``avail_event`` (§2.7.8)."""
    return Struct(
        "flags" / Int16ul * "UsedFlag bits",
        "idx" / Int16ul * "where the device puts the next entry (mod size); free-running",
        "ring" / Array(size, UsedElem),
        "avail_event" / Int16ul * "only meaningful with VIRTIO_F_EVENT_IDX",
    )


# --------------------------------------------------------------------------------------
# Sizes and placement


def is_valid_queue_size(size: int, max_size: int = MAX_QUEUE_SIZE) -> bool:
    """A split queue size is a non-zero power of two no larger than ``max_size``."""
    return 0 < size <= min(max_size, MAX_QUEUE_SIZE) and size & (size - 1) == 0


def descriptor_table_size(size: int) -> int:
    """Bytes of the descriptor table: 16 N (§2.7 "Queue Part Sizes")."""
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring with ``used_event``: 6 + 2 N."""
    return RING_HEADER_SIZE + 2 * size + 2


def used_ring_size(size: int) -> int:
    """Bytes of the used ring with ``avail_event``: 6 + 8 N."""
    return RING_HEADER_SIZE + USED_ELEM_SIZE * size + 2


def used_event_offset(size: int) -> int:
    """Offset of ``used_event`` in the available ring."""
    return AVAIL_RING_OFFSET + 2 * size


def avail_event_offset(size: int) -> int:
    """Offset of ``avail_event`` in the used ring."""
    return USED_RING_OFFSET + USED_ELEM_SIZE * size


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class RingLayout(NamedTuple):
    """Guest-physical addresses of a queue's three areas."""

    desc: int
    avail: int
    used: int


def contiguous_layout(base: int, size: int, align: int = VRING_ALIGN) -> RingLayout:
    """The legacy layout: one contiguous region from ``base`` (split-ring.tex "Legacy
    Interfaces: A Note on Virtqueue Layout", QEMU virtio_queue_update_rings).

    Descriptors at ``base``, the available ring right after them, the used ring at the
    next multiple of ``align``.
    """
    if size <= 0:
        raise ValueError(f"queue size {size} must be positive")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"alignment {align} is not a power of two")
    avail = base + descriptor_table_size(size)
    used = _align_up(avail + avail_ring_size(size), align)
    return RingLayout(base, avail, used)


def contiguous_size(size: int, align: int = VRING_ALIGN) -> int:
    """Bytes of the legacy contiguous region: ALIGN(16N + 6 + 2N) + ALIGN(6 + 8N)."""
    driver_part = _align_up(descriptor_table_size(size) + avail_ring_size(size), align)
    return driver_part + _align_up(used_ring_size(size), align)


# --------------------------------------------------------------------------------------
# Event index arithmetic


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` crosses ``event_idx``.

    Linux virtio_ring.h vring_need_event(): the other side asked to be told once the index
    passes ``event_idx``; all arithmetic is modulo 2**16.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


# --------------------------------------------------------------------------------------
# Hot-path codecs (checked against the construct definitions by the tests)

DESC_STRUCT = struct.Struct("<QIHH")
"""addr, len, flags, next."""
USED_ELEM_STRUCT = struct.Struct("<II")
"""id, len."""
U16_STRUCT = struct.Struct("<H")
"""ring indices, flags, avail ring entries, used_event/avail_event."""
