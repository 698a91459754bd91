"""The split virtqueue engine (virtio 1.x §2.7) over :class:`GuestMemory`.

A :class:`VirtQueue` is the device side of one split ring: :meth:`VirtQueue.pop` takes the
next descriptor chain the driver made available, :meth:`VirtQueue.push` records it as used
and :meth:`VirtQueue.flush` publishes a batch of used entries and says whether the driver
wants an interrupt for them. Notification suppression in both directions (used ``flags`` /
``avail_event``, avail ``flags`` / ``used_event``) follows QEMU hw/virtio/virtio.c.

The guest owns every byte of the rings and may change them at any time, so each value is
read from guest memory exactly once and checked before use. Whatever the driver does
wrong raises :class:`VirtQueueError` with a message naming the queue and the offending
descriptor; the device model turns that into NEEDS_RESET (QEMU's virtio_error). Buffer
ranges are checked against the DMA maps when a chain is popped, so a chain's gather and
scatter helpers never fault.

Buffers and rings may lie across adjacent DMA maps (the same guest RAM as several maps).
A buffer then becomes several pieces, as QEMU's virtqueue_map_desc splits it into
iovecs. A ring area in one map (the common case) is used through one view; one that lies
across maps is reached field by field: a load copies the field once
(:meth:`GuestMemory.read`), a store goes to a view of that field alone, which must lie
in one map (one store per field, see devices/memory.py).

The memory views a :class:`DescriptorChain` holds are valid only until control returns to
the server loop (see :meth:`GuestMemory.view`): a chain is popped, processed and pushed
within one call, or (a request that waits for the host) its views are released and
mapped again, checked, when it completes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from vfuserver.devices.errors import GuestError, GuestMemoryError
from vfuserver.devices.memory import store_u16, store_u32, store_u64
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio_pci import MSI_NO_VECTOR

if TYPE_CHECKING:
    from vfuserver.devices.memory import GuestMemory
    from vfuserver.devices.ring_journal import RingJournal

DEFAULT_MAX_CHAIN_BYTES = 1 << 20
"""Default cap on the total length of one descriptor chain."""

_DESC_UNPACK = ring.DESC_STRUCT.unpack_from
_U16_UNPACK = ring.U16_STRUCT.unpack_from
_USED_IDX = ring.USED_IDX_OFFSET // 2
_USED_FLAGS = ring.USED_FLAGS_OFFSET // 2
_USED_ELEM_LEN_OFFSET = 4  # struct virtq_used_elem {le32 id; le32 len}
# Plain ints: with an IntFlag operand every `flags & _NEXT` of the descriptor walk goes
# through enum's Python-level operators (enum.Flag.__rand__), microseconds per chain.
_NEXT = int(ring.DescFlag.NEXT)
_WRITE = int(ring.DescFlag.WRITE)
_INDIRECT = int(ring.DescFlag.INDIRECT)


class RingState(Protocol):
    """Where :meth:`VirtQueue.export_state` copies a ring's state: the fields of
    ``struct vfuserver_vq`` (vfuserver/csrc/netpath.c), named as VirtQueue's own."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: int
    notification: int
    max_chain_bytes: int
    last_avail_idx: int
    used_idx: int
    signalled_used: int
    signalled_used_valid: int
    lost_seen: int
    pending_used: int


class VirtQueueError(GuestError):
    """The driver broke the split-ring rules on a queue; the device needs a reset."""


class DescriptorChain:
    """One popped descriptor chain: the buffers of one request, in driver order.

    ``readable`` and ``writable`` are the device-readable and device-writable segments as
    ``(guest address, length)`` pairs (zero-length descriptors are skipped);
    ``readable_len`` and ``writable_len`` their totals.
    """

    __slots__ = (
        "_rviews",
        "_wviews",
        "descriptors",
        "head",
        "readable",
        "readable_len",
        "writable",
        "writable_len",
    )

    def __init__(self, head: int) -> None:
        self.head = head
        self.readable: list[tuple[int, int]] = []
        self.writable: list[tuple[int, int]] = []
        self.readable_len = 0
        self.writable_len = 0
        self.descriptors = 0
        """Descriptors in the chain, indirect ones included."""
        self._rviews: list[memoryview] = []
        self._wviews: list[memoryview] = []

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} readable={self.readable_len}B "
            f"writable={self.writable_len}B>"
        )

    def release_views(self) -> None:
        """Drop the memory views: a chain kept while its request waits for the host (a
        block read) must not pin guest memory the client may unmap meanwhile."""
        self._rviews = []
        self._wviews = []

    def map_views(self, memory: GuestMemory) -> None:
        """Resolve the buffers' views again after :meth:`release_views`, when the request
        completes; GuestMemoryError if a buffer is no longer mapped (or not writable)."""
        self._rviews = [memory.view(addr, length) for addr, length in self.readable]
        self._wviews = [memory.view(addr, length, writable=True)
                        for addr, length in self.writable]

    def read(self) -> bytes:
        """All device-readable bytes, gathered into one bytes object (one copy)."""
        if len(self._rviews) == 1:
            return bytes(self._rviews[0])
        return b"".join(self._rviews)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the device-writable buffers from byte ``offset`` of them.

        Returns the number of bytes written: less than ``len(data)`` if the buffers end
        first.
        """
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        total = len(src)
        done = 0
        skip = offset
        for view in self._wviews:
            size = len(view)
            if skip >= size:
                skip -= size
                continue
            take = min(size - skip, total - done)
            view[skip : skip + take] = src[done : done + take]
            done += take
            skip = 0
            if done == total:
                break
        return done


class VirtQueue:
    """The device side of one split virtqueue.

    The transport programs :attr:`size` (through :meth:`set_size`), the three ring
    addresses, :attr:`msix_vector` and enables the queue; the device pops, pushes and
    flushes. :attr:`event_idx` mirrors the negotiated VIRTIO_F_EVENT_IDX and is set by the
    device when features take effect.
    """

    def __init__(
        self,
        memory: GuestMemory,
        index: int,
        max_size: int,
        *,
        max_chain_bytes: int = DEFAULT_MAX_CHAIN_BYTES,
    ) -> None:
        if not ring.is_valid_queue_size(max_size):
            raise ValueError(f"queue max size {max_size} is not a power of two <= 32768")
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.max_chain_bytes = max_chain_bytes
        """Longest total (readable + writable) chain accepted; longer ones are an error."""
        self.journal: RingJournal | None = None
        """A debugging record of every used element stored (see ring_journal.py)."""
        self.reset()

    def __repr__(self) -> str:
        return (
            f"<VirtQueue {self.index} size={self._size} enabled={self.enabled} "
            f"avail={self.last_avail_idx} used={self.used_idx}>"
        )

    # -- configuration (transport side) --------------------------------------------------

    def reset(self) -> None:
        """Back to the state after device reset: disabled, max size, no vector."""
        self._size = self.max_size
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.enabled = False
        self.msix_vector = MSI_NO_VECTOR
        self.last_avail_idx = 0
        """Free-running index of the next avail ring slot the device will pop."""
        self.used_idx = 0
        """Free-running used index the device last published."""
        self.event_idx = False
        self._pending_used = 0
        self._notification = True
        self._signalled_used = 0
        self._signalled_used_valid = False
        self._lost_seen = self.memory.lost.count
        """Lost-page count this queue has reported (see :meth:`_lost_error`)."""
        self._in_flight: set[int] = set()
        """Heads popped and not yet pushed: a head offered again meanwhile is a driver
        bug, a head pushed that is not here a device bug (either would make the driver
        see a used id that "is not a head")."""
        self.publish_journal()

    def publish_journal(self) -> None:
        """Tell the journal (if any) the ring's addresses as they are now."""
        if self.journal is not None:
            size = self._size if self.enabled else 0
            self.journal.publish(size, self.desc_addr, self.avail_addr, self.used_addr,
                                 event_idx=self.event_idx, used_idx=self.used_idx)

    @property
    def size(self) -> int:
        """Number of entries; a power of two no larger than :attr:`max_size`."""
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self.set_size(value)

    def set_size(self, size: int) -> None:
        """Set the queue size; VirtQueueError (and no change) if it is not a power of two
        between 1 and :attr:`max_size` (split-ring.tex: Queue Size is a power of 2)."""
        if not ring.is_valid_queue_size(size, self.max_size):
            raise VirtQueueError(
                f"queue {self.index}: size {size} is not a power of two "
                f"between 1 and {self.max_size}"
            )
        self._size = size

    def enable(self) -> None:
        """The driver wrote queue_enable = 1 (modern) or a non-zero PFN (legacy)."""
        self.enabled = True
        self.publish_journal()

    def place_contiguous(self, base: int) -> None:
        """Legacy placement: the whole ring at ``base`` (QUEUE_PFN << 12), used ring at the
        next 4096 boundary; ``base`` 0 disables the queue (Linux legacy del_vq)."""
        if base == 0:
            self.desc_addr = self.avail_addr = self.used_addr = 0
            self.enabled = False
        else:
            layout = ring.contiguous_layout(base, self._size)
            self.desc_addr, self.avail_addr, self.used_addr = layout
            self.enabled = True
        self.publish_journal()

    # -- the ring state, for a data path outside the model ------------------------------

    def idle(self) -> bool:
        """Enabled, with no chain popped and not pushed: the whole ring state is what
        :meth:`export_state` copies, so another engine may take over from it (keeping
        :attr:`journal` as :meth:`push` and :meth:`flush` do)."""
        return self.enabled and not self._in_flight

    @property
    def unpublished(self) -> int:
        """Used entries pushed and not yet published by :meth:`flush`."""
        return self._pending_used

    def export_state(self, state: RingState) -> None:
        """Copy the ring's layout and indexes into ``state`` (the server's C data path,
        vfuserver/netpath.py, works on that copy and :meth:`import_state` takes it back)."""
        state.size = self._size
        state.desc_addr = self.desc_addr
        state.avail_addr = self.avail_addr
        state.used_addr = self.used_addr
        state.event_idx = self.event_idx
        state.notification = self._notification
        state.max_chain_bytes = self.max_chain_bytes
        state.last_avail_idx = self.last_avail_idx
        state.used_idx = self.used_idx
        state.signalled_used = self._signalled_used
        state.signalled_used_valid = self._signalled_used_valid
        state.lost_seen = self._lost_seen
        state.pending_used = self._pending_used

    def import_state(self, state: RingState) -> None:
        """Take back the indexes an engine advanced from :meth:`export_state`'s copy. It
        completed every chain it popped (none is left in flight); entries it pushed and did
        not publish are published by the next :meth:`flush`."""
        self._notification = bool(state.notification)
        self.last_avail_idx = state.last_avail_idx
        self.used_idx = state.used_idx
        self._signalled_used = state.signalled_used
        self._signalled_used_valid = bool(state.signalled_used_valid)
        self._pending_used = state.pending_used

    # -- ring access ------------------------------------------------------------------

    def _error(self, message: str) -> VirtQueueError:
        return VirtQueueError(f"queue {self.index}: {message}")

    def _area(self, what: str, addr: int, length: int, writable: bool) -> memoryview | None:
        """Ring area [addr, +length) as one view, or None when it lies across adjacent
        maps (its fields are then reached one by one: :meth:`_load_u16`,
        :meth:`_field`). VirtQueueError if any byte of it is unmapped (or, ``writable``,
        read-only)."""
        memory = self.memory
        try:
            return memory.view(addr, length, writable=writable)
        except GuestMemoryError:
            try:
                memory.pieces(addr, length, writable=writable)
            except GuestMemoryError as err:
                raise self._error(f"{what} at {addr:#x} (+{length:#x}): {err}") from err
            return None

    def _load_u16(self, addr: int) -> int:
        """A 16-bit ring field of a ring that lies across maps, loaded once."""
        value: int = _U16_UNPACK(self.memory.read(addr, 2))[0]
        return value

    def _field(self, what: str, addr: int, size: int) -> memoryview:
        """A writable view of one field of a ring that lies across maps. The field itself
        must lie in one map: a store split in two would let the driver see half of it."""
        try:
            return self.memory.view(addr, size, writable=True)
        except GuestMemoryError as err:
            raise self._error(
                f"{what} field at {addr:#x} (+{size}) is not inside one writable DMA map: "
                f"{err}") from err

    def _store_used_u16(self, index: int, value: int) -> None:
        """Store 16-bit field ``index`` (flags, idx, ..., avail_event) of a used ring that
        lies across maps."""
        store_u16(self._field("used ring", self.used_addr + 2 * index, 2).cast("H"), 0, value)

    def _avail_view(self) -> memoryview | None:
        return self._area(
            "available ring", self.avail_addr, ring.avail_ring_size(self._size), False
        )

    def _used_u16(self) -> memoryview | None:
        """The used ring as 16-bit fields (flags, idx, ..., avail_event), None if it lies
        across maps: every store into it is one store (see devices/memory.py: never
        ``struct.pack_into``)."""
        view = self._area("used ring", self.used_addr, ring.used_ring_size(self._size), True)
        return None if view is None else view.cast("H")

    def _lost_error(self) -> VirtQueueError:
        """Guest pages were lost under the maps since this queue last looked (see
        :attr:`GuestMemory.lost`): what the batch read there was zeros."""
        lost = self.memory.lost
        self._lost_seen = lost.count
        return self._error(
            f"guest memory at {lost.iova:#x} was lost: the client shrank the file behind "
            "its DMA map (the server reads zeros there now; guest RAM must not shrink)")

    def _pending_in(self, avail: memoryview | None) -> int:
        avail_idx = (_U16_UNPACK(avail, ring.AVAIL_IDX_OFFSET)[0] if avail is not None
                     else self._load_u16(self.avail_addr + ring.AVAIL_IDX_OFFSET))
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self._size:
            # QEMU virtqueue_num_heads: "Guest moved used index from %u to %u"
            raise self._error(
                f"available index moved from {self.last_avail_idx} to {avail_idx}, "
                f"more than the queue size {self._size} ahead"
            )
        if pending:
            # QEMU virtqueue_num_heads: the ring entries read next must not be read before
            # the index that exposes them.
            self.memory.barriers.rmb()
        return pending

    def available(self) -> int:
        """Chains the driver has made available that the device has not popped yet."""
        return self._pending_in(self._avail_view())

    @property
    def notification_enabled(self) -> bool:
        """Whether the device currently asks the driver for available buffer notifications."""
        return self._notification

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver to notify (kick) on new buffers, or not (§2.7.10).

        Without EVENT_IDX this is used.flags NO_NOTIFY; with it, enabling publishes
        ``avail_event`` = the current available index (QEMU
        virtio_queue_split_set_notification) and disabling just stops updating it. After
        enabling, callers must look at the ring once more: buffers may have arrived before
        the driver saw the request.
        """
        self._notification = enabled
        if not self.enabled:
            return
        used = self._used_u16()
        if self.event_idx:
            if not enabled:
                return
            avail = self._avail_view()
            avail_idx = (_U16_UNPACK(avail, ring.AVAIL_IDX_OFFSET)[0] if avail is not None
                         else self._load_u16(self.avail_addr + ring.AVAIL_IDX_OFFSET))
            field, value = ring.avail_event_offset(self._size) // 2, avail_idx
        else:
            # The device is the only writer of used.flags: the value is ours to compute.
            field, value = _USED_FLAGS, 0 if enabled else ring.UsedFlag.NO_NOTIFY
        if used is not None:
            store_u16(used, field, value)
        else:
            self._store_used_u16(field, value)
        if enabled:
            # QEMU virtio_queue_split_set_notification: expose avail_event / flags before
            # the caller looks at the available index again (a store, then a load: only a
            # full barrier orders them; without it the driver's kick can be lost).
            self.memory.barriers.mb()

    # -- popping ----------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None if the driver has offered none."""
        avail = self._avail_view()
        if not self._pending_in(avail):
            if self.memory.lost.count != self._lost_seen:  # once per batch
                raise self._lost_error()
            return None
        slot = self.last_avail_idx & (self._size - 1)
        head = (_U16_UNPACK(avail, ring.AVAIL_RING_OFFSET + 2 * slot)[0] if avail is not None
                else self._load_u16(self.avail_addr + ring.AVAIL_RING_OFFSET + 2 * slot))
        if head >= self._size:
            raise self._error(
                f"available ring slot {slot} names descriptor {head}, "
                f"but the queue has {self._size}"
            )
        if head in self._in_flight:
            raise self._error(
                f"available ring slot {slot} offers descriptor {head}, which the device "
                "still holds"
            )
        chain = self._walk(head)
        self._in_flight.add(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx and self._notification:
            used = self._used_u16()
            field = ring.avail_event_offset(self._size) // 2
            if used is not None:
                store_u16(used, field, self.last_avail_idx)
            else:
                self._store_used_u16(field, self.last_avail_idx)
        return chain

    def rewind(self, chains: list[DescriptorChain]) -> None:
        """Give back the last chains popped (and not pushed), like QEMU's
        virtqueue_unpop: they will be popped again."""
        for chain in chains:
            self._in_flight.discard(chain.head)
        self.last_avail_idx = (self.last_avail_idx - len(chains)) & 0xFFFF

    def _walk(self, head: int) -> DescriptorChain:
        """Follow the chain at ``head`` through the table and at most one indirect table."""
        size = self._size
        table_addr = self.desc_addr
        table = self._area("descriptor table", table_addr, ring.DESC_SIZE * size, False)
        where = "descriptor table"
        limit = size
        chain = DescriptorChain(head)
        seen: set[int] = set()
        in_indirect = False
        seen_writable = False
        total = 0
        idx = head
        while True:
            if idx in seen:
                raise self._error(f"descriptor loop: chain {head} returns to {where} entry {idx}")
            seen.add(idx)
            addr, length, flags, nxt = (
                _DESC_UNPACK(table, ring.DESC_SIZE * idx) if table is not None
                else _DESC_UNPACK(self.memory.read(table_addr + ring.DESC_SIZE * idx,
                                                   ring.DESC_SIZE)))
            if flags & _INDIRECT:
                if in_indirect:
                    raise self._error(
                        f"chain {head}: indirect table entry {idx} is itself INDIRECT "
                        "(nested indirect tables are not allowed)"
                    )
                if flags & _NEXT:
                    raise self._error(
                        f"chain {head}: descriptor {idx} has both INDIRECT and NEXT set"
                    )
                if length == 0 or length % ring.DESC_SIZE:
                    raise self._error(
                        f"chain {head}: indirect table length {length} is not a non-zero "
                        f"multiple of {ring.DESC_SIZE}"
                    )
                table_addr = addr
                table = self._area(f"chain {head}: indirect table", addr, length, False)
                where = f"indirect table at {addr:#x}"
                limit = length // ring.DESC_SIZE
                in_indirect = True
                seen = set()
                idx = 0
                continue
            chain.descriptors += 1
            if chain.descriptors > size:
                raise self._error(
                    f"chain {head} is longer than the queue size {size} "
                    f"({where} holds {limit} entries)"
                )
            writable = bool(flags & _WRITE)
            if writable:
                seen_writable = True
            elif seen_writable:
                raise self._error(
                    f"chain {head}: device-readable {where} entry {idx} "
                    "follows a device-writable one"
                )
            if length:
                total += length
                if total > self.max_chain_bytes:
                    raise self._error(
                        f"chain {head} is {total} bytes or more at {where} entry {idx}, "
                        f"over the {self.max_chain_bytes}-byte limit"
                    )
                views = chain._wviews if writable else chain._rviews
                try:
                    views.append(self.memory.view(addr, length, writable=writable))
                except GuestMemoryError:
                    views.extend(self._buffer_pieces(head, where, idx, addr, length, writable))
                if writable:
                    chain.writable.append((addr, length))
                    chain.writable_len += length
                else:
                    chain.readable.append((addr, length))
                    chain.readable_len += length
            if not flags & _NEXT:
                return chain
            if nxt >= limit:
                raise self._error(
                    f"chain {head}: {where} entry {idx} links to {nxt}, "
                    f"but there are only {limit} entries"
                )
            idx = nxt

    def _buffer_pieces(self, head: int, where: str, idx: int, addr: int, length: int,
                       writable: bool) -> list[memoryview]:
        """A buffer that is not inside one map: its pieces across adjacent maps, or the
        VirtQueueError naming the descriptor."""
        try:
            return self.memory.pieces(addr, length, writable=writable)
        except GuestMemoryError as err:
            kind = "device-writable" if writable else "device-readable"
            raise self._error(
                f"chain {head}: {kind} buffer of {where} entry {idx}: {err}") from err

    # -- pushing ----------------------------------------------------------------------

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Record ``chain`` as used with ``written`` bytes written into its writable buffers.

        The entry becomes visible to the driver at the next :meth:`flush`.
        """
        if not 0 <= written <= chain.writable_len:
            raise ValueError(
                f"{written} bytes written into a chain with {chain.writable_len} writable"
            )
        try:
            self._in_flight.remove(chain.head)
        except KeyError:
            raise RuntimeError(
                f"device bug: queue {self.index} completes descriptor {chain.head}, "
                "which it does not hold"
            ) from None
        index = (self.used_idx + self._pending_used) & 0xFFFF
        element = chain.head | written << 32  # struct virtq_used_elem {le32 id; le32 len}
        if self.journal is not None:
            self.journal.record(index, element)
        start = self.used_addr + ring.USED_RING_OFFSET
        elements = self._area("used ring", start, ring.USED_ELEM_SIZE * self._size, True)
        if elements is not None:
            store_u64(elements.cast("Q"), index & (self._size - 1), element)
        else:
            self._store_used_elem(start + ring.USED_ELEM_SIZE * (index & (self._size - 1)),
                                  chain.head, written)
        self._pending_used += 1

    def _store_used_elem(self, addr: int, head: int, written: int) -> None:
        """Store a used element of a used ring that lies across maps: one 64-bit store if
        the element is inside one map, else one store per field (``id``, ``len``), as
        the driver reads neither before the used index that exposes them."""
        try:
            view = self.memory.view(addr, ring.USED_ELEM_SIZE, writable=True)
        except GuestMemoryError:
            store_u32(self._field("used element", addr, 4).cast("I"), 0, head)
            store_u32(self._field("used element", addr + _USED_ELEM_LEN_OFFSET, 4).cast("I"),
                      0, written)
        else:
            store_u64(view.cast("Q"), 0, head | written << 32)

    def flush(self) -> bool:
        """Publish the pushed entries (used ``idx``) and tell whether to interrupt the driver.

        QEMU virtqueue_flush + virtio_should_notify: without EVENT_IDX the driver's avail
        NO_INTERRUPT flag decides; with it, interrupt when the used index passes
        ``used_event`` since the last interrupt.
        """
        if not self._pending_used:
            return False
        if self.memory.lost.count != self._lost_seen:
            raise self._lost_error()
        used = self._used_u16()
        old = self.used_idx
        new = (old + self._pending_used) & 0xFFFF
        self._pending_used = 0
        # QEMU virtqueue_split_flush: the elements before the index that exposes them.
        self.memory.barriers.wmb()
        if used is not None:
            store_u16(used, _USED_IDX, new)
        else:
            self._store_used_u16(_USED_IDX, new)
        self.used_idx = new
        if self.journal is not None:
            self.journal.published(new)
        # QEMU virtqueue_flush: if the index we last signalled at is now behind us by less
        # than this batch (or ahead, after a wrap), the event_idx comparison would be
        # ambiguous, so forget it and interrupt unconditionally next time.
        since_signalled = (new - self._signalled_used) & 0xFFFF
        if since_signalled >= 0x8000:
            since_signalled -= 0x10000
        if since_signalled < (new - old) & 0xFFFF:
            self._signalled_used_valid = False
        return self._should_interrupt()

    def _should_interrupt(self) -> bool:
        # QEMU virtio_split_should_notify: expose the used index before reading the driver's
        # used_event (or flags). A store, then a load: only a full barrier orders them, and
        # without it an interrupt the driver asked for can be lost.
        self.memory.barriers.mb()
        avail = self._avail_view()
        if not self.event_idx:
            flags = (_U16_UNPACK(avail, ring.AVAIL_FLAGS_OFFSET)[0] if avail is not None
                     else self._load_u16(self.avail_addr + ring.AVAIL_FLAGS_OFFSET))
            return not flags & ring.AvailFlag.NO_INTERRUPT
        valid = self._signalled_used_valid
        old = self._signalled_used
        new = self._signalled_used = self.used_idx
        self._signalled_used_valid = True
        offset = ring.used_event_offset(self._size)
        used_event = (_U16_UNPACK(avail, offset)[0] if avail is not None
                      else self._load_u16(self.avail_addr + offset))
        return not valid or ring.vring_need_event(used_event, new, old)
