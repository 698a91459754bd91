"""The whole data run of virtio-net in C (vfuserver/netpath.py NetRun, csrc/netpath.c
vfuserver_net_run) against the same run in Python.

Differential, as tests/server/test_netpath.py: two devices on real TapBackends over socket
pairs, the same driver actions. On one the serving thread's runs are NetRun.run alone
(after the kicks, as VfuContext._on_data does); on the other they go to C first, as
serve.c does, with the state NetRun.hand_over gave it, and what C hands back finishes in
Python. Whenever Python looks (any time the device lock is taken: NetRun.take_back), both
must have the same guest RAM, queue state, frames on the host side, counters, interrupts
and run flags. C must also have done whole runs itself (NetPathCounters.runs), so a C run
that handed everything to Python would fail too.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.devices.test_virtio_net import MAC, OTHER, frame
from tests.server.net_path_rig import data_run, deliver_to
from tests.server.test_netpath import (
    CONFIGS,
    Side,
    ctrl,
    fill_rx,
    header,
    host_sends,
    make_side,
    send,
)
from vfuserver.binding import ffi, lib
from vfuserver.devices.virtio_net import RX_QUEUE, TX_QUEUE
from vfuserver.netdev.backend import VNET_HDR_LEN
from vfuserver.netpath import NetRun
from vfuserver.protocol import virtio_net as net
from vfuserver.protocol.virtio_net import CtrlClass
from vfuserver.protocol.virtio_pci import MSI_NO_VECTOR as NO_VECTOR

RUN_PYTHON: int = lib.VFUSERVER_RUN_PYTHON


class RunSide:
    """A device whose data runs are NetRun's, in C first (``native``) or in Python."""

    def __init__(self, native: bool, **config: Any) -> None:
        self.side: Side = make_side(native=True, **config)  # the per-frame C path both use
        side = self.side
        assert side.path is not None
        self.native = native
        self.run = NetRun(side.dev, side.tap, deliver_to(side.dev, side.tap),
                          logging.getLogger("test"), side.path, rx_owned=True)
        side.dev.on_tx_pending = self._tx_pending
        side.dev.on_rx_buffers = lambda: None  # the run receives next
        self.pending = ffi.new("uint64_t *")
        self.flags: list[int] = []

    def _tx_pending(self) -> None:
        self.run.tx_due = True  # ServedNetDevice._on_tx_pending inside the data path

    def lock(self) -> None:
        """Taking the device lock (DeviceLock.__enter__)."""
        self.run.take_back()

    def unlock(self) -> None:
        """Releasing it (DeviceLock.__exit__)."""
        if self.native:
            self.run.hand_over()

    def kick(self, queue: int) -> None:
        """The fast path records a notify (serve.h fast_access)."""
        self.pending[0] |= 1 << queue

    def data_run(self) -> int:
        """serve.c vfuserver_run_data: C first, then (or for the rest) VfuContext._on_data."""
        flags = data_run(self.run, self.side.dev, self.pending, native=self.native)
        self.flags.append(flags)
        return flags

    def look(self, action: Callable[[Side], object] = lambda side: None) -> object:
        """Something done under the device lock (the driver's actions reach the model
        that way too: region accesses, control commands)."""
        self.lock()
        try:
            return action(self.side)
        finally:
            self.unlock()

    def state(self) -> dict[str, object]:
        self.lock()
        try:
            out = self.side.state()
            out["run"] = (self.run.tx_due, self.run.tx_lingering)
            out["flags"] = list(self.flags)
            return out
        finally:
            self.unlock()

    def close(self) -> None:
        self.lock()
        self.side.tap.close()
        self.side.host.close()


class RunPair:
    """Python runs (``ref``) and runs in C first (``c``), driven alike."""

    def __init__(self, **config: Any) -> None:
        self.ref = RunSide(False, **config)
        self.c = RunSide(True, **config)
        self.c.unlock()  # the set-up happened under the lock: C may take over now

    def both(self, action: Callable[[RunSide], object]) -> tuple[object, object]:
        return action(self.ref), action(self.c)

    def driver(self, action: Callable[..., object], *args: object) -> None:
        """A driver action on the rings (guest memory only: no lock)."""
        for run_side in (self.ref, self.c):
            action(run_side.side, *args)

    def check(self) -> None:
        assert self.c.side.host_frames() == self.ref.side.host_frames()
        ref, c = self.ref.state(), self.c.state()
        for key in ref:
            assert c[key] == ref[key], key

    def runs_in_c(self) -> tuple[int, int]:
        self.c.lock()
        counters = self.c.side.path.counters  # type: ignore[union-attr]
        self.c.unlock()
        return counters.runs, counters.runs_left

    def close(self) -> None:
        self.ref.close()
        self.c.close()


@pytest.fixture(params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest) -> Iterator[RunPair]:
    p = RunPair(**CONFIGS[request.param])
    yield p
    p.close()


def run_both(pair: RunPair, *kicks: int) -> None:
    for run_side in (pair.ref, pair.c):
        for queue in kicks:
            run_side.kick(queue)
        run_side.data_run()
    pair.check()


def test_ping_round_trips(pair: RunPair) -> None:
    """What `ping -A` does: a frame out with a kick, the answer back in the same run,
    the next frame found by the timer's run (notifications off while lingering)."""
    pair.driver(fill_rx, 8)
    run_both(pair, RX_QUEUE)
    for i in range(20):
        pair.driver(send, frame(OTHER, bytes([i]) * 64))
        pair.driver(host_sends, frame(MAC, bytes([i]) * 64))
        run_both(pair, TX_QUEUE) if i == 0 else run_both(pair)
        pair.driver(fill_rx, 1)
    run_both(pair)  # the timer's run finds nothing: completions published
    run_both(pair)
    runs, left = pair.runs_in_c()
    assert runs >= 20 and left == 0


def test_bursts_cut_and_lingering(pair: RunPair) -> None:
    """A burst longer than tx_burst: cut (DATA_AGAIN), half a ring of held completions,
    and frames arriving while the queue lingers."""
    pair.both(lambda s: s.look(lambda side: setattr(side.dev, "tx_burst", 5)))
    pair.driver(fill_rx, 20)
    for round_ in range(4):
        for i in range(12):
            pair.driver(send, frame(OTHER, bytes([round_, i]) * 40))
        run_both(pair, TX_QUEUE)
        for _ in range(4):
            pair.driver(host_sends, frame(MAC, b"ack" * 20))
            run_both(pair)
    for _ in range(3):
        run_both(pair)
    assert pair.runs_in_c()[0] >= 10


def test_completions_held_until_half_the_ring(pair: RunPair) -> None:
    """A driver that keeps transmitting while the queue lingers: completions wait until
    half the ring holds them, then the next run publishes them."""
    pair.driver(fill_rx, 30)
    for i in range(6):
        for j in range(8):
            pair.driver(send, frame(OTHER, bytes([i, j]) * 30))
        pair.driver(host_sends, frame(MAC, bytes([i]) * 60))
        run_both(pair, TX_QUEUE) if i == 0 else run_both(pair)
    run_both(pair)
    assert pair.runs_in_c() == (7, 0)


def test_fallbacks_part_way(pair: RunPair) -> None:
    """Runs C hands to Python at their start (a control queue kick) or part way (a
    checksum to finish for a plain tap, a filtered frame, a frame without buffers, a
    GSO frame the guest cannot take): Python goes on from there and the runs come out the same."""
    udp = bytes(20) + bytes.fromhex("04d2162e0010") + b"\0\0" + b"12345678"
    pair.driver(fill_rx, 2)
    pair.driver(send, frame(OTHER, b"first"))
    pair.driver(lambda side: send(side, frame(OTHER, udp),
                                  hdr=header(side, flags=1, csum_start=34, csum_offset=6)))
    pair.driver(send, frame(OTHER, b"after"))
    pair.driver(host_sends, frame(OTHER, b"not for us"))
    pair.driver(host_sends, frame(MAC, b"for us"))
    gso = net.HDR_STRUCT.pack(1, 2, 54, 1400, 34, 16, 0)  # a GSO type no guest takes
    pair.driver(host_sends, frame(MAC, b"x" * 3000), gso)
    for _ in range(4):
        pair.driver(host_sends, frame(MAC, b"y" * 100))
    run_both(pair, TX_QUEUE, RX_QUEUE)
    pair.both(lambda s: s.look(lambda side: ctrl(side, CtrlClass.RX, net.CtrlRx.PROMISC,
                                                 b"\0")))
    pair.driver(fill_rx, 8)
    run_both(pair, RX_QUEUE, 2)
    pair.driver(send, frame(OTHER, b"late"))
    run_both(pair, TX_QUEUE)
    for _ in range(3):
        run_both(pair)


def test_transmit_handed_over_mid_burst(pair: RunPair) -> None:
    """C stops in the middle of a burst (a checksum to finish for a plain tap): Python
    goes on with what is left of the run's budget, so the burst is cut where it would
    have been."""
    udp = bytes(20) + bytes.fromhex("04d2162e0010") + b"\0\0" + b"12345678"
    pair.both(lambda s: s.look(lambda side: setattr(side.dev, "tx_burst", 4)))
    for i in range(2):
        pair.driver(send, frame(OTHER, bytes([i]) * 50))
    pair.driver(lambda side: send(side, frame(OTHER, udp),
                                  hdr=header(side, flags=1, csum_start=34, csum_offset=6)))
    for i in range(5):
        pair.driver(send, frame(OTHER, bytes([10 + i]) * 50))
    for _ in range(4):
        run_both(pair, TX_QUEUE)


@pytest.fixture(params=sorted(k for k, config in CONFIGS.items() if config["vnet_hdr"]))
def vnet_pair(request: pytest.FixtureRequest) -> Iterator[RunPair]:
    """A pair whose taps have a vnet header (GSO frames come with one)."""
    p = RunPair(**CONFIGS[request.param])
    yield p
    p.close()


def test_receive_handed_over_mid_batch(vnet_pair: RunPair) -> None:
    """C stops in the middle of a receive batch (a GSO frame the model drops) after
    frames that count against it (empty ones the backend drops): Python receives only
    what is left of the batch."""
    pair = vnet_pair
    pair.driver(fill_rx, 30)
    for _ in range(55):
        pair.driver(lambda side: side.host.send(bytes(VNET_HDR_LEN)))  # no frame
    gso = net.HDR_STRUCT.pack(1, 2, 54, 1400, 34, 16, 0)  # a GSO type no guest takes
    pair.driver(host_sends, frame(MAC, b"x" * 3000), gso)
    for i in range(20):
        pair.driver(host_sends, frame(MAC, bytes([i]) * 80))
    run_both(pair, RX_QUEUE)
    run_both(pair)


def test_a_received_stream_keeps_transmit_notifications_off(vnet_pair: RunPair) -> None:
    """A TCP stream into the guest (GSO frames, as the host's stack sends through a tap
    with offloads) with the guest's acknowledgements going out between its frames: the
    run after a GSO frame that finds nothing to send leaves notifications off once more
    (VirtioNet.rx_busy), on either engine, and C takes the GSO frames itself where the
    guest's offloads take them."""
    pair = vnet_pair
    pair.driver(fill_rx, 2, 7000)
    run_both(pair, RX_QUEUE)
    takes = pair.c.side.dev.guest_gso_types[0] >> net.GsoType.TCPV4 & 1
    gso = net.HDR_STRUCT.pack(1, net.GsoType.TCPV4, 54, 1448, 34, 16, 0)
    for i in range(6):
        pair.driver(host_sends, frame(MAC, bytes([i]) * 6000), gso)
        run_both(pair)                          # the frame in
        pair.driver(send, frame(OTHER, bytes([i]) * 54))
        run_both(pair, TX_QUEUE)                # an acknowledgement out
        run_both(pair)                          # found nothing: off once more, if busy
        off = not pair.c.look(lambda side: side.dev.queues[TX_QUEUE].notification_enabled)
        assert off is bool(takes)
        run_both(pair)                          # found nothing again: kicks wanted
        assert pair.c.look(lambda side: side.dev.queues[TX_QUEUE].notification_enabled)
        pair.driver(lambda side: (side.rx.get_used(), side.tx.get_used()))
        pair.driver(fill_rx, 1, 7000)
    runs, left = pair.runs_in_c()
    assert (runs >= 24 and left == 0) if takes else runs >= 6


def test_a_stream_with_a_frame_for_the_model_between(vnet_pair: RunPair) -> None:
    """One batch from the tap, in the run that sent the guest's frame: a GSO frame C
    places, one it hands to the model (a GSO type no guest takes), another GSO frame the
    model places as it goes on; the next run finds nothing to send and lingers once more,
    and the acknowledgement the guest queues then is found without a kick."""
    pair = vnet_pair
    pair.driver(fill_rx, 3, 7000)
    run_both(pair, RX_QUEUE)
    pair.driver(send, frame(OTHER, b"first"))
    for gso_type in (net.GsoType.TCPV4, 2, net.GsoType.TCPV4):
        gso = net.HDR_STRUCT.pack(1, gso_type, 54, 1448, 34, 16, 0)
        pair.driver(host_sends, frame(MAC, bytes([gso_type]) * 5000), gso)
    run_both(pair, TX_QUEUE)                    # sent (lingering), the batch in
    run_both(pair)                              # nothing to send: off once more if busy
    takes = pair.c.side.dev.guest_gso_types[0] >> net.GsoType.TCPV4 & 1
    assert pair.c.look(lambda side: (side.dev.rx_busy, side.dev.stats.rx_packets)) == (
        False, 2 if takes else 0)
    off = not pair.c.look(lambda side: side.dev.queues[TX_QUEUE].notification_enabled)
    assert off is bool(takes)
    pair.driver(send, frame(OTHER, b"ack"))
    run_both(pair)                              # found by the timer's run, if off
    sent = pair.c.look(lambda side: side.dev.stats.tx_packets)
    assert sent == (2 if takes else 1)
    run_both(pair)
    run_both(pair, TX_QUEUE)                    # the kick the driver made if not off
    runs, left = pair.runs_in_c()
    assert runs >= 4 and left >= 1


def test_a_tap_that_would_block(pair: RunPair) -> None:
    """The host stops reading: C hands the frame it cannot write to the model, which
    queues it in order; C does not take over while the backend holds frames."""
    for run_side in (pair.ref, pair.c):
        run_side.side.host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(30):
        pair.driver(send, frame(OTHER, bytes([i]) * 1000))
    run_both(pair, TX_QUEUE)
    for run_side in (pair.ref, pair.c):
        run_side.look(lambda side: side.tap._flush() if side.tap._tx_queue else None)
    run_both(pair)
    run_both(pair)


def test_lost_pages(pair: RunPair) -> None:
    """The SIGBUS guard counted a lost page: C leaves the run to the model, which goes
    NEEDS_RESET."""
    pair.driver(fill_rx, 2)
    run_both(pair, RX_QUEUE)
    pair.driver(send, frame(OTHER, b"t" * 60))
    for run_side in (pair.ref, pair.c):
        run_side.side.ram.memory.lost.count += 1
    run_both(pair, TX_QUEUE)
    assert pair.c.side.dev.broken


def test_the_model_looks_between_runs(pair: RunPair) -> None:
    """Another thread takes the device lock between runs (stats, a register access):
    the model sees the state C left, and C goes on from what the model left."""
    pair.driver(fill_rx, 4)
    for i in range(6):
        pair.driver(send, frame(OTHER, bytes([i]) * 50))
        run_both(pair, TX_QUEUE)
        pair.both(lambda s: s.look(lambda side: side.dev.queues[TX_QUEUE].unpublished))
        pair.driver(host_sends, frame(MAC, bytes([i]) * 70))
        run_both(pair)
    pair.both(lambda s: s.look(lambda side: side.dev.set_link(False)))
    pair.driver(send, frame(OTHER, b"link down"))
    run_both(pair, TX_QUEUE)
    pair.both(lambda s: s.look(lambda side: side.dev.set_link(True)))
    pair.driver(send, frame(OTHER, b"link up"))
    run_both(pair, TX_QUEUE)
    run_both(pair)
    assert pair.runs_in_c()[0] >= 6


@pytest.mark.parametrize(("route", "isr", "vectors"), [
    pytest.param({RX_QUEUE: (3, True), TX_QUEUE: (5, True)}, 0, [3, 5], id="msix"),
    pytest.param({RX_QUEUE: (4, True), TX_QUEUE: (4, True)}, 0, [4], id="msix-shared"),
    pytest.param({RX_QUEUE: (NO_VECTOR, True), TX_QUEUE: (6, True)}, 0, [6],
                 id="msix-no-vector"),
    pytest.param({RX_QUEUE: (None, True), TX_QUEUE: (None, True)}, 1, [0], id="intx"),
    pytest.param({RX_QUEUE: (None, False), TX_QUEUE: (None, False)}, 1, [],
                 id="intx-disabled"),
])
def test_interrupts_are_routed_as_the_transport_raises_them(
        route: dict[int, tuple[int | None, bool]], isr: int, vectors: list[int]) -> None:
    """What serve.c raises after a run in C (vfuserver_native_data_run): the queues'
    MSI-X vectors once each (none for NO_VECTOR), or the ISR bit and INTx unless
    PCI_COMMAND disables it (VirtioPciTransport._raise); and nothing for a run that did
    not start because the model held the state."""
    side = RunSide(True, **CONFIGS["modern-no-event-idx"])  # an interrupt per publish
    try:
        side.side.dev.interrupts.interrupt_route = (  # type: ignore[attr-defined]
            lambda queue: route[queue.index])
        fill_rx(side.side, 4)
        side.unlock()
        native = side.run.native
        send(side.side, frame(OTHER, b"out" * 20))
        side.kick(TX_QUEUE)
        assert lib.vfuserver_net_run(native, side.pending) >= 0  # sent; it lingers
        host_sends(side.side, frame(MAC, b"in" * 30))
        assert lib.vfuserver_net_run(native, side.pending) >= 0  # the timer's run
        assert native.irq_queues == (1 << RX_QUEUE) | (1 << TX_QUEUE)
        assert (native.irq_isr, list(native.irq_vectors)[: native.irq_count]) == (
            isr, vectors)
        side.lock()  # the model holds the state: a run does not start, raises nothing
        assert lib.vfuserver_net_run(native, side.pending) == RUN_PYTHON
        assert (native.irq_queues, native.irq_isr, native.irq_count) == (0, 0, 0)
    finally:
        side.close()
