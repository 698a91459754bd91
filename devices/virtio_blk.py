"""The virtio block device (virtio 1.x §5.2), modelled on QEMU hw/block/virtio-blk.c.

Requests come from one or more request queues (VIRTIO_BLK_F_MQ). Each is parsed and
checked here, synchronously, when its queue is kicked (QEMU virtio_blk_handle_request):
what can be answered at once (GET_ID, a malformed or unsupported request, a range beyond
the disk) is answered at once; a read, write, flush, discard or write-zeroes becomes a
:class:`BlockRequest` handed to the :class:`BlockBackend`, which does the I/O off the
device's thread and hands the finished requests back to :meth:`VirtioBlk.complete`, the
one entry point for completions. Requests of one queue complete in whatever order the
host finishes them.

A request waiting for the host keeps its descriptor chain but not the chain's memory
views (the client may unmap memory meanwhile); they are mapped again, and checked, at
completion. Write data is copied out of guest memory when the request is parsed, read data
into it at completion. A reset drops the completions of requests submitted before it
(their epoch is stale): the driver has forgotten them, and their descriptors are no
longer the device's to use.

Status bytes follow QEMU: a range outside the disk, a misaligned or partial sector, a
write to a read-only disk and every host I/O error answer VIRTIO_BLK_S_IOERR; a type the
device does not know or has not offered, and DISCARD/WRITE_ZEROES data the device does not
support (several segments, reserved flags), VIRTIO_BLK_S_UNSUPP. A chain without a
device-writable byte for the status cannot be answered: like QEMU ("virtio-blk missing
headers") the device then needs a reset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vfuserver.devices.errors import GuestError, GuestMemoryError, HostError
from vfuserver.devices.virtio import VirtioDevice, VirtioInterrupts
from vfuserver.devices.virtqueue import DescriptorChain, VirtQueue, VirtQueueError
from vfuserver.protocol import virtio_blk as blk
from vfuserver.protocol.virtio import DeviceType, Feature
from vfuserver.protocol.virtio_blk import BlkFeature, RequestType, Status

if TYPE_CHECKING:
    from vfuserver.devices.memory import GuestMemory

SIZE_MAX = 64 * 1024
"""Largest segment offered (VIRTIO_BLK_F_SIZE_MAX); with seg_max it bounds a request."""
MAX_DISCARD_SECTORS = 0x3F_FFFF
"""QEMU's default max-discard-sectors and max-write-zeroes-sectors (BDRV_REQUEST_MAX_SECTORS)."""
MAX_IN_FLIGHT_BYTES = 64 << 20
"""Data the backend may hold for one device at once (write data copied out, read buffers),
plus the one request that crosses it (at most seg_max * SIZE_MAX bytes); beyond it the
device stops taking requests off its queues until some complete, so a guest that fills
every queue with the largest requests cannot make the server allocate without bound."""
REQUEST_WEIGHT = 256
"""Requests a device takes off its rings, all queues together, in one turn (from one
:meth:`VirtioBlk.run_pending` to the next, with :attr:`VirtioBlk.on_queue_pending` set)
before it yields, as vhost's work weights (drivers/vhost/vhost.c vhost_exceeds_weight;
vhost-scsi's VHOST_SCSI_WEIGHT is 256): a guest that keeps its rings full, or refills them
while the device works, cannot hold the thread the device shares with others for longer
than one turn."""
DESCRIPTOR_WEIGHT = 1024
"""Descriptors (indirect ones included) one turn walks before it yields: chains of many
descriptors cost per descriptor, whatever the request."""
BYTE_WEIGHT = 4 << 20
"""Bytes of write data one turn copies out of guest memory before it yields."""
MAX_QUEUES = 64
"""Request queues a device may have (QEMU VIRTIO_QUEUE_MAX is larger; Linux uses at most
one per vCPU)."""

BASE_FEATURES = (
    BlkFeature.SIZE_MAX.mask
    | BlkFeature.SEG_MAX.mask
    | BlkFeature.BLK_SIZE.mask
    | BlkFeature.FLUSH.mask
    | BlkFeature.TOPOLOGY.mask
    | BlkFeature.CONFIG_WCE.mask
    | BlkFeature.MQ.mask
    | Feature.VERSION_1.mask
    | Feature.RING_INDIRECT_DESC.mask
    | Feature.RING_EVENT_IDX.mask
)
"""Offered always."""
WRITE_FEATURES = BlkFeature.DISCARD.mask | BlkFeature.WRITE_ZEROES.mask
"""Offered on a writable disk; a read-only one offers VIRTIO_BLK_F_RO instead."""


class BlockBackend(Protocol):
    """The disk behind the device; implemented by the server's image backends.

    :meth:`submit` starts a request and returns at once; the finished request (its
    :attr:`BlockRequest.error` and, for a read, :attr:`BlockRequest.result` filled in)
    goes back to :meth:`VirtioBlk.complete`, from wherever the backend runs.
    """

    size: int
    """Bytes of the disk (a multiple of :data:`~vfuserver.protocol.virtio_blk.SECTOR_SIZE`)."""
    block_size: int
    """Logical block size in bytes: 512, or 4096 for a 4K-native disk opened O_DIRECT."""
    read_only: bool

    def submit(self, request: BlockRequest) -> None:
        """Start ``request``; must not block, nor complete it before returning. HostError
        or OSError if the backend cannot take it (the request is answered IOERR)."""
        ...


@dataclass(eq=False, slots=True)
class BlockRequest:
    """One disk operation: what the backend reads, and the device's bookkeeping."""

    type: RequestType
    """IN, OUT, FLUSH, DISCARD or WRITE_ZEROES."""
    offset: int = 0
    """Byte offset on the disk (IN, OUT, DISCARD, WRITE_ZEROES)."""
    length: int = 0
    """Bytes to read, write, discard or zero."""
    data: bytes = b""
    """OUT: the bytes to write."""
    unmap: bool = False
    """WRITE_ZEROES: the range may be deallocated."""
    fua: bool = False
    """OUT in write-through mode: on stable storage before it completes (fdatasync)."""
    error: int = 0
    """Set by the backend: 0, or the errno of the failure."""
    result: bytes | bytearray | memoryview = b""
    """Set by the backend for IN: the bytes read (``length`` of them)."""
    queue: int = 0
    chain: DescriptorChain | None = field(default=None, repr=False)
    epoch: int = 0
    held: int = -1
    """Bytes of it counted in :attr:`BlkStats.in_flight_bytes` while the backend holds it
    (-1: not held)."""


@dataclass
class BlkStats:
    """Counters, for the operator; never reset by the guest."""

    read_ops: int = 0
    read_bytes: int = 0
    write_ops: int = 0
    write_bytes: int = 0
    flush_ops: int = 0
    discard_ops: int = 0
    write_zeroes_ops: int = 0
    get_id_ops: int = 0
    io_errors: int = 0
    """Requests answered IOERR (out of range, misaligned, read-only, host I/O errors)."""
    unsupported: int = 0
    """Requests answered UNSUPP."""
    stale_completions: int = 0
    """Completions of requests submitted before a reset, dropped."""
    in_flight: int = 0
    """Requests the backend holds now, those submitted before a reset included (their
    data is still the host's until they complete)."""
    in_flight_bytes: int = 0
    """Their data (see MAX_IN_FLIGHT_BYTES)."""
    throttled: int = 0
    """Times a queue was left with requests because MAX_IN_FLIGHT_BYTES was reached."""
    requeued: int = 0
    """Times a queue's turn ended at REQUEST_WEIGHT, DESCRIPTOR_WEIGHT or BYTE_WEIGHT with
    requests left, to run again after the server's other work."""


class VirtioBlk(VirtioDevice):
    """A virtio-blk device with ``num_queues`` request queues over a :class:`BlockBackend`."""

    device_id = DeviceType.BLOCK

    def __init__(
        self,
        memory: GuestMemory,
        interrupts: VirtioInterrupts,
        backend: BlockBackend,
        *,
        num_queues: int = 1,
        serial: bytes = b"",
        queue_max_size: int = 256,
        name: str = "virtio-blk",
    ) -> None:
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"{num_queues} request queues; choose 1..{MAX_QUEUES}")
        if len(serial) > blk.ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {blk.ID_BYTES} bytes")
        if backend.size % blk.SECTOR_SIZE or backend.block_size % blk.SECTOR_SIZE:
            raise ValueError(f"disk of {backend.size} bytes with {backend.block_size}-byte "
                             f"blocks is not made of {blk.SECTOR_SIZE}-byte sectors")
        features = BASE_FEATURES | (
            BlkFeature.RO.mask if backend.read_only else WRITE_FEATURES)
        super().__init__(memory, interrupts, queue_max_size=queue_max_size, name=name,
                         num_queues=num_queues, features=features)
        self.backend = backend
        self.serial = serial
        self.seg_max = queue_max_size - 2
        """QEMU's choice: the queue size less the header and status descriptors."""
        for queue in self.queues:
            queue.max_chain_bytes = self.seg_max * SIZE_MAX + blk.OUTHDR_SIZE + 1
        self.stats = BlkStats()
        self.writeback = True
        """The write cache as the driver sees it (config ``writeback``)."""
        self.epoch = 0
        """Bumped by every reset: completions of older requests are dropped."""
        self.max_in_flight_bytes = MAX_IN_FLIGHT_BYTES
        self.max_in_flight = num_queues * queue_max_size
        """Requests the backend may hold for the device: as many as its rings can, so a
        guest that resets and refills them (FLUSH, DISCARD: no data to count) gets no
        more."""
        self._throttled: set[int] = set()
        """Queues left with available requests for lack of in-flight budget."""
        self.on_queue_pending: Callable[[], None] | None = None
        """If set, the device takes at most REQUEST_WEIGHT requests, DESCRIPTOR_WEIGHT
        descriptors or BYTE_WEIGHT bytes of write data off its rings (kicks, completions
        freeing budget) between two calls of :meth:`run_pending`; a queue left with
        requests then calls this: the server is to call :meth:`run_pending` soon, after its
        other work (vhost_exceeds_weight requeues the work the same way). If None, a kick
        takes everything available."""
        self._pending: set[int] = set()
        """Queues whose turn ended at a weight, for :meth:`run_pending`."""
        self._spent = [0, 0, 0]
        """Requests, descriptors and bytes taken since the last :meth:`run_pending`: the
        weights hold for the device, whichever of its queues were kicked."""
        self.reset()

    # -- state ------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors."""
        return self.backend.size >> blk.SECTOR_SHIFT

    def _reset_device(self) -> None:
        # in_flight and in_flight_bytes stay: the backend holds those requests' data until
        # they complete, and a guest that resets and refills its queues over and over must
        # not get a new MAX_IN_FLIGHT_BYTES each time
        self.epoch += 1
        self._throttled.clear()
        self._pending.clear()
        self._spent = [0, 0, 0]
        self.writeback = True

    def _features_changed(self) -> None:
        # QEMU virtio_blk_set_features: without FLUSH (legacy WCE) the driver cannot
        # flush, so writes go through to the disk.
        self.writeback = self.has_feature(BlkFeature.FLUSH)

    def _config_bytes(self) -> bytes:
        sectors_per_block = self.backend.block_size >> blk.SECTOR_SHIFT
        max_sectors = 0 if self.backend.read_only else MAX_DISCARD_SECTORS
        return blk.CONFIG_STRUCT.pack(
            self.capacity, SIZE_MAX, self.seg_max,
            0, 0, 0,  # geometry: not offered
            self.backend.block_size,
            0, 0, 0, 0,  # topology: physical = logical, aligned, no I/O size hints
            int(self.writeback), 0, len(self.queues),
            max_sectors, 1, sectors_per_block,  # discard: one segment, block aligned
            max_sectors, 1, 1,  # write zeroes: one segment, may unmap
        )

    def _write_config(self, offset: int, data: bytes) -> None:
        # Only ``writeback`` is writable, with CONFIG_WCE (legacy drivers: whenever they
        # write it; QEMU virtio_blk_set_config).
        where = blk.ConfigOffset.WRITEBACK
        if not offset <= where < offset + len(data):
            self.log.debug("%s: config write at %#x ignored", self.name, offset)
            return
        if not (self.legacy or self.has_feature(BlkFeature.CONFIG_WCE)):
            self.log.debug("%s: writeback written without CONFIG_WCE, ignored", self.name)
            return
        self.writeback = data[where - offset] != 0

    # -- requests (§5.2.6) ------------------------------------------------------------

    def run_pending(self) -> None:
        """Another turn for the queues whose last one ended at a weight (see
        :attr:`on_queue_pending`). Never raises for guest mistakes."""
        pending, self._pending = self._pending, set()
        self._spent = [0, 0, 0]
        for index in sorted(pending):
            self.notify(index)

    def _handle_queue(self, queue: VirtQueue) -> None:
        answered = False
        weighed = self.on_queue_pending is not None
        spent = self._spent
        while True:
            if (self.stats.in_flight_bytes >= self.max_in_flight_bytes
                    or self.stats.in_flight >= self.max_in_flight):
                if queue.available():
                    # taken up again by complete(); the driver's kicks meanwhile are moot
                    self._throttled.add(queue.index)
                    self.stats.throttled += 1
                break
            if weighed and (spent[0] >= REQUEST_WEIGHT or spent[1] >= DESCRIPTOR_WEIGHT
                            or spent[2] >= BYTE_WEIGHT):
                if queue.available() and queue.index not in self._pending:
                    self._pending.add(queue.index)
                    self.stats.requeued += 1
                    self.on_queue_pending()  # type: ignore[misc]  # weighed: not None
                break
            chain = queue.pop()
            if chain is None:
                break
            spent[0] += 1
            spent[1] += chain.descriptors
            spent[2] += chain.readable_len
            if not chain.writable_len:
                # QEMU: "virtio-blk missing headers"; there is no byte for a status
                raise VirtQueueError(
                    f"queue {queue.index}: request chain {chain.head} has no "
                    "device-writable status byte")
            request = self._parse(queue, chain)
            if request is None:
                answered = True
            else:
                self._submit(queue, chain, request)
                answered = answered or request.chain is None
        if answered and queue.flush():
            self.queue_interrupt(queue)

    def _answer(self, queue: VirtQueue, chain: DescriptorChain, status: Status) -> None:
        """Write the status byte (the last device-writable byte) and mark the chain used
        with all its writable bytes, as QEMU's virtio_blk_req_complete (in_len)."""
        if status == Status.IOERR:
            self.stats.io_errors += 1
        elif status == Status.UNSUPP:
            self.stats.unsupported += 1
        chain.write(bytes((status,)), chain.writable_len - 1)
        queue.push(chain, chain.writable_len)

    def _refuse(self, queue: VirtQueue, chain: DescriptorChain, status: Status,
                reason: str, *args: object) -> None:
        self.ratelimited.log(logging.INFO, "%s: queue %d request %d answered %s: " + reason,
                             self.name, queue.index, chain.head, status.name, *args)
        self._answer(queue, chain, status)

    def _parse(self, queue: VirtQueue, chain: DescriptorChain) -> BlockRequest | None:
        """The request a chain carries, or None if it has been answered already."""
        readable = chain.read()
        if len(readable) < blk.OUTHDR_SIZE:
            self._refuse(queue, chain, Status.IOERR, "%d-byte header, not %d",
                         len(readable), blk.OUTHDR_SIZE)
            return None
        kind, _ioprio, sector = blk.OUTHDR_STRUCT.unpack_from(readable)
        # legacy drivers may or BARRIER into the type (QEMU masks it off)
        kind &= ~blk.BARRIER_FLAG
        payload = readable[blk.OUTHDR_SIZE :]
        if kind == RequestType.IN:
            return self._read_write(queue, chain, RequestType.IN, sector,
                                    chain.writable_len - 1, b"")
        if kind == RequestType.OUT:
            return self._read_write(queue, chain, RequestType.OUT, sector, len(payload),
                                    payload)
        if kind == RequestType.FLUSH:
            self.stats.flush_ops += 1
            return BlockRequest(RequestType.FLUSH)
        if kind == RequestType.GET_ID:
            self.stats.get_id_ops += 1
            # QEMU: the serial, at most 20 bytes and the buffer's length, zero-padded
            length = min(blk.ID_BYTES, chain.writable_len - 1)
            chain.write(self.serial.ljust(blk.ID_BYTES, b"\0")[:length])
            self._answer(queue, chain, Status.OK)
            return None
        if kind in (RequestType.DISCARD, RequestType.WRITE_ZEROES):
            return self._discard_write_zeroes(queue, chain, RequestType(kind), payload)
        self._refuse(queue, chain, Status.UNSUPP, "request type %d", kind)
        return None

    def _range_problem(self, sector: int, length: int) -> str | None:
        """QEMU virtio_blk_sect_range_ok: block-aligned, whole blocks, inside the disk."""
        block = self.backend.block_size
        if (sector << blk.SECTOR_SHIFT) % block or length % block:
            return f"{length} bytes at sector {sector} are not whole {block}-byte blocks"
        if sector > self.capacity or length >> blk.SECTOR_SHIFT > self.capacity - sector:
            return f"{length} bytes at sector {sector} end beyond the {self.capacity}-sector disk"
        return None

    def _read_write(self, queue: VirtQueue, chain: DescriptorChain, kind: RequestType,
                    sector: int, length: int, data: bytes) -> BlockRequest | None:
        problem = self._range_problem(sector, length)
        if problem is None and kind == RequestType.OUT and self.backend.read_only:
            problem = "write to a read-only disk"
        if problem is not None:
            self._refuse(queue, chain, Status.IOERR, "%s", problem)
            return None
        if kind == RequestType.IN:
            self.stats.read_ops += 1
            self.stats.read_bytes += length
        else:
            self.stats.write_ops += 1
            self.stats.write_bytes += length
        if not length:
            self._answer(queue, chain, Status.OK)
            return None
        return BlockRequest(kind, sector << blk.SECTOR_SHIFT, length, data,
                            fua=kind == RequestType.OUT and not self.writeback)

    def _discard_write_zeroes(self, queue: VirtQueue, chain: DescriptorChain,
                              kind: RequestType, payload: bytes) -> BlockRequest | None:
        """QEMU virtio_blk_handle_discard_write_zeroes: one segment, no reserved flags."""
        feature = BlkFeature.DISCARD if kind == RequestType.DISCARD else BlkFeature.WRITE_ZEROES
        if not self.has_feature(feature):
            self._refuse(queue, chain, Status.UNSUPP, "%s without %s negotiated", kind.name,
                         feature.name)
            return None
        if len(payload) > blk.DWZ_SEGMENT_SIZE:
            self._refuse(queue, chain, Status.UNSUPP, "%s of %d bytes: one %d-byte segment "
                         "is supported", kind.name, len(payload), blk.DWZ_SEGMENT_SIZE)
            return None
        if len(payload) < blk.DWZ_SEGMENT_SIZE:
            self._refuse(queue, chain, Status.IOERR, "%s segment of %d bytes", kind.name,
                         len(payload))
            return None
        sector, count, flags = blk.DWZ_STRUCT.unpack(payload)
        allowed = int(blk.DiscardFlag.UNMAP) if kind == RequestType.WRITE_ZEROES else 0
        if flags & ~allowed:
            self._refuse(queue, chain, Status.UNSUPP, "%s flags %#x", kind.name, flags)
            return None
        length = count << blk.SECTOR_SHIFT
        problem = self._range_problem(sector, length)
        if problem is None and count > MAX_DISCARD_SECTORS:
            problem = f"{count} sectors, over the limit of {MAX_DISCARD_SECTORS}"
        if problem is None and self.backend.read_only:
            problem = f"{kind.name} on a read-only disk"
        if problem is not None:
            self._refuse(queue, chain, Status.IOERR, "%s: %s", kind.name, problem)
            return None
        if kind == RequestType.DISCARD:
            self.stats.discard_ops += 1
        else:
            self.stats.write_zeroes_ops += 1
        if not count:
            self._answer(queue, chain, Status.OK)
            return None
        return BlockRequest(kind, sector << blk.SECTOR_SHIFT, length,
                            unmap=bool(flags & blk.DiscardFlag.UNMAP))

    def _submit(self, queue: VirtQueue, chain: DescriptorChain, request: BlockRequest) -> None:
        """Hand a parsed request to the backend; it keeps the chain, not its views."""
        request.queue = queue.index
        request.epoch = self.epoch
        chain.release_views()
        request.chain = chain
        try:
            self.backend.submit(request)
        except (HostError, OSError) as err:
            chain.map_views(self.memory)  # still valid: control has not left the device
            request.chain = None
            self._refuse(queue, chain, Status.IOERR, "backend refused it: %s", err)
            return
        request.held = request.length if request.type in _DATA_TYPES else 0
        self.stats.in_flight += 1
        self.stats.in_flight_bytes += request.held

    # -- completions ------------------------------------------------------------------

    def complete(self, requests: Iterable[BlockRequest]) -> None:
        """Finished requests from the backend: status (and read data) into the guest,
        used entries published, interrupts raised; never raises for guest mistakes.

        The one method through which the host side touches the device after a request
        left it (the server runs it under the device's lock).
        """
        touched: dict[int, VirtQueue] = {}
        for request in requests:
            if request.held >= 0:  # the backend lets go of it, whichever epoch it is of
                self.stats.in_flight -= 1
                self.stats.in_flight_bytes -= request.held
                request.held = -1
            if request.epoch != self.epoch or request.chain is None:
                self.stats.stale_completions += 1
                continue
            if self.broken:
                continue
            queue = self.queues[request.queue]
            chain = request.chain
            request.chain = None
            if not queue.enabled:
                # a legacy driver wrote QUEUE_PFN 0 meanwhile: the ring is gone
                self.stats.stale_completions += 1
                continue
            try:
                chain.map_views(self.memory)
            except GuestMemoryError as err:
                self.needs_reset(f"queue {queue.index}: request {chain.head} completed, "
                                 f"but its buffers are gone: {err}")
                continue
            status = Status.OK
            if request.error:
                status = Status.IOERR
                self.ratelimited.log(logging.WARNING, "%s: %s of %d bytes at %d failed: %s",
                                     self.name, request.type.name, request.length,
                                     request.offset, os.strerror(request.error))
            elif request.type == RequestType.IN:
                chain.write(request.result)
            try:
                self._answer(queue, chain, status)
            except GuestError as err:  # the driver moved the ring under the request
                self.needs_reset(str(err))
                continue
            touched[queue.index] = queue
        for queue in touched.values():
            try:
                if queue.flush():
                    self.queue_interrupt(queue)
            except GuestError as err:
                self.needs_reset(str(err))
        throttled, self._throttled = self._throttled, set()
        for index in sorted(throttled):
            self.notify(index)  # what waited for the budget (notify checks the state)


_DATA_TYPES = frozenset({RequestType.IN, RequestType.OUT})
"""Requests whose data the host holds while they run (counted in in_flight_bytes)."""
