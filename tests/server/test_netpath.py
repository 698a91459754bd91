"""The C data path of virtio-net (vfuserver/netpath.py, csrc/netpath.c) against the model.

Differential: two devices, the same driver actions. One moves its frames through the model
alone (VirtQueue and VirtioNet, the reference), the other through NetPath. Each has a real
TapBackend over the device end of a datagram socket pair (one frame per read and write,
as a tap), whose other end stands for the host. After every step both must have the same
guest RAM, the same queue state, the same frames on the host side, the same counters and
the same interrupts; the C path must also have done the work itself where it should
(NetPath.counters), so a path that left everything to the model would fail too.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.devices.driver import (
    DriverQueue,
    GuestRam,
    RecordingInterrupts,
)
from tests.devices.test_virtio_net import (
    ALL,
    MAC,
    NO_EVENT_IDX,
    NO_MRG,
    OTHER,
    driven_net,
    frame,
)
from tests.server.net_path_rig import (
    attach,
    guard_count,
    host_frames,
    receive_now,
    snapshot,
    socket_tap,
)
from tests.server.net_path_rig import host_sends as rig_host_sends
from vfuserver.devices.ring_journal import PUBLISHED_WORD, RingJournal
from vfuserver.devices.virtio_net import CTRL_QUEUE, RX_QUEUE, TX_QUEUE, VirtioNet
from vfuserver.netdev.backend import VNET_HDR_LEN
from vfuserver.netdev.tap import TapBackend
from vfuserver.netpath import NetPath
from vfuserver.protocol import virtio_net as net
from vfuserver.protocol.virtio import Feature
from vfuserver.protocol.virtio_net import CtrlClass, NetFeature

NO_INDIRECT = ALL & ~Feature.RING_INDIRECT_DESC.mask
NO_GUEST_OFFLOADS = ALL & ~sum(f.mask for f in NetFeature
                               if f.name.startswith("GUEST_") and f.name != "GUEST_ANNOUNCE")


@dataclass
class Side:
    ram: GuestRam
    irqs: RecordingInterrupts
    tap: TapBackend
    host: socket.socket
    dev: VirtioNet
    rx: DriverQueue
    tx: DriverQueue
    ctrl: DriverQueue
    path: NetPath | None

    def receive_now(self) -> bool:
        return receive_now(self.dev, self.tap, self.path)

    def host_frames(self) -> list[bytes]:
        return host_frames(self.host)

    def state(self) -> dict[str, object]:
        return snapshot(self.ram, self.dev, self.tap)


def make_side(*, native: bool, vnet_hdr: bool, legacy: bool, want: int | None,
              mtu: int = 1500) -> Side:
    ram = GuestRam()
    guard_count(ram)
    irqs = RecordingInterrupts()
    tap, host = socket_tap(vnet_hdr)
    dev, rx, tx, ctrl = driven_net(ram, irqs, tap, legacy=legacy, want=want, mtu=mtu)
    path = attach(dev, tap) if native else None
    return Side(ram, irqs, tap, host, dev, rx, tx, ctrl, path)


class Pair:
    """The model alone (``ref``) and the C path (``c``), driven alike."""

    def __init__(self, **kwargs: Any) -> None:
        self.ref = make_side(native=False, **kwargs)
        self.c = make_side(native=True, **kwargs)

    def both(self, action: Callable[..., object], *args: object) -> tuple[object, object]:
        """``action(side, *args)`` on each side."""
        return action(self.ref, *args), action(self.c, *args)

    def check(self) -> None:
        assert self.c.host_frames() == self.ref.host_frames()
        ref, c = self.ref.state(), self.c.state()
        for key in ref:
            assert c[key] == ref[key], key

    def close(self) -> None:
        for side in (self.ref, self.c):
            side.tap.close()
            side.host.close()


CONFIGS: dict[str, dict[str, Any]] = {
    "modern-vnet": dict(vnet_hdr=True, legacy=False, want=None),
    "modern-plain": dict(vnet_hdr=False, legacy=False, want=None),
    "modern-no-event-idx": dict(vnet_hdr=True, legacy=False, want=NO_EVENT_IDX),
    "modern-no-mrg": dict(vnet_hdr=True, legacy=False, want=NO_MRG),
    "modern-no-guest-offloads": dict(vnet_hdr=True, legacy=False, want=NO_GUEST_OFFLOADS),
    "modern-no-indirect": dict(vnet_hdr=True, legacy=False, want=NO_INDIRECT),
    "legacy-vnet": dict(vnet_hdr=True, legacy=True, want=None),
    "legacy-no-mrg": dict(vnet_hdr=True, legacy=True, want=NO_MRG),
    "legacy-plain-no-mrg": dict(vnet_hdr=False, legacy=True, want=NO_MRG),
}


@pytest.fixture(params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = Pair(**CONFIGS[request.param])
    yield p
    p.close()


def header(side: Side, **fields: int) -> bytes:
    values = [fields.get(name, 0) for name in
              ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
               "num_buffers")]
    return net.HDR_STRUCT.pack(*values)[: side.dev.header_len]


def send(side: Side, data: bytes, layout: str = "pushed", hdr: bytes | None = None) -> None:
    hdr = header(side) if hdr is None else hdr
    if layout == "pushed":
        side.tx.add([hdr + data])
    elif layout == "split":
        side.tx.add([hdr, data[:7], data[7:]])
    else:
        side.tx.add([hdr, data[:7], data[7:]], indirect=True)


def fill_rx(side: Side, count: int = 1, size: int = 1536) -> None:
    for _ in range(count):
        if side.dev.mergeable_rx:
            side.rx.add([], [size])
        elif side.dev.legacy:
            side.rx.add([], [side.dev.header_len, size])
        else:
            side.rx.add([], [side.dev.header_len + size])


def host_sends(side: Side, data: bytes, vnet: bytes | None = None) -> None:
    rig_host_sends(side.tap, side.host, data, vnet)


# -- transmit --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["pushed", "split", "indirect"])
def test_transmit_batches(pair: Pair, layout: str) -> None:
    for batch in (1, 3, 7):
        for i in range(batch):
            pair.both(send, frame(OTHER, bytes([i]) * (60 + i)), layout)
        pair.both(lambda s: s.dev.notify(TX_QUEUE))
        pair.check()
    assert pair.c.path is not None and pair.c.path.counters.tx_frames == 11


# -- receive ---------------------------------------------------------------------------------


def test_receive_batches(pair: Pair) -> None:
    pair.both(lambda s: fill_rx(s, 16))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    sizes = (1, 60, 200, 1400, 1500)
    for size in sizes:
        pair.both(host_sends, frame(MAC, bytes([size % 251]) * size))
    assert pair.both(lambda s: s.receive_now()) == (True, True)
    pair.check()
    assert pair.c.path is not None and pair.c.path.counters.rx_frames == len(sizes)


def ctrl(side: Side, ctrl_class: int, command: int, data: bytes = b"") -> None:
    """virtnet_send_command: header, data, the ack byte."""
    side.ctrl.add([bytes([ctrl_class, command])] + ([data] if data else []), [1])
    side.dev.notify(CTRL_QUEUE)
    side.ctrl.get_used()


def receive_all(pair: Pair) -> None:
    assert pair.both(lambda s: s.receive_now()) in ((True, True), (False, False))
    pair.check()


def test_receive_waits_for_buffers_and_holds_the_frame(pair: Pair) -> None:
    pair.both(lambda s: host_sends(s, frame(MAC, b"a" * 100)))
    pair.both(lambda s: host_sends(s, frame(MAC, b"b" * 100)))
    assert pair.both(lambda s: s.receive_now()) == (False, False)
    pair.check()
    pair.both(lambda s: fill_rx(s, 4))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    receive_all(pair)
    assert pair.c.dev.stats.rx_packets == 2


def test_receive_large_frames_across_buffers(pair: Pair) -> None:
    """Mergeable: several buffers per frame; otherwise one, dropped if too small."""
    pair.both(lambda s: fill_rx(s, 12, size=512))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    for size in (1000, 1500, 100):
        pair.both(host_sends, frame(MAC, b"x" * size))
    receive_all(pair)


@pytest.mark.parametrize("dest", [MAC, OTHER, b"\xff" * 6, bytes.fromhex("01005e000001")])
@pytest.mark.parametrize("vid", [None, 5, 7])
def test_receive_filters(pair: Pair, dest: bytes, vid: int | None) -> None:
    """Not promiscuous (as Linux sets it), with a VLAN filter where CTRL_VLAN is in use:
    C takes unicast to the device and broadcast, the model decides the rest."""
    pair.both(lambda s: ctrl(s, CtrlClass.RX, net.CtrlRx.PROMISC, b"\0"))
    pair.both(lambda s: ctrl(s, CtrlClass.VLAN, net.CtrlVlan.ADD, struct.pack("<H", 5)))
    pair.both(lambda s: fill_rx(s, 8))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    tag = b"" if vid is None else b"\x81\x00" + vid.to_bytes(2, "big")
    data = dest + OTHER + tag + b"\x08\x00" + b"payload"
    pair.both(lambda s: host_sends(s, data))
    pair.both(lambda s: host_sends(s, frame(MAC, b"after")))
    receive_all(pair)


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
@pytest.mark.parametrize("gso_type", [0, 1, 0x80])
def test_receive_vnet_headers(pair: Pair, flags: int, gso_type: int) -> None:
    """Checksum flags the guest may or may not take, GSO types: C passes on a header it
    need not change and leaves the rest to the model."""
    pair.both(lambda s: fill_rx(s, 8))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    udp = bytes(20) + bytes.fromhex("04d2162e0010") + b"\0\0" + b"12345678"
    vnet = net.HDR_STRUCT.pack(flags, gso_type, 42, 1400 if gso_type else 0, 34, 6, 0)
    pair.both(lambda s: host_sends(s, frame(MAC, udp), vnet))
    receive_all(pair)


GSO_FRAMES: tuple[int, ...] = (
    net.GsoType.TCPV4, net.GsoType.TCPV4 | net.GSO_ECN, net.GsoType.TCPV6, net.GsoType.UDP,
    net.GsoType.UDP_L4, 2, 0x44, net.GsoType.NONE)
"""gso_type of the big frames the host sends: each type, with ECN, two no spec defines,
and none (a frame over the MTU)."""

GSO_NEEDS: dict[int, int] = {
    net.GsoType.TCPV4: NetFeature.GUEST_TSO4.mask,
    net.GsoType.TCPV6: NetFeature.GUEST_TSO6.mask,
    net.GsoType.UDP: NetFeature.GUEST_UFO.mask,
    net.GsoType.UDP_L4: NetFeature.GUEST_USO4.mask | NetFeature.GUEST_USO6.mask,
}
"""The guest offload each GSO type needs (virtio 1.x §5.1.6.4.1)."""

GSO_WANTS = {
    "all": ALL,
    "no-ecn": ALL & ~NetFeature.GUEST_ECN.mask,
    "tso4-only": ALL & ~sum(NetFeature[f].mask for f in
                            ("GUEST_TSO6", "GUEST_ECN", "GUEST_UFO", "GUEST_USO4",
                             "GUEST_USO6")),
    "no-mrg": NO_MRG,
    "none": NO_GUEST_OFFLOADS,
}


@pytest.mark.parametrize("legacy", [False, True], ids=["modern", "legacy"])
@pytest.mark.parametrize("want", sorted(GSO_WANTS))
def test_receive_gso_frames(legacy: bool, want: str) -> None:
    """GSO frames from the tap (TSO from the host's stack), 20,000 bytes each: C places
    those the guest's offloads take across as many buffers as they need, with the tap's
    header; those it cannot take and a frame over the MTU are the model's (dropped)."""
    pair = Pair(vnet_hdr=True, legacy=legacy, want=GSO_WANTS[want])
    try:
        size = 20_000
        mergeable = pair.ref.dev.mergeable_rx
        for gso_type in GSO_FRAMES:
            vnet = net.HDR_STRUCT.pack(1, gso_type, 54, 1448 if gso_type else 0, 34, 16, 0)
            data = frame(MAC, bytes(range(256)) * (size // 256) + bytes(size % 256))
            pair.both(host_sends, data, vnet)
        # room for two frames (14 buffers each when mergeable): a third waits for more
        if mergeable:
            pair.both(lambda s: fill_rx(s, 30))
        else:
            pair.both(lambda s: fill_rx(s, 2, size + 100))
        pair.both(lambda s: s.dev.notify(RX_QUEUE))
        receive_all(pair)
        negotiated = pair.ref.dev.negotiated_features
        takes = [gso for gso in GSO_FRAMES
                 if gso & ~net.GSO_ECN in GSO_NEEDS
                 and negotiated & GSO_NEEDS[gso & ~net.GSO_ECN]
                 and (not gso & net.GSO_ECN or negotiated & NetFeature.GUEST_ECN.mask)]
        assert pair.c.path is not None
        assert pair.c.path.counters.rx_frames == min(len(takes), 2)
        if len(takes) > 2:
            pair.both(lambda s: s.rx.get_used())
            pair.both(lambda s: fill_rx(s, 30) if mergeable else fill_rx(s, 4, size + 100))
            pair.both(lambda s: s.dev.notify(RX_QUEUE))
            receive_all(pair)  # the frame that waited is the model's (held by the tap)
        assert pair.c.dev.stats.rx_packets == pair.ref.dev.stats.rx_packets == len(takes)
    finally:
        pair.close()


def test_receive_with_offloads_and_mtu() -> None:
    """The guest takes checksums (GUEST_CSUM); a frame over the MTU is dropped."""
    pair = Pair(vnet_hdr=True, legacy=False, want=None, mtu=1000)
    try:
        pair.both(lambda s: fill_rx(s, 8))
        pair.both(lambda s: s.dev.notify(RX_QUEUE))
        vnet = net.HDR_STRUCT.pack(1, 0, 0, 0, 34, 6, 0)
        for size in (900, 1000, 1100):  # frames of 914, 1014 and 1114 bytes; limit 1018
            pair.both(host_sends, frame(MAC, bytes(size)), vnet)
        receive_all(pair)
        assert pair.c.path is not None and pair.c.path.counters.rx_frames == 2
    finally:
        pair.close()


# -- what C leaves to the model ---------------------------------------------------------------


def test_transmit_empty_and_checksum_frames(pair: Pair) -> None:
    udp = bytes(20) + bytes.fromhex("04d2162e0010") + b"\0\0" + b"12345678"
    pair.both(lambda s: send(s, b""))
    pair.both(lambda s: send(s, frame(OTHER, udp),
                             hdr=header(s, flags=1, csum_start=34, csum_offset=6)))
    pair.both(lambda s: send(s, frame(OTHER, b"plain")))
    pair.both(lambda s: s.dev.notify(TX_QUEUE))
    pair.check()


def test_transmit_with_link_down(pair: Pair) -> None:
    pair.both(lambda s: s.dev.set_link(False))
    pair.both(lambda s: send(s, frame(OTHER)))
    pair.both(lambda s: s.dev.notify(TX_QUEUE))
    pair.check()


def test_transmit_to_a_tap_that_would_block(pair: Pair) -> None:
    """The host stops reading: frames C cannot write go to the backend's queue, in order,
    and leave in order once the host reads again."""
    for side in (pair.ref, pair.c):
        side.host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frames = [frame(OTHER, bytes([i]) * 1000) for i in range(40)]
    for data in frames:
        pair.both(send, data)
    pair.both(lambda s: s.dev.notify(TX_QUEUE))
    ref_state, c_state = pair.ref.state(), pair.c.state()
    assert c_state == ref_state
    for side in (pair.ref, pair.c):
        got = side.host_frames()
        with side.tap._tx_lock:
            side.tap._flush()
        got += side.host_frames()
        while side.tap._tx_queue:
            with side.tap._tx_lock:
                side.tap._flush()
            got += side.host_frames()
        hdr = header(side)
        sent = [g[VNET_HDR_LEN:] if side.tap.vnet_hdr else g for g in got]
        assert len(sent) == len(frames), hdr
        assert [s[-1000:] for s in sent] == [f[-1000:] for f in frames]


@pytest.mark.parametrize("fault", ["loop", "short", "unmapped", "rx-readable", "across-maps"])
def test_faulty_chains(pair: Pair, fault: str) -> None:
    """A chain the model refuses (NEEDS_RESET with its error) or takes apart (a buffer
    across two maps): C leaves it, and both end in the same state."""
    def build(side: Side) -> None:
        ram, tx, rx = side.ram, side.tx, side.rx
        if fault == "loop":
            head = tx.add([header(side) + frame(OTHER)], publish=False)
            desc = tx.outstanding[head].descs[0]
            buf = tx.outstanding[head].bufs[0]
            tx.write_desc(desc, buf.addr, buf.length, 1, desc)  # NEXT to itself
            tx.publish(head)
        elif fault == "short":
            tx.add([b"\0" * 4])
        elif fault == "unmapped":
            head = tx.add([header(side) + frame(OTHER)], publish=False)
            desc = tx.outstanding[head].descs[0]
            tx.write_desc(desc, ram.end + 4096, 100)
            tx.publish(head)
        elif fault == "rx-readable":
            rx.add([b"data"], [1536])
        else:
            side.ram.memory.remove(side.ram.base)
            half = side.ram.size // 2
            whole = memoryview(side.ram.backing)
            side.ram.memory.add(side.ram.base, whole[:half], writable=True)
            side.ram.memory.add(side.ram.base + half, whole[half:], writable=True)
            side.ram.skip_to(side.ram.base + half - 40)
            tx.add([header(side) + frame(OTHER, b"y" * 100)])
            rx.add([], [1536])
        send(side, frame(OTHER, b"next"))
        side.dev.notify(TX_QUEUE)
        side.dev.notify(RX_QUEUE)
        host_sends(side, frame(MAC, b"in"))
        side.receive_now()

    pair.both(build)
    pair.check()


def test_receive_into_a_first_buffer_of_just_the_header(pair: Pair) -> None:
    """Mergeable buffers whose first holds only the header: the frame starts at the
    second (virtio_net_receive_rcu writes the header into the first buffer only)."""
    pair.both(lambda s: s.rx.add([], [s.dev.header_len]))
    pair.both(lambda s: s.rx.add([], [200]))
    pair.both(lambda s: fill_rx(s, 2))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    pair.both(host_sends, frame(MAC, b"z" * 100))
    receive_all(pair)


def test_lingering_runs_in_bursts(pair: Pair) -> None:
    """The server's bottom half: tx_burst frames per run, lingering runs that publish
    what the run before them sent."""
    for side in (pair.ref, pair.c):
        side.dev.on_tx_pending = lambda: None
        side.dev.tx_burst = 3
    for i in range(7):
        pair.both(send, frame(OTHER, bytes([i]) * 70))
    for _ in range(5):
        assert pair.both(lambda s: s.dev.run_tx(linger=True)) in ((True, True),
                                                                  (False, False))
        pair.check()
    assert pair.c.path is not None and pair.c.path.counters.tx_frames == 7


@pytest.mark.parametrize("when", ["transmit", "receive", "lingering"])
def test_pages_lost_under_the_maps(pair: Pair, when: str) -> None:
    """The SIGBUS guard counted a lost page: the queue goes NEEDS_RESET at the end of its
    batch on both paths, with the same counters."""
    pair.both(lambda s: fill_rx(s, 2))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    pair.both(send, frame(OTHER, b"t" * 60))
    pair.both(host_sends, frame(MAC, b"r" * 60))
    for side in (pair.ref, pair.c):
        side.ram.memory.lost.count += 1
    if when == "transmit":
        pair.both(lambda s: s.dev.notify(TX_QUEUE))
    elif when == "lingering":
        pair.both(lambda s: s.dev.run_tx(linger=True))
    else:
        pair.both(lambda s: s.receive_now())
    pair.check()
    assert pair.c.dev.broken


def test_ring_journals_record_the_same(pair: Pair, tmp_path: Path) -> None:
    """With ring journals (VFUSERVER_RING_JOURNAL, for ring_watch), C records what it
    stores in the used rings exactly as the model does: the same entries, the same
    published index."""
    journals: dict[str, list[RingJournal]] = {}
    for name, side in (("ref", pair.ref), ("c", pair.c)):
        journals[name] = []
        for queue in side.dev.queues:
            journal = RingJournal(tmp_path / f"{name}-q{queue.index}.journal", queue.index,
                                  receive=queue.index == RX_QUEUE)
            queue.journal = journal
            queue.publish_journal()
            journals[name].append(journal)
    pair.both(lambda s: fill_rx(s, 4))
    pair.both(lambda s: s.dev.notify(RX_QUEUE))
    for i in range(3):
        pair.both(send, frame(OTHER, bytes([i]) * 80))
        pair.both(host_sends, frame(MAC, bytes([i]) * 90))
    pair.both(lambda s: s.dev.notify(TX_QUEUE))
    receive_all(pair)
    assert pair.c.path is not None
    assert (pair.c.path.counters.tx_frames, pair.c.path.counters.rx_frames) == (3, 3)
    for ref, c in zip(journals["ref"], journals["c"], strict=True):
        assert bytes(c.header_words) == bytes(ref.header_words)
        assert bytes(c.entries[:64]) == bytes(ref.entries[:64])
    assert journals["c"][RX_QUEUE].header_words[PUBLISHED_WORD] == 3
    for side_journals in journals.values():
        for journal in side_journals:
            journal.close()
