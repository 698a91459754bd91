"""A record, outside guest memory, of what the device stores in a used ring.

A debugging aid for ring corruption: with a :class:`RingJournal` attached, a
:class:`~vfuserver.devices.virtqueue.VirtQueue` writes the ring addresses into the
journal's header whenever they take effect, and the ``(id, len)`` of every used element
into the entry of its 16-bit used index *before* it stores the element in guest memory.
An outside observer that maps both the journal and the guest's RAM (benchmarks/c/ring_watch.c)
can then tell, for each index the used ring publishes, whether memory shows what the device
stored for it.

File layout (little-endian): a 64-byte header, then 65536 entries of ``{u32 id; u32 len}``.

=======  ====  =============================================================
offset   size  field
=======  ====  =============================================================
0        4     magic ``0x4a525656``
4        4     generation: odd while the header is being rewritten
8        4     queue index
12       4     queue size (0: the queue is not in use)
16       8     descriptor table address (guest-physical)
24       8     available ring address
32       8     used ring address
40       4     1 if VIRTIO_F_EVENT_IDX is in effect
44       4     1 if the driver's ``used_event`` is its last used index (a receive
               queue of Linux's virtio_net, which re-enables callbacks with
               virtqueue_enable_cb_prepare, never the delayed variant)
48       4     the used index the device last published, stored right *after* the
               used ``idx`` in guest memory: memory may be ahead of it by one batch
               at most, never behind
=======  ====  =============================================================
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from vfuserver.devices.memory import store_u64

MAGIC = 0x4A525656
HEADER_SIZE = 64
ENTRIES = 65536
FILE_SIZE = HEADER_SIZE + 8 * ENTRIES
_BODY = struct.Struct("<IIQQQII")
"""The header from offset 8 (queue .. receive): rewritten only while generation is odd."""
PUBLISHED_WORD = 48 // 4
"""The 32-bit word of the published used index."""


class RingJournal:
    """One queue's journal file, mapped shared (so another process sees every store)."""

    def __init__(self, path: Path, queue: int, *, receive: bool = False) -> None:
        self.path = path
        self.queue = queue
        self.receive = receive
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, FILE_SIZE)
            self._map = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._generation = 0
        self._words = memoryview(self._map)[:HEADER_SIZE].cast("I")
        """The header as 32-bit words: magic, generation and the published index are each
        stored with one store (a watcher reads them while the device runs: see
        devices/memory.py on struct.pack_into)."""
        self._words[0] = MAGIC
        self._entries = memoryview(self._map)[HEADER_SIZE:].cast("Q")
        self.publish(0, 0, 0, 0, event_idx=False)

    @property
    def entries(self) -> memoryview:
        """The entries as 64-bit words (format 'Q'), for a device path outside Python
        (vfuserver/netpath.py) to store into as :meth:`record` does."""
        return self._entries

    @property
    def header_words(self) -> memoryview:
        """The header as 32-bit words (format 'I'); word 12 is the published index."""
        return self._words

    def published(self, used_idx: int) -> None:
        """The device stored ``used_idx`` in the used ring's ``idx`` (called after it)."""
        self._words[PUBLISHED_WORD] = used_idx

    def record(self, index: int, element: int) -> None:
        """The used element (``id | len << 32``) stored for 16-bit used ``index``; called
        before the element is stored in guest memory."""
        store_u64(self._entries, index, element)

    def publish(self, size: int, desc: int, avail: int, used: int, *, event_idx: bool,
                used_idx: int = 0) -> None:
        """The ring's addresses and used index as of now (size 0: not in use)."""
        self._generation += 1  # odd: being rewritten
        self._words[1] = self._generation
        _BODY.pack_into(self._map, 8, self.queue, size, desc, avail, used, int(event_idx),
                        int(self.receive))
        self._words[PUBLISHED_WORD] = used_idx
        self._generation += 1
        self._words[1] = self._generation

    def close(self) -> None:
        self._entries.release()
        self._words.release()
        self._map.close()
