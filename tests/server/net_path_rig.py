"""A virtio-net model on a real TapBackend whose fd is one end of a datagram socket pair
(one frame per read and write, as a tap's), for comparing the C data path
(vfuserver/netpath.py) with the model alone: tests/server/test_netpath.py and the
``net-path`` fuzz target (tests/fuzz/net_path.py)."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict
from typing import Any

from tests.devices.driver import GuestRam, RecordingInterrupts
from vfuserver.binding import ffi, lib
from vfuserver.devices.virtio_net import RX_QUEUE, TX_QUEUE, VirtioNet
from vfuserver.netdev.backend import VNET_HDR_LEN
from vfuserver.netdev.tap import TapBackend
from vfuserver.netpath import NetPath, NetRun


def socket_tap(vnet_hdr: bool) -> tuple[TapBackend, socket.socket]:
    """A TapBackend over a socket pair, receiving as its own receive task would, and the
    host's end (frames the device writes arrive there; frames sent there are read)."""
    device_end, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device_end.setblocking(False)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    fd = device_end.detach()
    tap = TapBackend(fd, "test", vnet_hdr)
    # what QueuedBackend._receive_datagrams sets while the backend's receive task runs
    tap._rx_fd = fd
    tap._rx_read = lambda buffer: os.readv(fd, [buffer])
    return tap, host


def host_frames(host: socket.socket) -> list[bytes]:
    """Everything written to the tap since the last call."""
    frames = []
    while True:
        try:
            frames.append(host.recv(1 << 17, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return frames


def host_sends(tap: TapBackend, host: socket.socket, frame: bytes,
               vnet: bytes | None = None) -> None:
    """The host sends ``frame`` into the tap (with ``vnet``, or a zero vnet header, if the
    tap has IFF_VNET_HDR)."""
    if tap.vnet_hdr:
        frame = (bytes(VNET_HDR_LEN) if vnet is None else vnet) + frame
    host.send(frame)


def deliver_to(dev: VirtioNet, tap: TapBackend) -> Any:
    """ServedNetDevice._deliver: a frame read from the tap into the model."""
    def deliver(data: bytes) -> bool:
        if tap.vnet_hdr:
            return dev.receive(memoryview(data)[VNET_HDR_LEN:], data[:VNET_HDR_LEN])
        return dev.receive(data)
    return deliver


def receive_now(dev: VirtioNet, tap: TapBackend, path: NetPath | None) -> bool:
    """What ServedNetDevice.run_data_path does for receiving: the C path if there is one."""
    deliver = deliver_to(dev, tap)
    return path.receive(deliver) if path is not None else tap.receive_now(deliver)


def guard_count(ram: GuestRam) -> Any:
    """Give ``ram`` a lost-pages count as the server's SIGBUS guard keeps it (a
    ``vfuserver_lost_pages_t *``), for a test to bump as the guard would."""
    ram.memory.lost = ffi.new("vfuserver_lost_pages_t *")
    return ram.memory.lost


def attach(dev: VirtioNet, tap: TapBackend) -> NetPath:
    """The C data path on ``dev``, as ServedNetDevice.attach_data_path sets it."""
    path = NetPath(dev, tap, dev.memory.lost)
    dev.tx_engine = path.transmit
    return path


def snapshot(ram: GuestRam, dev: VirtioNet, tap: TapBackend) -> dict[str, object]:
    """What must be the same after the same driver actions on either path (``dev``'s
    interrupts a RecordingInterrupts)."""
    irqs = dev.interrupts
    assert isinstance(irqs, RecordingInterrupts)
    return {
        "ram": bytes(ram.backing),
        "queues": [(q.last_avail_idx, q.used_idx, q.notification_enabled, q.unpublished,
                    q._signalled_used, q._signalled_used_valid) for q in dev.queues],
        "stats": asdict(dev.stats),
        "peer": asdict(tap.stats),
        "held": tap.holds_frame(),
        # which queues were interrupted: C raises one per batch where the model raises
        # one per publish that asks for it (the server coalesces those anyway)
        "irqs": sorted(set(irqs.queue)),
        "status": dev.status,
        "broken": dev.broken,
        "rx_busy": dev.rx_busy,
    }


def data_run(run: NetRun, dev: VirtioNet, pending: Any, *, native: bool) -> int:
    """serve.c vfuserver_run_data with ``run`` (``pending``: the ``uint64_t *`` of kicked
    queues the fast path records): with ``native``, C first, its interrupts raised through
    ``dev``'s; then, or for the rest of the run, what VfuContext._on_data does under the
    device lock (NetRun.take_back on taking it, the kicks through the model, NetRun.run,
    NetRun.hand_over on releasing it). Returns the run's flags."""
    flags = lib.VFUSERVER_RUN_PYTHON
    if native:
        flags = lib.vfuserver_net_run(run.native, pending)
        for index in (RX_QUEUE, TX_QUEUE):
            if run.native.irq_queues >> index & 1:
                dev.interrupts.queue_interrupt(dev.queues[index])
    if flags == lib.VFUSERVER_RUN_PYTHON:
        run.take_back()
        kicks, pending[0] = pending[0], 0
        for index in range(64):
            if kicks >> index & 1:
                dev.notify(index)
        flags = run.run()
        if native:
            run.hand_over()
    return int(flags)
