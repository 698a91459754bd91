"""What every network backend is: the :class:`NetBackend` interface, its counters, the
``none`` backend and :class:`QueuedBackend`, the part the fd-based backends share.

The device model calls :meth:`~NetBackend.send` synchronously, so sending never blocks (a
bounded queue, then drop and count), and one trio task runs :meth:`~NetBackend.run` to
pump received frames into the guest. :meth:`~NetBackend.send` may be called from any
thread; so may :meth:`~NetBackend.receive_now`, by the one owner of the receive side
(:meth:`~NetBackend.take_receiver`: the device's serving thread while a client is
attached). Every other method is for the trio thread that runs :meth:`~NetBackend.run`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import NoReturn, Protocol

import trio

from vfuserver.loopthread import LoopThread
from vfuserver.protocol.virtio_net import NetFeature

log = logging.getLogger("vfuserver.netdev")

VNET_HDR_LEN = 12
"""struct virtio_net_hdr_v1 (virtio 1.x 5.1.6), num_buffers included."""
NET_BUFSIZE = 4096 + 65536
"""The largest frame a backend takes, as QEMU's NET_BUFSIZE (include/net/net.h)."""
TX_QUEUE_LIMIT = 256
"""Frames queued towards the host while it cannot take them; more are dropped and counted."""
RX_BATCH = 64
"""Frames read back to back before the receive task lets other tasks run."""
TX_RETRY_DELAY = 0.001
"""Pause after a "writable" wake-up that still could not write (see _flush_loop)."""


@dataclass
class NetStats:
    """Frame counters; bytes count Ethernet frames, without any virtio-net header."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0


Deliver = Callable[[bytes], bool]


@dataclass(frozen=True)
class NetOffloads:
    """Offloads the guest can receive, as QEMU's NetOffloads (include/net/net.h): a backend
    may hand the guest frames with a partial checksum (``csum``) or segmentation work left
    to do (``tso4``, ``tso6``, ``ecn``, ``ufo``, ``uso4``, ``uso6``) only while they are on."""

    csum: bool = False
    tso4: bool = False
    tso6: bool = False
    ecn: bool = False
    ufo: bool = False
    uso4: bool = False
    uso6: bool = False

    @classmethod
    def from_guest_offloads(cls, offloads: int) -> NetOffloads:
        """From virtio-net GUEST_* feature bits (the negotiated ones, or those set with
        VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET): QEMU's virtio_net_apply_guest_offloads()."""
        return cls(*(bool(offloads & feature.mask) for feature in (
            NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
            NetFeature.GUEST_ECN, NetFeature.GUEST_UFO, NetFeature.GUEST_USO4,
            NetFeature.GUEST_USO6)))


class NetBackend(Protocol):
    vnet_hdr: bool
    """Frames carry a 12-byte virtio_net_hdr_v1 in front, both ways (received ones with
    num_buffers = 1; the device model rewrites it when a frame spans several buffers)."""
    stats: NetStats

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        """Write ``frame`` now, or queue it (bounded), or drop and count it; never blocks."""

    async def run(self, deliver: Deliver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump received frames into ``deliver`` and flush queued ones, until cancelled.

        ``deliver(frame)`` returns False when the guest has no receive buffers: the frame
        is kept (not dropped) and nothing more is read until :meth:`wake_receiver`.
        """

    def wake_receiver(self) -> None:
        """The guest posted receive buffers: retry the frame deliver() refused."""

    def take_receiver(self) -> int | None:
        """Hand the receive side to the caller until :meth:`return_receiver`: the fd to
        poll for input, which :meth:`receive_now` then reads (the run() task reads nothing
        meanwhile); None if this backend cannot be received from that way."""

    def receive_now(self, deliver: Deliver) -> bool:
        """Deliver the frame held back (if any), then the frames queued, up to
        ``RX_BATCH``, without blocking. False: a frame waits for receive buffers (call
        again once the guest has posted some). OSError if the host side failed."""

    def return_receiver(self) -> None:
        """The run() task receives again (what the caller held back is kept)."""

    def set_offload(self, offloads: NetOffloads) -> None:
        """The guest now takes ``offloads`` (QEMU's qemu_set_offload()); a backend that
        never hands over offloaded frames ignores it. Never raises: a host that refuses
        is logged, and the device model undoes what the guest cannot take."""

    def close(self) -> None:
        """Release the fds (waking trio tasks waiting on them); idempotent."""


def close_waking(sock_or_fd: socket.socket | int) -> None:
    """Close after waking any trio task waiting on it (they get ClosedResourceError)."""
    if isinstance(sock_or_fd, socket.socket) and sock_or_fd.fileno() == -1:
        return  # already closed
    with suppress(RuntimeError):  # outside trio.run nobody can be waiting
        trio.lowlevel.notify_closing(sock_or_fd)
    if isinstance(sock_or_fd, socket.socket):
        sock_or_fd.close()
    else:
        os.close(sock_or_fd)


class NoneBackend:
    """``none``: what the guest sends is dropped and counted; nothing is ever received."""

    vnet_hdr = False

    def __init__(self) -> None:
        self.stats = NetStats()

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        self.stats.tx_dropped += 1

    async def run(self, deliver: Deliver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def wake_receiver(self) -> None:
        pass

    def take_receiver(self) -> int | None:
        return None

    def receive_now(self, deliver: Deliver) -> bool:
        return True

    def return_receiver(self) -> None:
        pass

    def set_offload(self, offloads: NetOffloads) -> None:
        pass

    def close(self) -> None:
        pass


class QueuedBackend:
    """What the fd-based backends share: the bounded transmit queue and guest backpressure."""

    vnet_hdr = False

    def __init__(self, *, tx_queue_limit: int = TX_QUEUE_LIMIT) -> None:
        self.stats = NetStats()
        self._tx_queue: deque[tuple[bytes, int]] = deque()  # (bytes for the host, frame length)
        self._tx_sent = 0  # bytes of the head already written (stream sockets write partially)
        self._tx_limit = tx_queue_limit
        # send() and the flush task may be on two threads; re-entrant: a failed write's
        # _write_failed() may drop the queue (_drop_tx_queue) under it
        self._tx_lock = threading.RLock()
        self._tx_lot = trio.lowlevel.ParkingLot()
        self._loop = LoopThread()  # where send() from another thread hands trio calls
        self._rx_lot = trio.lowlevel.ParkingLot()
        self._rx_woken = False
        self._rx_fd: int | None = None  # set while _receive_datagrams runs
        self._rx_read: Callable[[bytearray], int] | None = None
        self._rx_buffer = bytearray(NET_BUFSIZE)
        self._rx_external = False  # take_receiver(): another thread receives
        self._held: bytes | None = None  # a frame the guest had no buffers for
        self._closed = False

    # What a backend defines.
    def _connected(self) -> bool:
        return not self._closed

    def _encode(self, frame: bytes | bytearray | memoryview) -> bytes:
        return bytes(frame)

    def _write(self, data: memoryview) -> int:
        raise NotImplementedError

    def _write_failed(self, exc: OSError) -> None:
        log.debug("%s: frame dropped: %s", type(self).__name__, exc)

    # The shared part.
    def send(self, frame: bytes | bytearray | memoryview) -> None:
        length = len(frame) - (VNET_HDR_LEN if self.vnet_hdr else 0)
        if length <= 0:
            with self._tx_lock:
                self.stats.tx_dropped += 1
            return
        data = self._encode(frame)
        with self._tx_lock:
            if not self._connected() or len(self._tx_queue) >= self._tx_limit:
                self.stats.tx_dropped += 1
                return
            self._tx_queue.append((data, length))
            if len(self._tx_queue) == 1:
                self._flush()
            waiting = bool(self._tx_queue)
        if waiting:
            self._loop.call(self._tx_lot.unpark_all)

    def take_receiver(self) -> int | None:
        # called on the event loop: from now on send() may come from another thread
        self._loop.capture()
        if self._rx_fd is None or self._closed:
            return None
        self._rx_external = True
        return self._rx_fd

    def return_receiver(self) -> None:
        if self._rx_external:
            self._rx_external = False
            self._rx_lot.unpark_all()

    def receive_now(self, deliver: Deliver) -> bool:
        frame, self._held = self._held, None
        for _ in range(RX_BATCH):
            if frame is None:
                frame = self._read_frame()
                if frame is None:
                    return True
            if not frame:
                frame = None  # dropped (counted); still part of the batch
                continue
            if not self.deliver_read(deliver, frame):
                return False
            frame = None
        return True

    def deliver_read(self, deliver: Deliver, frame: bytes) -> bool:
        """Hand one frame read from the host (vnet header included) to ``deliver`` and
        count it; False: the guest had no room, and the frame is held for the next
        ``receive_now``."""
        if not deliver(frame):
            self._held = frame
            return False
        self.stats.rx_frames += 1
        self.stats.rx_bytes += len(frame) - (VNET_HDR_LEN if self.vnet_hdr else 0)
        return True

    def holds_frame(self) -> bool:
        """A frame the guest had no room for waits (``receive_now`` delivers it first)."""
        return self._held is not None

    def count_sent(self, frames: int, nbytes: int) -> None:
        """Count frames written to the host outside :meth:`send` (the C data path), under
        the lock the flush task counts its own under."""
        with self._tx_lock:
            self.stats.tx_frames += frames
            self.stats.tx_bytes += nbytes

    def writable_now(self) -> bool:
        """Connected, with nothing queued: a frame written to the host now goes out in
        order (what :meth:`send` would write at once)."""
        return not self._tx_queue and self._connected()

    def _read_frame(self) -> bytes | None:
        """One frame read without blocking: None if nothing is queued, b"" if the one
        read was dropped (counted)."""
        assert self._rx_read is not None
        try:
            size = self._rx_read(self._rx_buffer)
        except BlockingIOError:
            return None
        minimum = VNET_HDR_LEN if self.vnet_hdr else 0
        if not minimum < size <= NET_BUFSIZE:
            self.stats.rx_dropped += 1
            return b""
        frame = bytearray(self._rx_buffer[:size])
        if self.vnet_hdr:
            # tun_put_user() skips, without writing, the vnet header bytes past the
            # 10-byte virtio_net_hdr: num_buffers is 1 for a frame in one buffer.
            frame[10:12] = b"\x01\x00"
        return bytes(frame)

    def wake_receiver(self) -> None:
        self._rx_woken = True
        self._rx_lot.unpark_all()

    def set_offload(self, offloads: NetOffloads) -> None:
        """Sockets carry no virtio-net header, so no offloaded frame (QEMU's stream and
        dgram netdevs have no set_offload either)."""

    def _flush(self) -> bool:
        """Write queued frames until the host would block; True if anything was written.
        The caller holds ``_tx_lock``."""
        progress = False
        while self._tx_queue:
            data, length = self._tx_queue[0]
            try:
                written = self._write(memoryview(data)[self._tx_sent:])
            except BlockingIOError:
                break
            except OSError as exc:
                self._tx_queue.popleft()
                self._tx_sent = 0
                self.stats.tx_dropped += 1
                self._write_failed(exc)
                continue
            progress = True
            self._tx_sent += written
            if self._tx_sent == len(data):
                self._tx_queue.popleft()
                self._tx_sent = 0
                self.stats.tx_frames += 1
                self.stats.tx_bytes += length
        return progress

    def _drop_tx_queue(self) -> None:
        with self._tx_lock:
            self.stats.tx_dropped += len(self._tx_queue)
            self._tx_queue.clear()
            self._tx_sent = 0

    async def _flush_loop(self, target: socket.socket | int) -> NoReturn:
        while True:
            if not self._tx_queue:
                await self._tx_lot.park()
                continue
            await trio.lowlevel.wait_writable(target)
            with self._tx_lock:
                progress = self._flush()
            if not progress:
                # unix_dgram_poll() calls an unconnected datagram socket writable by its own
                # send buffer while sendto() fails with EAGAIN on the receiver's full queue.
                await trio.sleep(TX_RETRY_DELAY)

    async def _deliver(self, deliver: Deliver, frame: bytes) -> None:
        """Hand one frame to the guest; while it has no buffers, keep the frame and wait."""
        while True:
            self._rx_woken = False
            if deliver(frame):
                self.stats.rx_frames += 1
                self.stats.rx_bytes += len(frame) - (VNET_HDR_LEN if self.vnet_hdr else 0)
                return
            if not self._rx_woken:  # unless wake_receiver() ran inside deliver()
                await self._rx_lot.park()

    async def _receive_datagrams(self, fd: socket.socket | int, deliver: Deliver,
                                 read: Callable[[bytearray], int]) -> NoReturn:
        """Receive loop for backends where every read returns exactly one frame; it
        stands aside while another thread owns the receive side (take_receiver)."""
        self._rx_read = read
        self._rx_fd = fd if isinstance(fd, int) else fd.fileno()
        try:
            while True:
                if self._rx_external:
                    await self._rx_lot.park()  # return_receiver()
                    continue
                if self._held is None:
                    await trio.lowlevel.wait_readable(fd)
                    if self._rx_external:
                        continue
                self._rx_woken = False
                if not self.receive_now(deliver) and not self._rx_woken:
                    await self._rx_lot.park()  # wake_receiver(), unless it ran in deliver()
        finally:
            self._rx_fd = None
