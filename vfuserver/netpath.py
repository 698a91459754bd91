"""virtio-net's per-frame work in C (vfuserver/csrc/netpath.c), between the model and a tap.

A :class:`NetPath` belongs to one served virtio-net device with a tap backend while a
client is attached; the serving thread calls it under the device lock. It copies each
queue's state out of its :class:`~vfuserver.devices.virtqueue.VirtQueue`, lets the C code
walk the ring, move the frames between guest buffers and the tap, fill the used ring and
decide the interrupt, and copies the advanced indexes back: the model stays the one source
of truth, and the C code only ever does what the model would. Anything the C code does not
take as it is (a chain the model would refuse, a buffer across two maps, a frame to filter
or to finish, a tap that would block) it leaves untouched for the model, which goes on
from the same state (tests/server/test_netpath.py compares the two).

:class:`NetRun` is the serving thread's whole data run over a NetPath, and the same run
in C (netpath.c vfuserver_net_run) over state the model hands over while the driver runs.

Counters: :attr:`NetPath.counters` (frames each way through C, the runs and frames it left
to the model, the runs done wholly in C), shown as ``net_path`` in the device's stats.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any

from vfuserver.binding import ffi, lib
from vfuserver.context import DATA_AGAIN, DATA_ARMED, DATA_TIMER
from vfuserver.devices.errors import GuestError
from vfuserver.devices.ring_journal import PUBLISHED_WORD
from vfuserver.devices.virtio_net import RX_QUEUE, TX_QUEUE, VirtioNet
from vfuserver.devices.virtqueue import VirtQueue
from vfuserver.netdev.backend import NET_BUFSIZE, RX_BATCH, Deliver, NetBackend
from vfuserver.netdev.tap import TapBackend
from vfuserver.protocol import virtio_net as net
from vfuserver.protocol.virtio_net import NetFeature
from vfuserver.protocol.virtio_pci import MSI_NO_VECTOR as NO_VECTOR

RX_CHAINS = 64
"""Receive chains one frame may take in C (mergeable buffers); more: the model's."""

RxResume = tuple[int, int, int, int]
"""Where a receive stopped: (frames left of the batch, VFUSERVER_NET_* status, length of
the frame read for the model, errno)."""

_GUEST_CSUM = NetFeature.GUEST_CSUM.mask


@dataclasses.dataclass
class NetPathCounters:
    """What went through C and what it left to the model, over every session of a device
    (``net_path`` in its stats)."""

    tx_frames: int = 0
    """Frames sent by the C path."""
    rx_frames: int = 0
    """Frames received by the C path."""
    tx_left: int = 0
    """Transmit runs the C path left (partly) to the model."""
    rx_left: int = 0
    """Frames the C path read and handed to the model."""
    runs: int = 0
    """Data-path runs done wholly in C (:class:`NetRun`), without entering Python."""
    runs_left: int = 0
    """Runs C began and handed to the model, at their start or part way."""


class NetPath:
    """The C data path of ``net`` over ``tap``: :meth:`transmit` is the model's
    :class:`~vfuserver.devices.virtio_net.TxEngine`, :meth:`receive` takes the place of
    the backend's ``receive_now``. ``lost``: the device's SIGBUS guard count
    (``vfuserver_lost_pages_t *``) or None."""

    def __init__(self, net: VirtioNet, tap: TapBackend, lost: Any = None,
                 counters: NetPathCounters | None = None) -> None:
        self.net = net
        self.tap = tap
        self.counters = counters if counters is not None else NetPathCounters()
        self._memory = ffi.new("struct vfuserver_memory *")
        # the SIGBUS guard's count where the server has one (a LostPages of a test's
        # bytearray RAM counts nothing C needs to see)
        self._memory.lost = lost if isinstance(lost, ffi.CData) else ffi.NULL
        self._generation = -1
        self._maps_ok = False
        self._journals: dict[int, tuple[int, int]] = {}
        self._vq = ffi.new("struct vfuserver_vq *")
        self._res = ffi.new("struct vfuserver_net_result *")
        self._tx = ffi.new("struct vfuserver_net_tx *")
        self._tx.fd = tap.fd
        self._tx.peer_vnet_hdr = tap.vnet_hdr
        self._tx.link_up = 1
        self._buffer = bytearray(NET_BUFSIZE)
        self._rx_buffer = ffi.from_buffer(self._buffer)
        self._chains = ffi.new("struct vfuserver_chain[]", RX_CHAINS)
        self._rx = ffi.new("struct vfuserver_net_rx *")
        self._rx.fd = tap.fd
        self._rx.buf = self._rx_buffer
        self._rx.buf_size = NET_BUFSIZE
        self._rx.chains = self._chains
        self._rx.max_chains = RX_CHAINS
        self._rx.peer_vnet_hdr = tap.vnet_hdr

    def _maps(self) -> bool:
        """Publish the guest's DMA maps to C if they changed; False if C cannot take them
        (more than VFUSERVER_NET_MAPS)."""
        memory = self.net.memory
        if memory.generation == self._generation:
            return self._maps_ok
        maps = list(memory)
        self._generation = memory.generation
        self._maps_ok = len(maps) <= lib.VFUSERVER_NET_MAPS
        self._memory.nmaps = 0
        if not self._maps_ok:
            return False
        for slot, dma_map in zip(self._memory.maps, maps, strict=False):
            slot.iova = dma_map.iova
            slot.size = dma_map.size
            slot.writable = dma_map.writable
            slot.host = _address(dma_map.buffer)
        self._memory.nmaps = len(maps)
        return True

    def _export(self, queue: VirtQueue, vq: Any = None) -> None:
        """The queue's state into a C struct (``vq``, default the one the calls here
        use), with its ring journal's addresses."""
        vq = self._vq if vq is None else vq
        queue.export_state(vq)
        journal = queue.journal
        if journal is None:
            vq.journal_entries = ffi.NULL
            vq.journal_published = ffi.NULL
            return
        addresses = self._journals.get(id(journal))
        if addresses is None:
            addresses = self._journals[id(journal)] = (
                _address(journal.entries),
                _address(journal.header_words) + 4 * PUBLISHED_WORD)
        vq.journal_entries = ffi.cast("uint64_t *", addresses[0])
        vq.journal_published = ffi.cast("uint32_t *", addresses[1])

    # -- transmit (the model's TxEngine) ------------------------------------------------

    def transmit(self, queue: VirtQueue, limit: int, publish: bool) -> tuple[int, bool, bool]:
        """:class:`~vfuserver.devices.virtio_net.TxEngine`: up to ``limit`` chains
        through C while the tap's own queue is empty (frames stay in order)."""
        if not self.tap.writable_now() or not self._maps():
            return 0, False, False
        vq, res = self._vq, self._res
        self._tx.hdr_len = self.net.header_len
        self._tx.publish = publish
        self._export(queue)
        status = lib.vfuserver_net_tx(self._memory, vq, self._tx, limit, res)
        queue.import_state(vq)
        if res.done:
            stats = self.net.stats
            stats.tx_packets += res.packets
            stats.tx_bytes += res.bytes
            stats.tx_dropped += res.dropped
            self.tap.count_sent(res.peer_frames, res.peer_bytes)
            self.counters.tx_frames += res.packets
        finished = status == lib.VFUSERVER_NET_DONE
        if not finished:
            self.counters.tx_left += 1
        return res.done, finished, bool(res.interrupt)

    # -- receive --------------------------------------------------------------------------

    def _rx_ready(self) -> bool:
        """Whether C may place frames now: what VirtioNet.receive checks first."""
        net_ = self.net
        queue = net_.queues[RX_QUEUE]
        if not (net_.driver_ok and net_.link_up and queue.idle()) or net_.broken:
            return False
        if not self._maps():
            return False
        rx, rx_filter = self._rx, net_.rx_filter
        rx.hdr_len = net_.header_len
        rx.mergeable = net_.mergeable_rx
        rx.guest_csum = bool(net_.guest_offloads & _GUEST_CSUM)
        rx.promisc = rx_filter.promisc
        rx.vlan_filter = rx_filter.vlans is not None
        rx.nouni = rx_filter.nouni
        rx.nobcast = rx_filter.nobcast
        rx.mac = net_.mac
        rx.max_frame = (net_.mtu + net.ETH_HLEN + net.VLAN_HLEN
                        if net_.has_feature(NetFeature.MTU) else 0)
        rx.gso_types, rx.gso_ecn = net_.guest_gso_types
        return True

    def receive(self, deliver: Deliver, resume: RxResume | None = None) -> bool:
        """The backend's ``receive_now`` through C: up to RX_BATCH frames from the tap
        into the receive queue. Frames C leaves go to ``deliver`` (the model's path).
        Returns False if the guest had no room for a frame (held by the backend until it
        posts buffers), True otherwise. OSError: the tap failed. ``resume``: where a
        receive the native run began (NetRun) stopped, to go on from."""
        tap = self.tap
        if resume is None and (tap.holds_frame() or not self._rx_ready()):
            return tap.receive_now(deliver)
        net_ = self.net
        queue = net_.queues[RX_QUEUE]
        vq, res, rx = self._vq, self._res, self._rx
        stats, peer = net_.stats, tap.stats
        if resume is not None:
            left, status, frame_len, error = resume
        else:
            left, status, frame_len, error = RX_BATCH, None, 0, 0
        while left > 0:
            if status is None:
                self._export(queue)
                status = lib.vfuserver_net_rx(self._memory, vq, rx, left, res)
                queue.import_state(vq)
                if res.done or res.peer_dropped:
                    stats.rx_packets += res.packets
                    stats.rx_bytes += res.bytes
                    peer.rx_frames += res.peer_frames
                    peer.rx_bytes += res.peer_bytes
                    peer.rx_dropped += res.peer_dropped
                    self.counters.rx_frames += res.packets
                    left -= res.done + res.peer_dropped
                if res.gso:
                    net_.rx_busy = True
                if res.interrupt:
                    net_.queue_interrupt(queue)
                frame_len, error = res.frame_len, res.error
            if status == lib.VFUSERVER_NET_DONE:
                return True
            if status == lib.VFUSERVER_NET_ERROR:
                raise OSError(error, os.strerror(error))
            if status == lib.VFUSERVER_NET_STOPPED:
                # pages were lost under the maps: the model's flush says so
                try:
                    if queue.flush():
                        net_.queue_interrupt(queue)
                except GuestError as err:
                    net_.needs_reset(str(err))
                return tap.receive_now(deliver)
            # VFUSERVER_NET_FRAME: the model decides this one
            self.counters.rx_left += 1
            frame = bytes(self._buffer[:frame_len])
            if not tap.deliver_read(deliver, frame):
                return False
            left -= 1
            status = None
            if not self._rx_ready():
                return tap.receive_now(deliver) if left > 0 else True
        return True


class NetRun:
    """The serving thread's data-path run of one virtio-net device while a client is
    attached (ServedNetDevice's :class:`~vfuserver.context.DataPath`), and the same run
    in C.

    :meth:`run` is the run in Python, after the context ran the kicks through the model:
    the transmit bottom half (``tx_due``: scheduled by a kick; ``tx_lingering``: the last
    run sent frames and left notifications off) and the frames from the backend.

    With a :class:`NetPath` the serving thread runs it in C first (netpath.c
    vfuserver_net_run, from serve.c, without the GIL), over state the model hands over:
    :meth:`hand_over` copies both queues' state and the two flags into ``native`` when
    the device lock is released and the device is in a state C covers, and
    :meth:`take_back` copies them back into the model when the lock is taken next
    (vfuserver.context.DeviceLock), so the model is the one source of truth whenever
    Python looks. A run C cannot finish as the model would, it hands over at that point
    and :meth:`run` goes on from there. ``deliver``: the model's receive of one frame.
    """

    def __init__(self, net: VirtioNet, backend: NetBackend, deliver: Deliver,
                 log: logging.Logger, path: NetPath | None, rx_owned: bool) -> None:
        self.net = net
        self.backend = backend
        self.deliver = deliver
        self.log = log
        self.path = path
        self.rx_owned = rx_owned
        """The serving thread reads the backend (False: not, or no longer after an
        error)."""
        self.tx_due = False
        self.tx_lingering = False
        self.native: Any = None
        """``struct vfuserver_net_run *`` for serve.c, or None (no C path)."""
        self._handed = False
        self._resume: tuple[bool, tuple[int, int] | None, RxResume | None] | None = None
        if path is not None:
            run = self.native = ffi.new("struct vfuserver_net_run *")
            run.memory = path._memory
            run.tx = path._tx
            run.rx = path._rx
            run.rx_batch = RX_BATCH

    def run(self) -> int:
        """The run in Python (or the rest of one C began): DATA_* flags."""
        resume, self._resume = self._resume, None
        tx_ran, tx_resume, rx_resume = resume if resume is not None else (False, None, None)
        flags = 0
        if not tx_ran and (self.tx_due or self.tx_lingering or tx_resume is not None):
            self.tx_due = False
            # a burst cut at tx_burst sets tx_due again; one that sent frames lingers
            self.tx_lingering = self.net.run_tx(linger=True, resume=tx_resume)
        if self.rx_owned:
            try:
                armed = (self.path.receive(self.deliver, rx_resume) if self.path is not None
                         else self.backend.receive_now(self.deliver))
                if armed:
                    flags |= DATA_ARMED
            except OSError as exc:
                # once: the backend's own task meets the error again when it takes the
                # receive side back (the client detaches) and stops the device, as it
                # does when no client is attached
                self.rx_owned = False
                self.log.error("receiving from the backend failed: %s; nothing is "
                               "received until the client detaches", exc)
        return (flags | (DATA_AGAIN if self.tx_due else 0)
                | (DATA_TIMER if self.tx_lingering else 0))

    def finish(self) -> None:
        """The rest of a run C handed over, if the serving thread stopped before it ran
        (under the device lock, as the client detaches): a frame C read for the model
        still reaches it."""
        if self._resume is not None:
            self.run()

    def hand_over(self) -> bool:
        """Let C run the next runs (the device lock is held, about to be released), if
        the device is in a state it covers: the driver running, the link up, no chain in
        flight, no run half done, the tap's queue empty and no frame held for the guest.
        True if it did."""
        run, path = self.native, self.path
        if self._handed or run is None or path is None or self._resume is not None:
            return self._handed
        net = self.net
        tx_queue = net.queues[TX_QUEUE]
        route = getattr(net.interrupts, "interrupt_route", None)
        if not (route is not None and self.rx_owned and net.on_tx_pending is not None
                and tx_queue.idle() and path.tap.writable_now()
                and not path.tap.holds_frame() and path._rx_ready()):
            return False  # (no route: C could not raise the interrupts the model would)
        path._export(net.queues[RX_QUEUE], ffi.addressof(run, "rxq"))
        path._export(tx_queue, ffi.addressof(run, "txq"))
        path._tx.hdr_len = net.header_len
        run.tx_due = self.tx_due
        run.tx_lingering = self.tx_lingering
        run.rx_busy = net.rx_busy
        run.tx_burst = net.tx_burst
        for index in (RX_QUEUE, TX_QUEUE):
            vector, intx = route(net.queues[index])
            run.msix, run.intx = vector is not None, intx
            run.vector[index] = NO_VECTOR if vector is None else vector
        lib.vfuserver_net_run_give(run)
        self._handed = True
        return True

    def take_back(self) -> None:
        """The model takes the state C held back (under the device lock; waits for a run
        in progress): the queues, the two flags, the counters, and where a run C handed
        over stopped."""
        run = self.native
        if not self._handed or run is None or self.path is None:
            return
        self._handed = False
        lib.vfuserver_net_run_claim(run)
        net, path = self.net, self.path
        net.queues[RX_QUEUE].import_state(run.rxq)
        net.queues[TX_QUEUE].import_state(run.txq)
        self.tx_due = bool(run.tx_due)
        self.tx_lingering = bool(run.tx_lingering)
        net.rx_busy = bool(run.rx_busy)
        stats, peer, counters = net.stats, path.tap.stats, path.counters
        stats.tx_packets += run.tx_packets
        stats.tx_bytes += run.tx_bytes
        stats.tx_dropped += run.tx_dropped
        stats.rx_packets += run.rx_packets
        stats.rx_bytes += run.rx_bytes
        if run.peer_tx_frames:
            path.tap.count_sent(run.peer_tx_frames, run.peer_tx_bytes)
        peer.rx_frames += run.peer_rx_frames
        peer.rx_bytes += run.peer_rx_bytes
        peer.rx_dropped += run.peer_rx_dropped
        counters.tx_frames += run.tx_packets
        counters.rx_frames += run.rx_packets
        counters.runs += run.runs
        counters.runs_left += run.runs_left
        for name in ("tx_packets", "tx_bytes", "tx_dropped", "rx_packets", "rx_bytes",
                     "peer_tx_frames", "peer_tx_bytes", "peer_rx_frames", "peer_rx_bytes",
                     "peer_rx_dropped", "runs", "runs_left"):
            setattr(run, name, 0)
        if run.unfinished:
            run.unfinished = 0
            self._resume = (
                bool(run.tx_ran),
                (run.resume_tx_budget, run.resume_tx_done)
                if not run.tx_ran and run.resume_tx_budget >= 0 else None,
                (run.resume_rx_left, run.rx_status, run.rx_frame_len, run.rx_error)
                if run.resume_rx_left >= 0 else None)
            if self._resume == (False, None, None):
                self._resume = None  # handed over at its start: a whole run


def _address(buffer: memoryview) -> int:
    """The address of ``buffer``'s first byte (the memory stays its owner's: a DMA map's
    or a journal's mmap, which outlives the C path's use of it)."""
    pointer = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


def net_path_for(net: VirtioNet, backend: object, lost: Any,
                 counters: NetPathCounters) -> NetPath | None:
    """A :class:`NetPath` for a tap backend; None for other backends (sockets), whose
    frames stay on the model's path."""
    if isinstance(backend, TapBackend) and sys.byteorder == "little":
        return NetPath(net, backend, lost, counters)
    return None  # (a big-endian host: netpath.c stores the rings' little-endian fields as is)


