"""virtio-net driven by a test-side driver that sets up queues and buffers like Linux
drivers/net/virtio_net.c, with a recording peer and recording interrupts."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.devices.driver import (
    Buf,
    DriverQueue,
    GuestRam,
    RecordingInterrupts,
    RecordingPeer,
    driver_ok,
    negotiate_legacy,
    negotiate_modern,
)
from vfuserver.devices.errors import GuestError
from vfuserver.devices.virtio_net import (
    BASE_FEATURES,
    CTRL_QUEUE,
    OFFLOAD_FEATURES,
    RX_QUEUE,
    TX_QUEUE,
    NetPeer,
    VirtioNet,
)
from vfuserver.protocol import virtio_net as net
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio import DeviceStatus, Feature
from vfuserver.protocol.virtio_net import CtrlAck, CtrlClass, NetFeature, NetStatus

MAC = bytes.fromhex("525400abcdef")
OTHER = bytes.fromhex("525400000001")
MCAST = bytes.fromhex("01005e000001")
MCAST2 = bytes.fromhex("333300000001")
QUEUE_SIZE = 64


def frame(dest: bytes = MAC, payload: bytes = b"hello", *, vid: int | None = None) -> bytes:
    tag = b"" if vid is None else b"\x81\x00" + vid.to_bytes(2, "big")
    return dest + OTHER + tag + b"\x08\x00" + payload


@dataclass
class Rig:
    ram: GuestRam
    irqs: RecordingInterrupts
    peer: RecordingPeer
    dev: VirtioNet
    rx: DriverQueue
    tx: DriverQueue
    ctrl: DriverQueue

    @property
    def hdr_len(self) -> int:
        return self.dev.header_len

    def header(self, **fields: int) -> bytes:
        values = [fields.get(name, 0) for name in
                  ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
                   "num_buffers")]
        return net.HDR_STRUCT.pack(*values)[: self.hdr_len]

    def send(self, data: bytes, *, layout: str = "pushed", hdr: bytes | None = None) -> None:
        """Transmit like virtnet xmit_skb: header pushed in front of the data (one sg),
        header in its own sg, or an indirect table of header + data fragments."""
        hdr = self.header() if hdr is None else hdr
        if layout == "pushed":
            self.tx.add([hdr + data])
        elif layout == "split":
            self.tx.add([hdr, data[:7], data[7:]])
        else:
            self.tx.add([hdr, data[:7], data[7:]], indirect=True)
        self.dev.notify(TX_QUEUE)

    def fill_rx(self, count: int = 1, size: int = 1536) -> None:
        """Receive buffers like add_recvbuf_mergeable (one buffer each) or, without
        MRG_RXBUF, add_recvbuf_small (legacy: header and data in separate sgs)."""
        for _ in range(count):
            if self.dev.mergeable_rx:
                self.rx.add([], [size])
            elif self.dev.legacy:
                self.rx.add([], [self.hdr_len, size])
            else:
                self.rx.add([], [self.hdr_len + size])
        self.dev.notify(RX_QUEUE)

    def ctrl_cmd(self, ctrl_class: int, command: int, data: bytes = b"") -> int:
        """virtnet_send_command: header, data, then the device-writable ack byte."""
        out = [bytes([ctrl_class, command])] + ([data] if data else [])
        self.ctrl.add(out, [1])
        self.dev.notify(CTRL_QUEUE)
        [used] = self.ctrl.get_used()
        assert used.length == 1
        return used.data[0]

    def received(self) -> list[tuple[bytes, bytes]]:
        """(header, frame) of each packet the device placed, merging buffers."""
        packets = []
        entries = self.rx.get_used()
        i = 0
        while i < len(entries):
            first = entries[i]
            count = 1
            if self.hdr_len == net.HDR_LEN:
                (count,) = struct.unpack_from("<H", first.data, net.NUM_BUFFERS_OFFSET)
            data = b"".join(e.data for e in entries[i : i + count])
            packets.append((data[: self.hdr_len], data[self.hdr_len :]))
            i += count
        return packets


def driven_net(ram: GuestRam, irqs: RecordingInterrupts, peer: NetPeer, *, legacy: bool,
               want: int | None, mtu: int) -> tuple[VirtioNet, DriverQueue, DriverQueue,
                                                    DriverQueue]:
    """A VirtioNet on ``peer`` that the test driver has set up and started (DRIVER_OK):
    the device and its receive, transmit and control queues."""
    dev = VirtioNet(ram.memory, irqs, peer, mac=MAC, mtu=mtu, queue_max_size=QUEUE_SIZE)
    if legacy:
        negotiate_legacy(dev, want)
    else:
        negotiate_modern(dev, want)
    event_idx = dev.has_feature(Feature.RING_EVENT_IDX)
    rx, tx, ctrl = (DriverQueue(ram, q, event_idx=event_idx, contiguous=legacy)
                    for q in dev.queues)
    driver_ok(dev)
    irqs.clear()
    return dev, rx, tx, ctrl


def make_rig(*, vnet_hdr: bool = False, legacy: bool = False, want: int | None = None,
             mtu: int = 1500, ram: GuestRam | None = None) -> Rig:
    ram = GuestRam() if ram is None else ram
    irqs = RecordingInterrupts()
    peer = RecordingPeer(vnet_hdr)
    dev, rx, tx, ctrl = driven_net(ram, irqs, peer, legacy=legacy, want=want, mtu=mtu)
    return Rig(ram, irqs, peer, dev, rx, tx, ctrl)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


ALL = (1 << 64) - 1
NO_MRG = ALL & ~NetFeature.MRG_RXBUF.mask
NO_EVENT_IDX = ALL & ~Feature.RING_EVENT_IDX.mask


# -- features and config ------------------------------------------------------------------


def _words(dev: VirtioNet) -> int:
    return dev.get_device_features(0) | dev.get_device_features(1) << 32


def test_offered_features_without_vnet_hdr() -> None:
    dev = VirtioNet(GuestRam().memory, RecordingInterrupts(), RecordingPeer(), mac=MAC)
    offered = _words(dev)
    assert offered == BASE_FEATURES & ~Feature.ANY_LAYOUT.mask
    for bit in (NetFeature.MAC, NetFeature.STATUS, NetFeature.MRG_RXBUF, NetFeature.CTRL_VQ,
                NetFeature.CTRL_RX, NetFeature.CTRL_VLAN, NetFeature.CTRL_MAC_ADDR,
                NetFeature.GUEST_ANNOUNCE, NetFeature.MTU, Feature.VERSION_1,
                Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX):
        assert offered >> bit & 1, bit
    assert not offered & (NetFeature.CSUM.mask | NetFeature.GUEST_CSUM.mask
                          | NetFeature.HOST_TSO4.mask | NetFeature.MQ.mask)


def test_offered_features_with_vnet_hdr() -> None:
    dev = VirtioNet(GuestRam().memory, RecordingInterrupts(), RecordingPeer(vnet_hdr=True),
                    mac=MAC)
    assert _words(dev) == (BASE_FEATURES | OFFLOAD_FEATURES) & ~Feature.ANY_LAYOUT.mask


def test_legacy_feature_view() -> None:
    dev = VirtioNet(GuestRam().memory, RecordingInterrupts(), RecordingPeer(), mac=MAC)
    dev.legacy = True
    assert dev.get_device_features(0) == BASE_FEATURES & 0xFFFF_FFFF
    assert dev.get_device_features(0) & Feature.ANY_LAYOUT.mask
    assert dev.get_device_features(1) == 0


def test_feature_dependencies_checked_at_features_ok() -> None:
    dev = VirtioNet(GuestRam().memory, RecordingInterrupts(), RecordingPeer(vnet_hdr=True),
                    mac=MAC)
    with pytest.raises(RuntimeError, match="refused"):
        negotiate_modern(dev, ALL & ~NetFeature.GUEST_CSUM.mask)
    with pytest.raises(RuntimeError, match="refused"):
        negotiate_modern(dev, ALL & ~NetFeature.CTRL_VQ.mask)
    negotiate_modern(dev, ALL & ~(NetFeature.GUEST_CSUM.mask | NetFeature.GUEST_TSO4.mask
                                  | NetFeature.GUEST_TSO6.mask | NetFeature.GUEST_ECN.mask))


def test_constructor_validates_operator_input() -> None:
    memory, irqs, peer = GuestRam().memory, RecordingInterrupts(), RecordingPeer()
    with pytest.raises(ValueError, match="MAC"):
        VirtioNet(memory, irqs, peer, mac=b"\x00" * 5)
    with pytest.raises(ValueError, match="MTU"):
        VirtioNet(memory, irqs, peer, mac=MAC, mtu=40)


def test_config_space(rig: Rig) -> None:
    dev = rig.dev
    assert dev.config_size == 12
    assert dev.read_config(0, 6) == MAC
    assert dev.read_config(net.ConfigOffset.STATUS, 2) == b"\x01\x00"
    assert dev.read_config(net.ConfigOffset.MAX_VIRTQUEUE_PAIRS, 2) == b"\x01\x00"
    assert dev.read_config(net.ConfigOffset.MTU, 2) == (1500).to_bytes(2, "little")
    parsed = net.NetConfig.parse(dev.read_config(0, 12) + bytes(net.CONFIG_SIZE - 12))
    assert (parsed.mac, parsed.status, parsed.mtu) == (MAC, NetStatus.LINK_UP, 1500)
    with pytest.raises(GuestError):
        dev.read_config(10, 4)


def test_modern_driver_cannot_write_mac(rig: Rig) -> None:
    rig.dev.write_config(0, OTHER)
    assert rig.dev.read_config(0, 6) == MAC


def test_legacy_driver_writes_mac_bytewise_and_reset_restores_it() -> None:
    rig = make_rig(legacy=True, want=ALL & ~NetFeature.CTRL_MAC_ADDR.mask)
    for i, byte in enumerate(OTHER):  # Linux legacy virtnet_set_mac_address: virtio_cwrite8
        rig.dev.write_config(i, bytes([byte]))
    assert rig.dev.read_config(0, 6) == OTHER
    rig.dev.write_config(4, b"\xaa\xbb\xcc\xdd")  # straddles mac and status
    assert rig.dev.mac == OTHER[:4] + b"\xaa\xbb"
    assert rig.dev.read_config(6, 2) == b"\x01\x00", "status is not writable"
    rig.dev.set_status(0)
    assert rig.dev.read_config(0, 6) == MAC


def test_legacy_mac_write_ignored_with_ctrl_mac_addr() -> None:
    rig = make_rig(legacy=True)
    rig.dev.write_config(0, OTHER)
    assert rig.dev.mac == MAC


def test_legacy_header_is_10_bytes_without_mrg_rxbuf() -> None:
    assert make_rig(legacy=True, want=NO_MRG).dev.header_len == 10
    assert make_rig(legacy=True).dev.header_len == 12
    assert make_rig(want=NO_MRG).dev.header_len == 12


# -- transmit -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["pushed", "split", "indirect"])
def test_transmit(rig: Rig, layout: str) -> None:
    data = frame(OTHER, b"x" * 100)
    rig.send(data, layout=layout)
    assert rig.peer.sent == [data]
    [used] = rig.tx.get_used()
    assert used.length == 0
    assert rig.irqs.queue == [TX_QUEUE]
    assert (rig.dev.stats.tx_packets, rig.dev.stats.tx_bytes) == (1, len(data))


def test_transmit_batch_one_interrupt(rig: Rig) -> None:
    frames = [frame(OTHER, bytes([i]) * 60) for i in range(5)]
    for data in frames:
        rig.tx.add([rig.header() + data])
    rig.dev.notify(TX_QUEUE)
    assert rig.peer.sent == frames
    assert len(rig.tx.get_used()) == 5
    assert rig.irqs.queue == [TX_QUEUE]


def test_transmit_to_vnet_hdr_peer_keeps_header() -> None:
    rig = make_rig(vnet_hdr=True)
    hdr = rig.header(flags=net.HdrFlag.NEEDS_CSUM, gso_type=net.GsoType.TCPV4, hdr_len=54,
                     gso_size=1448, csum_start=34, csum_offset=16)
    data = frame(OTHER, bytes(3000))
    rig.send(data, hdr=hdr, layout="indirect")
    assert rig.peer.sent == [hdr + data]


def test_legacy_10_byte_header_is_widened_for_vnet_hdr_peer() -> None:
    rig = make_rig(vnet_hdr=True, legacy=True, want=NO_MRG)
    hdr = rig.header(flags=net.HdrFlag.NEEDS_CSUM, csum_start=34, csum_offset=6)
    assert len(hdr) == 10
    data = frame(OTHER, bytes(100))
    rig.send(data, hdr=hdr, layout="split")
    assert rig.peer.sent == [hdr + b"\0\0" + data]


def test_transmit_completes_checksum_for_headerless_peer(rig: Rig) -> None:
    udp = bytearray(bytes.fromhex("04d2162e0010") + b"\x00\x00" + b"12345678")
    packet = bytearray(frame(OTHER, bytes(20) + bytes(udp)))
    rig.send(bytes(packet), hdr=rig.header(flags=net.HdrFlag.NEEDS_CSUM, csum_start=34,
                                           csum_offset=6))
    [sent] = rig.peer.sent
    expected = bytearray(packet)
    net.complete_checksum(expected, 34, 6)
    assert sent == bytes(expected) and sent[40:42] != b"\0\0"


def test_transmit_with_link_down_drops(rig: Rig) -> None:
    rig.dev.set_link(False)
    rig.send(frame(OTHER))
    assert rig.peer.sent == []
    assert len(rig.tx.get_used()) == 1, "buffers still go back to the driver"
    assert rig.dev.stats.tx_dropped == 1


def test_transmit_peer_failure_is_counted_not_fatal(rig: Rig,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rig.peer.fail = True
    rig.send(frame(OTHER))
    assert rig.dev.stats.tx_errors == 1
    assert not rig.dev.broken
    assert len(rig.tx.get_used()) == 1
    assert "transmit failed: peer is gone" in caplog.text


def test_transmit_queued_before_driver_ok_goes_at_driver_ok() -> None:
    ram, irqs, peer = GuestRam(), RecordingInterrupts(), RecordingPeer()
    dev = VirtioNet(ram.memory, irqs, peer, mac=MAC, queue_max_size=QUEUE_SIZE)
    negotiate_modern(dev)
    tx = DriverQueue(ram, dev.queues[TX_QUEUE], event_idx=True)
    tx.add([bytes(12) + frame(OTHER)])
    dev.notify(TX_QUEUE)
    assert peer.sent == []
    driver_ok(dev)
    assert peer.sent == [frame(OTHER)]


def test_transmit_bottom_half_in_bursts(rig: Rig) -> None:
    pending: list[int] = []
    rig.dev.on_tx_pending = lambda: pending.append(1)
    rig.dev.tx_burst = 4
    for i in range(10):
        rig.tx.add([rig.header() + frame(OTHER, bytes([i]))])
    rig.dev.notify(TX_QUEUE)
    assert rig.peer.sent == [] and pending == [1], "a kick only schedules the work"
    assert not rig.dev.queues[TX_QUEUE].notification_enabled, "and suppresses kicks meanwhile"
    rig.dev.run_tx()  # what the server does when on_tx_pending fired
    assert len(rig.peer.sent) == 4 and pending == [1, 1]
    assert len(rig.tx.get_used()) == 4, "the burst is completed before handing over"
    rig.dev.run_tx()
    rig.dev.run_tx()
    assert len(rig.peer.sent) == 10 and pending == [1, 1, 1]
    assert rig.tx.avail_event == rig.tx.avail_idx, "caught up: kicks wanted again"


@pytest.mark.parametrize("want", [ALL, NO_EVENT_IDX], ids=["event-idx", "no-notify-flag"])
def test_a_lingering_transmit_run_keeps_kicks_off_until_a_run_finds_nothing(want: int) -> None:
    """QEMU's tx timer: after a run that sent frames the driver is not asked to kick; the
    next run picks up what it queued meanwhile, and one that finds nothing asks again.
    Completions wait for the run that finds nothing (coalesced), or for half the ring:
    see test_lingering_completions_wait_for_half_the_ring."""
    rig = make_rig(want=want)
    queue = rig.dev.queues[TX_QUEUE]
    rig.dev.on_tx_pending = lambda: None
    rig.tx.add([rig.header() + frame(OTHER, b"a")])
    old = rig.tx.avail_idx
    assert rig.dev.run_tx(linger=True) is True
    assert not queue.notification_enabled
    assert rig.tx.get_used() == [] and rig.irqs.queue == [], "completed by the next run"
    rig.tx.add([rig.header() + frame(OTHER, b"b")])  # queued while the run lingers
    assert not rig.tx.kick_needed(old)
    assert rig.dev.run_tx(linger=True) is True
    assert rig.peer.sent == [frame(OTHER, b"a"), frame(OTHER, b"b")]
    assert rig.tx.get_used() == [] and rig.irqs.queue == []
    assert rig.dev.run_tx(linger=True) is False
    assert queue.notification_enabled
    assert len(rig.tx.get_used()) == 2 and rig.irqs.queue == [TX_QUEUE], \
        "the run that found nothing completes both, with one interrupt"
    old = rig.tx.avail_idx
    rig.tx.add([rig.header() + frame(OTHER, b"c")])
    assert rig.tx.kick_needed(old), "caught up: kicks wanted again"
    assert rig.dev.run_tx() is False  # without linger: as before, notifications on
    assert len(rig.peer.sent) == 3 and queue.notification_enabled


@pytest.mark.parametrize("gso_type", [net.GsoType.TCPV4, net.GsoType.TCPV4 | net.GSO_ECN,
                                      net.GsoType.NONE, net.GSO_ECN])
def test_a_received_stream_keeps_kicks_off_one_run_longer(gso_type: int) -> None:
    """While the guest receives a stream (a GSO packet came in), a lingering run that
    finds nothing leaves notifications off once more: the acknowledgements the driver
    queues next are found by the next run without a kick. A plain frame (a ping's
    answer) changes nothing, nor does a run without linger."""
    rig = make_rig(vnet_hdr=True)
    queue = rig.dev.queues[TX_QUEUE]
    rig.dev.on_tx_pending = lambda: None
    stream = gso_type & ~net.GSO_ECN != net.GsoType.NONE
    for _ in range(3):
        rig.rx.add([], [2048] * 2)
    rig.tx.add([rig.header() + frame(OTHER, b"data")])  # kicked: notifications off
    assert rig.dev.run_tx(linger=True) is True
    vnet = net.HDR_STRUCT.pack(1, gso_type, 54, 1448 if stream else 0, 34, 16, 0)
    size = 3000 if stream else 1000  # a plain frame within the MTU: placed too
    assert rig.dev.receive(frame(MAC, bytes(size)), vnet)
    assert rig.dev.stats.rx_packets == 1
    assert rig.dev.rx_busy is stream
    old = rig.tx.avail_idx
    assert rig.dev.run_tx(linger=True) is stream
    assert queue.notification_enabled is not stream
    assert not rig.dev.rx_busy
    rig.tx.add([rig.header() + frame(OTHER, b"ack")])
    assert rig.tx.kick_needed(old) is not stream
    if stream:
        assert rig.dev.run_tx(linger=True) is True   # sent the acknowledgement
        assert rig.dev.run_tx(linger=True) is False  # and found nothing more
        assert len(rig.peer.sent) == 2 and rig.peer.sent[1].endswith(frame(OTHER, b"ack"))
    assert queue.notification_enabled
    # without linger (no timer to come back): the flag is not looked at
    assert rig.dev.receive(frame(MAC, bytes(size)), vnet)
    assert rig.dev.stats.rx_packets == 2
    assert rig.dev.run_tx() is False and queue.notification_enabled
    assert rig.dev.rx_busy is stream
    rig.dev.reset()
    assert not rig.dev.rx_busy


def test_lingering_completions_wait_for_half_the_ring() -> None:
    """A driver that keeps transmitting gets its completions once half the ring waits
    for them, without pausing."""
    rig = make_rig()
    rig.dev.on_tx_pending = lambda: None
    half = rig.dev.queues[TX_QUEUE].size // 2
    for i in range(half):
        rig.tx.add([rig.header() + frame(OTHER, bytes([i]))])
        assert rig.dev.run_tx(linger=True) is True
    assert rig.tx.get_used() == []
    rig.tx.add([rig.header() + frame(OTHER, b"more")])
    assert rig.dev.run_tx(linger=True) is True
    assert len(rig.tx.get_used()) == half and rig.irqs.queue == [TX_QUEUE]


def test_transmit_chatter_does_not_hide_needs_reset(rig: Rig,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    rig.peer.fail = True
    for _ in range(10):
        rig.send(frame(OTHER))
    rig.tx.set_avail_idx(rig.tx.avail_idx + QUEUE_SIZE + 1)
    rig.dev.notify(TX_QUEUE)
    assert "device needs reset" in caplog.text


def test_tx_event_idx_asks_for_kicks_again(rig: Rig) -> None:
    rig.send(frame(OTHER))
    assert rig.tx.avail_event == rig.tx.avail_idx
    assert rig.tx.publish(rig.tx.add([rig.header() + frame(OTHER)], publish=False))


def test_tx_interrupt_suppressed_by_used_event(rig: Rig) -> None:
    rig.send(frame(OTHER))
    assert rig.irqs.queue == [TX_QUEUE]
    rig.tx.get_used()
    rig.tx.set_used_event(rig.tx.last_used + 2)  # Linux virtqueue_enable_cb_delayed
    rig.irqs.clear()
    for expected in ([], [], [TX_QUEUE]):
        rig.send(frame(OTHER))
        assert rig.irqs.queue == expected


def test_tx_without_event_idx_uses_flags() -> None:
    rig = make_rig(want=NO_EVENT_IDX)
    rig.tx.set_no_interrupt(True)
    rig.send(frame(OTHER))
    assert rig.irqs.queue == []
    assert not rig.tx.used_flags & ring.UsedFlag.NO_NOTIFY, "notifications back on"
    rig.tx.set_no_interrupt(False)
    rig.send(frame(OTHER))
    assert rig.irqs.queue == [TX_QUEUE]
    assert len(rig.peer.sent) == 2


# -- receive ------------------------------------------------------------------------------


def test_receive_mergeable_single_buffer(rig: Rig) -> None:
    rig.fill_rx(4)
    data = frame(payload=b"a" * 200)
    assert rig.dev.receive(data)
    [(hdr, got)] = rig.received()
    assert got == data
    assert net.NetHdr.parse(hdr).num_buffers == 1
    assert rig.irqs.queue == [RX_QUEUE]
    assert (rig.dev.stats.rx_packets, rig.dev.stats.rx_bytes) == (1, len(data))


def test_receive_mergeable_spans_buffers(rig: Rig) -> None:
    rig.fill_rx(5, size=512)
    data = frame(payload=bytes(range(256)) * 5)
    assert rig.dev.receive(data)
    entries = rig.rx.get_used()
    assert [e.length for e in entries] == [512, 512, 12 + len(data) - 1024]
    merged = b"".join(e.data for e in entries)
    assert net.NetHdr.parse(merged[:12]).num_buffers == 3
    assert merged[12:] == data
    assert rig.irqs.queue == [RX_QUEUE]


def test_receive_small_buffers_without_mrg() -> None:
    rig = make_rig(want=NO_MRG)
    rig.fill_rx(2)
    data = frame(payload=bytes(1000))
    assert rig.dev.receive(data)
    [(hdr, got)] = rig.received()
    assert got == data
    assert net.NetHdr.parse(hdr).num_buffers == 1, "modern header, spec: always 1"


def test_receive_legacy_10_byte_header_in_its_own_descriptor() -> None:
    rig = make_rig(legacy=True, want=NO_MRG)
    rig.fill_rx(1)
    data = frame(payload=b"legacy")
    assert rig.dev.receive(data)
    [used] = rig.rx.get_used()
    assert used.length == 10 + len(data)
    assert used.data == bytes(10) + data


def test_receive_without_buffers_waits_for_kick(rig: Rig) -> None:
    kicks: list[int] = []
    rig.dev.on_rx_buffers = lambda: kicks.append(1)
    data = frame()
    assert rig.dev.receive(data) is False
    assert rig.dev.stats.rx_no_buffers == 1
    assert rig.dev.queues[RX_QUEUE].notification_enabled
    # the driver refills and, because the device asked, kicks
    head = rig.rx.add([], [1536], publish=False)
    assert rig.rx.publish(head)
    rig.dev.notify(RX_QUEUE)
    assert kicks == [1]
    assert rig.dev.receive(data)
    assert [f for _, f in rig.received()] == [data]


def test_receive_not_enough_mergeable_buffers_yet(rig: Rig) -> None:
    rig.fill_rx(1, size=100)
    assert rig.dev.receive(frame(payload=bytes(500))) is False
    assert rig.rx.get_used() == [], "partially collected buffers are given back"
    rig.fill_rx(5, size=100)
    assert rig.dev.receive(frame(payload=bytes(500)))
    assert len(rig.rx.get_used()) == 6


def test_receive_too_small_buffer_without_mrg_drops_and_keeps_buffer() -> None:
    rig = make_rig(want=NO_MRG)
    rig.fill_rx(1, size=100)
    assert rig.dev.receive(frame(payload=bytes(500)))
    assert rig.dev.stats.rx_dropped == 1
    assert rig.rx.get_used() == []
    assert rig.dev.receive(frame(payload=bytes(50)))
    assert len(rig.rx.get_used()) == 1


def test_receive_drops_when_not_ready() -> None:
    ram, irqs, peer = GuestRam(), RecordingInterrupts(), RecordingPeer()
    dev = VirtioNet(ram.memory, irqs, peer, mac=MAC)
    assert dev.receive(frame()) is True
    assert dev.stats.rx_dropped == 1


def test_receive_drops_oversized_frame_with_mtu() -> None:
    rig = make_rig(mtu=1280)
    rig.fill_rx(3)
    assert rig.dev.receive(frame(payload=bytes(1280 + 5)))  # > mtu + 14 + 4
    assert rig.rx.get_used() == []
    assert rig.dev.stats.rx_dropped == 1


def test_receive_rx_interrupt_suppressed_by_no_interrupt() -> None:
    rig = make_rig(want=NO_EVENT_IDX)
    rig.fill_rx(2)
    rig.rx.set_no_interrupt(True)
    assert rig.dev.receive(frame())
    assert rig.irqs.queue == []
    assert rig.rx.used_flags & ring.UsedFlag.NO_NOTIFY, "buffers there: no kicks wanted"


# -- receive with a vnet header from the peer ----------------------------------------------


def _tcp_hdr(**extra: int) -> bytes:
    fields = dict(flags=net.HdrFlag.NEEDS_CSUM, gso_type=net.GsoType.TCPV4, hdr_len=54,
                  gso_size=1448, csum_start=34, csum_offset=16, num_buffers=0)
    fields.update(extra)
    return bytes(net.NetHdr.build(fields))


def test_receive_gso_frame_when_guest_takes_tso() -> None:
    rig = make_rig(vnet_hdr=True)
    rig.fill_rx(50, size=1536)
    data = frame(payload=bytes(20000))
    assert rig.dev.receive(data, _tcp_hdr())
    [(hdr, got)] = rig.received()
    assert got == data
    parsed = net.NetHdr.parse(hdr)
    assert (parsed.gso_type, parsed.gso_size, parsed.flags) == (1, 1448, 1)
    assert parsed.num_buffers == (12 + len(data) + 1535) // 1536


def test_receive_gso_frame_dropped_when_guest_cannot_take_it() -> None:
    rig = make_rig(vnet_hdr=True)
    offloads: list[int] = []
    rig.dev.on_guest_offloads = offloads.append
    assert rig.ctrl_cmd(CtrlClass.GUEST_OFFLOADS, 0, struct.pack("<Q", 0)) == CtrlAck.OK
    assert offloads == [0]
    rig.fill_rx(50)
    assert rig.dev.receive(frame(payload=bytes(5000)), _tcp_hdr())
    assert rig.rx.get_used() == []
    assert rig.dev.stats.rx_dropped == 1


def test_receive_partial_checksum_completed_without_guest_csum() -> None:
    rig = make_rig(vnet_hdr=True)
    assert rig.ctrl_cmd(CtrlClass.GUEST_OFFLOADS, 0, struct.pack("<Q", 0)) == CtrlAck.OK
    rig.fill_rx(2)
    data = bytearray(frame(payload=bytes(20) + bytes.fromhex("04d2162e0010abcd") + b"12345678"))
    hdr = _tcp_hdr(gso_type=0, gso_size=0, csum_offset=6)
    assert rig.dev.receive(bytes(data), hdr)
    [(got_hdr, got)] = rig.received()
    net.complete_checksum(data, 34, 6)
    assert got == bytes(data)
    assert net.NetHdr.parse(got_hdr).flags == 0


def test_receive_partial_checksum_passed_with_guest_csum() -> None:
    rig = make_rig(vnet_hdr=True)
    rig.fill_rx(2)
    data = frame(payload=bytes(60))
    assert rig.dev.receive(data, _tcp_hdr(gso_type=0, gso_size=0))
    [(hdr, got)] = rig.received()
    assert got == data and net.NetHdr.parse(hdr).flags == net.HdrFlag.NEEDS_CSUM


# -- control queue ------------------------------------------------------------------------


def test_ctrl_rx_modes(rig: Rig) -> None:
    for command in net.CtrlRx:
        assert rig.ctrl_cmd(CtrlClass.RX, command, b"\x01") == CtrlAck.OK
        assert getattr(rig.dev.rx_filter, command.name.lower()) is True
        assert rig.ctrl_cmd(CtrlClass.RX, command, b"\x00") == CtrlAck.OK
        assert getattr(rig.dev.rx_filter, command.name.lower()) is False
    assert rig.irqs.queue.count(CTRL_QUEUE) == 2 * len(net.CtrlRx)


@pytest.mark.parametrize(
    ("command", "data"),
    [(net.CtrlRx.PROMISC, b""), (net.CtrlRx.PROMISC, b"\x01\x01"), (6, b"\x01")],
)
def test_ctrl_rx_malformed(rig: Rig, command: int, data: bytes) -> None:
    assert rig.ctrl_cmd(CtrlClass.RX, command, data) == CtrlAck.ERR


def test_ctrl_rx_extra_needs_its_feature() -> None:
    rig = make_rig(want=ALL & ~NetFeature.CTRL_RX_EXTRA.mask)
    assert rig.ctrl_cmd(CtrlClass.RX, net.CtrlRx.ALLMULTI, b"\x01") == CtrlAck.OK
    assert rig.ctrl_cmd(CtrlClass.RX, net.CtrlRx.NOBCAST, b"\x01") == CtrlAck.ERR


def _mac_table(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    return (struct.pack("<I", len(unicast)) + b"".join(unicast)
            + struct.pack("<I", len(multicast)) + b"".join(multicast))


def test_ctrl_mac_table_set(rig: Rig) -> None:
    assert rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.TABLE_SET,
                        _mac_table([OTHER], [MCAST])) == CtrlAck.OK
    rx = rig.dev.rx_filter
    assert (rx.unicast, rx.multicast, rx.uni_overflow, rx.multi_overflow) == (
        [OTHER], [MCAST], False, False)
    big = _mac_table([bytes([2, 0, 0, 0, 0, i]) for i in range(65)], [MCAST])
    assert rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.TABLE_SET, big) == CtrlAck.OK
    assert rx.uni_overflow and rx.unicast == [] and rx.multicast == [MCAST]
    assert rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.TABLE_SET,
                        _mac_table([], [])[:6]) == CtrlAck.ERR


def test_ctrl_mac_addr_set(rig: Rig) -> None:
    assert rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.ADDR_SET, OTHER) == CtrlAck.OK
    assert rig.dev.read_config(0, 6) == OTHER
    assert rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.ADDR_SET, OTHER[:5]) == CtrlAck.ERR
    assert rig.ctrl_cmd(CtrlClass.MAC, 7, OTHER) == CtrlAck.ERR
    rig.dev.set_status(0)
    assert rig.dev.mac == MAC, "reset restores the operator's MAC"


def test_ctrl_vlan(rig: Rig) -> None:
    assert rig.dev.rx_filter.vlans == set()
    assert rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.ADD, struct.pack("<H", 100)) == CtrlAck.OK
    assert rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.ADD, struct.pack("<H", 200)) == CtrlAck.OK
    assert rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.DEL, struct.pack("<H", 100)) == CtrlAck.OK
    assert rig.dev.rx_filter.vlans == {200}
    assert rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.ADD, struct.pack("<H", 4096)) == CtrlAck.ERR
    assert rig.ctrl_cmd(CtrlClass.VLAN, 2, struct.pack("<H", 1)) == CtrlAck.ERR
    assert rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.ADD, b"\x01") == CtrlAck.ERR


def test_ctrl_vlan_without_feature() -> None:
    rig = make_rig(want=ALL & ~NetFeature.CTRL_VLAN.mask)
    assert rig.dev.rx_filter.vlans is None
    assert rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.ADD, struct.pack("<H", 1)) == CtrlAck.ERR


def test_announce(rig: Rig) -> None:
    generation = rig.dev.config_generation
    assert rig.dev.announce()
    assert rig.dev.read_config(net.ConfigOffset.STATUS, 2) == bytes(
        [NetStatus.LINK_UP | NetStatus.ANNOUNCE, 0])
    assert rig.irqs.config == 1
    assert rig.dev.config_generation == generation + 1
    assert rig.ctrl_cmd(CtrlClass.ANNOUNCE, net.CtrlAnnounce.ACK) == CtrlAck.OK
    assert rig.dev.read_config(net.ConfigOffset.STATUS, 2) == b"\x01\x00"
    assert rig.ctrl_cmd(CtrlClass.ANNOUNCE, net.CtrlAnnounce.ACK) == CtrlAck.ERR


def test_announce_needs_guest_announce() -> None:
    rig = make_rig(want=ALL & ~NetFeature.GUEST_ANNOUNCE.mask)
    assert not rig.dev.announce()
    assert rig.irqs.config == 0


def test_ctrl_mq_refused(rig: Rig) -> None:
    assert rig.ctrl_cmd(CtrlClass.MQ, net.CtrlMq.VQ_PAIRS_SET, struct.pack("<H", 1)) == (
        CtrlAck.ERR)


def test_ctrl_guest_offloads() -> None:
    rig = make_rig(vnet_hdr=True)
    seen: list[int] = []
    rig.dev.on_guest_offloads = seen.append
    csum = NetFeature.GUEST_CSUM.mask
    assert rig.ctrl_cmd(CtrlClass.GUEST_OFFLOADS, 0, struct.pack("<Q", csum)) == CtrlAck.OK
    assert rig.dev.guest_offloads == csum and seen == [csum]
    assert rig.ctrl_cmd(CtrlClass.GUEST_OFFLOADS, 0,
                        struct.pack("<Q", NetFeature.GUEST_UFO.mask)) == CtrlAck.ERR
    assert rig.ctrl_cmd(CtrlClass.GUEST_OFFLOADS, 1, struct.pack("<Q", 0)) == CtrlAck.ERR
    assert rig.ctrl_cmd(CtrlClass.GUEST_OFFLOADS, 0, b"\0") == CtrlAck.ERR


def test_ctrl_guest_offloads_without_feature(rig: Rig) -> None:
    assert rig.ctrl_cmd(CtrlClass.GUEST_OFFLOADS, 0, struct.pack("<Q", 0)) == CtrlAck.ERR


def test_ctrl_unknown_class(rig: Rig) -> None:
    assert rig.ctrl_cmd(0x42, 0) == CtrlAck.ERR


def test_ctrl_queue_ignored_without_ctrl_vq() -> None:
    want = ALL & ~(NetFeature.CTRL_VQ.mask | NetFeature.CTRL_RX.mask | NetFeature.CTRL_VLAN.mask
                   | NetFeature.GUEST_ANNOUNCE.mask | NetFeature.CTRL_MAC_ADDR.mask
                   | NetFeature.CTRL_RX_EXTRA.mask)
    rig = make_rig(want=want)
    rig.ctrl.add([bytes([0, 0, 1])], [1])
    rig.dev.notify(CTRL_QUEUE)
    assert rig.ctrl.get_used() == []
    assert not rig.dev.broken


# -- receive filtering (QEMU receive_filter) ----------------------------------------------


def _delivered(rig: Rig, data: bytes) -> bool:
    rig.fill_rx(1)
    assert rig.dev.receive(data)
    return bool(rig.received())


BCAST = net.BROADCAST_MAC
FILTER_CASES = [
    # (setup commands, frame, delivered)
    pytest.param([], frame(OTHER), True, id="promisc-by-default"),
    pytest.param([("promisc", 0)], frame(MAC), True, id="own-unicast"),
    pytest.param([("promisc", 0)], frame(OTHER), False, id="other-unicast"),
    pytest.param([("promisc", 0)], frame(BCAST), True, id="broadcast"),
    pytest.param([("promisc", 0), ("nobcast", 1)], frame(BCAST), False, id="nobcast"),
    pytest.param([("promisc", 0)], frame(MCAST), False, id="multicast-not-in-table"),
    pytest.param([("promisc", 0), ("allmulti", 1)], frame(MCAST), True, id="allmulti"),
    pytest.param([("promisc", 0), ("allmulti", 1), ("nomulti", 1)], frame(MCAST), False,
                 id="nomulti-wins"),
    pytest.param([("promisc", 0), ("alluni", 1)], frame(OTHER), True, id="alluni"),
    pytest.param([("promisc", 0), ("nouni", 1)], frame(MAC), False, id="nouni"),
    pytest.param([("promisc", 0), ("table", 0)], frame(OTHER), True, id="unicast-table"),
    pytest.param([("promisc", 0), ("table", 0)], frame(MCAST), True, id="multicast-table"),
    pytest.param([("promisc", 0), ("table", 0)], frame(MCAST2), False, id="multicast-other"),
    pytest.param([("promisc", 0), ("table-overflow", 0)], frame(bytes.fromhex("020000000099")),
                 True, id="unicast-overflow"),
    pytest.param([("promisc", 0)], frame(MAC, vid=100), False, id="vlan-not-added"),
    pytest.param([("promisc", 0), ("vlan", 100)], frame(MAC, vid=100), True, id="vlan-added"),
    pytest.param([("promisc", 0), ("vlan", 100)], frame(MAC, vid=101), False, id="vlan-other"),
    pytest.param([("vlan", 0)], frame(MAC, vid=101), True, id="promisc-ignores-vlans"),
    pytest.param([("promisc", 0), ("mac", 0)], frame(OTHER), True, id="new-mac"),
    pytest.param([("promisc", 0), ("mac", 0)], frame(MAC), False, id="old-mac"),
    pytest.param([("promisc", 0)], MAC + OTHER[:4], False, id="runt"),
]


@pytest.mark.parametrize(("setup", "data", "expected"), FILTER_CASES)
def test_receive_filter(rig: Rig, setup: list[tuple[str, int]], data: bytes,
                        expected: bool) -> None:
    for what, value in setup:
        if what == "table":
            ack = rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.TABLE_SET, _mac_table([OTHER], [MCAST]))
        elif what == "table-overflow":
            many = [bytes([2, 0, 0, 0, 0, i]) for i in range(80)]
            ack = rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.TABLE_SET, _mac_table(many, []))
        elif what == "vlan":
            ack = rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.ADD, struct.pack("<H", value))
        elif what == "mac":
            ack = rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.ADDR_SET, OTHER)
        else:
            ack = rig.ctrl_cmd(CtrlClass.RX, net.CtrlRx[what.upper()], bytes([value]))
        assert ack == CtrlAck.OK
    assert _delivered(rig, data) is expected
    assert rig.dev.stats.rx_filtered == (0 if expected else 1)


# -- link and reset -----------------------------------------------------------------------


def test_link_change(rig: Rig) -> None:
    generation = rig.dev.config_generation
    rig.dev.set_link(False)
    assert rig.dev.read_config(net.ConfigOffset.STATUS, 2) == b"\x00\x00"
    assert rig.irqs.config == 1
    assert rig.dev.config_generation == generation + 1
    rig.dev.set_link(False)
    assert rig.irqs.config == 1, "no change, no interrupt"
    rig.fill_rx(1)
    assert rig.dev.receive(frame()) is True
    assert rig.rx.get_used() == [] and rig.dev.stats.rx_dropped == 1
    rig.dev.set_link(True)
    assert rig.dev.read_config(net.ConfigOffset.STATUS, 2) == b"\x01\x00"
    assert rig.irqs.config == 2
    assert rig.dev.receive(frame())
    assert len(rig.rx.get_used()) == 1


def test_reset_clears_guest_state_but_not_operator_state(rig: Rig) -> None:
    rig.ctrl_cmd(CtrlClass.RX, net.CtrlRx.PROMISC, b"\x00")
    rig.ctrl_cmd(CtrlClass.MAC, net.CtrlMac.ADDR_SET, OTHER)
    rig.ctrl_cmd(CtrlClass.VLAN, net.CtrlVlan.ADD, struct.pack("<H", 5))
    rig.dev.announce()
    rig.dev.set_link(False)
    rig.dev.set_status(0)
    dev = rig.dev
    assert dev.mac == MAC
    assert dev.rx_filter.promisc and dev.rx_filter.vlans is None
    assert not dev.announce_pending
    assert dev.link_up is False, "the link is the operator's"
    assert dev.status == 0 and dev.negotiated_features == 0
    assert all(not q.enabled for q in dev.queues)
    assert dev.header_len == 10


# -- hostile drivers: NEEDS_RESET + config interrupt + one log line, never an exception ----

NEXT, WRITE, INDIRECT = ring.DescFlag.NEXT, ring.DescFlag.WRITE, ring.DescFlag.INDIRECT


def _tx_buf(rig: Rig) -> Buf:
    return rig.tx.buffers([rig.header() + frame(OTHER)], [])[0]


def _kick_tx(rig: Rig, head: int = 0) -> None:
    rig.tx.publish(head)
    rig.dev.notify(TX_QUEUE)


def hostile_loop(rig: Rig) -> None:
    buf = _tx_buf(rig)
    rig.tx.write_desc(0, buf.addr, buf.length, NEXT, 1)
    rig.tx.write_desc(1, buf.addr, buf.length, NEXT, 0)
    _kick_tx(rig)


def hostile_longer_than_queue(rig: Rig) -> None:
    buf = _tx_buf(rig)
    entries = QUEUE_SIZE + 1
    table = rig.ram.alloc(16 * entries)
    for i in range(entries):
        rig.tx.write_desc(i, buf.addr, 1, NEXT if i + 1 < entries else 0, i + 1, table=table)
    rig.tx.write_desc(0, table, 16 * entries, INDIRECT)
    _kick_tx(rig)


def hostile_head_index(rig: Rig) -> None:
    _kick_tx(rig, QUEUE_SIZE + 3)


def hostile_next_index(rig: Rig) -> None:
    buf = _tx_buf(rig)
    rig.tx.write_desc(0, buf.addr, 4, NEXT, 0xFFFF)
    _kick_tx(rig)


def hostile_unmapped_buffer(rig: Rig) -> None:
    rig.tx.write_desc(0, 0xDEAD_0000, 64, 0)
    _kick_tx(rig)


def hostile_unmapped_ring(rig: Rig) -> None:
    rig.dev.queues[TX_QUEUE].used_addr = 0x10
    rig.send(frame(OTHER))


def hostile_huge_length(rig: Rig) -> None:
    buf = _tx_buf(rig)
    rig.tx.write_desc(0, buf.addr, 0xFFFF_FFF0, 0)
    _kick_tx(rig)


def hostile_readable_after_writable(rig: Rig) -> None:
    buf = _tx_buf(rig)
    rig.tx.write_desc(0, buf.addr, buf.length, WRITE | NEXT, 1)
    rig.tx.write_desc(1, buf.addr, buf.length, 0)
    _kick_tx(rig)


def hostile_bad_indirect_length(rig: Rig) -> None:
    rig.tx.write_desc(0, _tx_buf(rig).addr, 20, INDIRECT)
    _kick_tx(rig)


def hostile_nested_indirect(rig: Rig) -> None:
    table = rig.ram.alloc(16)
    rig.tx.write_desc(0, table, 16, INDIRECT, table=table)
    rig.tx.write_desc(0, table, 16, INDIRECT)
    _kick_tx(rig)


def hostile_indirect_with_next(rig: Rig) -> None:
    table = rig.ram.alloc(16)
    rig.tx.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    _kick_tx(rig)


def hostile_avail_jump(rig: Rig) -> None:
    rig.tx.set_avail_idx(QUEUE_SIZE + 1)
    rig.dev.notify(TX_QUEUE)


def hostile_short_tx_header(rig: Rig) -> None:
    rig.tx.add([b"\x00" * 5])
    rig.dev.notify(TX_QUEUE)


def hostile_rx_readable_buffer(rig: Rig) -> None:
    # the device would have to write into a device-readable descriptor
    rig.rx.add([bytes(1536)])
    assert rig.dev.receive(frame()) is True


def hostile_rx_mergeable_buffer_below_header(rig: Rig) -> None:
    rig.rx.add([], [8])
    assert rig.dev.receive(frame()) is True


def hostile_ctrl_without_ack_buffer(rig: Rig) -> None:
    rig.ctrl.add([bytes([CtrlClass.RX, net.CtrlRx.PROMISC, 1]), bytes(1)])
    rig.dev.notify(CTRL_QUEUE)


def hostile_ctrl_without_header(rig: Rig) -> None:
    rig.ctrl.add([b"\x00"], [1])
    rig.dev.notify(CTRL_QUEUE)


HOSTILE: list[tuple[Callable[[Rig], None], str]] = [
    (hostile_loop, "queue 1: descriptor loop: chain 0 returns to descriptor table entry 0"),
    (hostile_longer_than_queue, "queue 1: chain 0 is longer than the queue size 64"),
    (hostile_head_index, "queue 1: available ring slot 0 names descriptor 67, but the queue "
                         "has 64"),
    (hostile_next_index, "queue 1: chain 0: descriptor table entry 0 links to 65535, but "
                         "there are only 64 entries"),
    (hostile_unmapped_buffer, "queue 1: chain 0: device-readable buffer of descriptor table "
                              "entry 0: guest memory [0xdead0000, +0x40) not mapped"),
    (hostile_unmapped_ring, "queue 1: used ring at 0x10"),
    (hostile_huge_length, "queue 1: chain 0 is 4294967280 bytes or more at descriptor table "
                          "entry 0, over the"),
    (hostile_readable_after_writable, "queue 1: chain 0: device-readable descriptor table "
                                      "entry 1 follows a device-writable one"),
    (hostile_bad_indirect_length, "queue 1: chain 0: indirect table length 20 is not a "
                                  "non-zero multiple of 16"),
    (hostile_nested_indirect, "indirect table entry 0 is itself INDIRECT"),
    (hostile_indirect_with_next, "queue 1: chain 0: descriptor 0 has both INDIRECT and NEXT"),
    (hostile_avail_jump, "queue 1: available index moved from 0 to 65, more than the queue "
                         "size 64 ahead"),
    (hostile_short_tx_header, "queue 1: transmit chain 0 has 5 device-readable bytes, less "
                              "than the 12-byte virtio-net header"),
    (hostile_rx_readable_buffer, "queue 0: receive chain 0 has 1536 device-readable and 0 "
                                 "device-writable bytes"),
    (hostile_rx_mergeable_buffer_below_header, "queue 0: mergeable receive buffer 0 holds 8 "
                                               "bytes, less than the 12-byte header"),
    (hostile_ctrl_without_ack_buffer, "queue 2: control chain 0 lacks"),
    (hostile_ctrl_without_header, "queue 2: control chain 0 lacks"),
]


@pytest.mark.parametrize(("act", "message"), [pytest.param(a, m, id=a.__name__[8:])
                                              for a, m in HOSTILE])
def test_hostile_driver(act: Callable[[Rig], None], message: str,
                        caplog: pytest.LogCaptureFixture) -> None:
    rig = make_rig()
    with caplog.at_level(logging.WARNING):
        act(rig)  # must not raise
        # the device stays stopped: more kicks, frames and errors change nothing
        rig.dev.notify(TX_QUEUE)
        rig.dev.notify(CTRL_QUEUE)
        assert rig.dev.receive(frame()) is True
        rig.dev.needs_reset("second error")
    assert rig.dev.status & DeviceStatus.NEEDS_RESET
    assert rig.irqs.config == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("virtio-net: device needs reset: ")
    assert message in warnings[0]
    assert rig.peer.sent == []
    # and a reset brings it back
    rig.dev.set_status(0)
    assert not rig.dev.broken


def test_hostile_ring_never_writes_outside_guest_memory() -> None:
    rig = make_rig()
    before = bytes(rig.ram.backing)
    rig.dev.queues[TX_QUEUE].used_addr = rig.ram.end - 100  # used ring would run past RAM
    rig.send(frame(OTHER))
    assert rig.dev.broken
    assert rig.peer.sent == []
    # only the driver's own writes (descriptor, avail ring, buffer) changed memory
    changed = [i for i, (a, b) in enumerate(zip(before, rig.ram.backing, strict=True)) if a != b]
    assert all(rig.ram.base + i < rig.ram.end - 100 for i in changed)
