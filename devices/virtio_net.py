"""The virtio network device (virtio 1.x §5.1), modelled on QEMU hw/net/virtio-net.c.

One receive queue (0), one transmit queue (1) and the control queue (2). Frames go out to
a :class:`NetPeer` (the server's tap or socket backend) and come in through
:meth:`VirtioNet.receive`. The device offers checksum and segmentation offloads only when
the peer carries a virtio-net header, because only then can the other end honour them.

Receive filtering (promiscuous/all-multicast/... modes, the MAC table, the VLAN filter)
follows QEMU's receive_filter(); the control queue commands and their acks follow
virtio_net_handle_ctrl(). A reset restores everything but the MAC address the operator
configured and the link state the operator set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vfuserver.devices.errors import GuestError, HostError
from vfuserver.devices.virtio import VirtioDevice, VirtioInterrupts
from vfuserver.devices.virtqueue import DescriptorChain, VirtQueue, VirtQueueError
from vfuserver.protocol import virtio_net as net
from vfuserver.protocol.virtio import DeviceType, Feature
from vfuserver.protocol.virtio_net import CtrlAck, CtrlClass, NetFeature, NetStatus

if TYPE_CHECKING:
    from vfuserver.devices.memory import Buffer, GuestMemory

RX_QUEUE = 0
TX_QUEUE = 1
CTRL_QUEUE = 2
NUM_QUEUES = 3

MAC_TABLE_ENTRIES = 64
"""Unicast + multicast filter entries kept; more set the overflow flags (QEMU)."""

TX_BURST = 256
"""Frames sent per notify when the server reschedules the rest (QEMU's tx_burst)."""
TX_MAX_CHAIN_BYTES = net.HDR_LEN + net.MAX_GSO_FRAME + 2 * net.VLAN_HLEN
"""Largest transmit chain: header + the largest GSO frame + two VLAN tags."""
RX_MAX_CHAIN_BYTES = 1 << 20
"""Receive chains are only written up to the frame, so this just bounds hostile ones
(Linux "big packets" chains are (MAX_SKB_FRAGS + 1) pages plus the header)."""
CTRL_MAX_CHAIN_BYTES = 64 * 1024
"""A MAC table of some 10000 addresses; larger commands are hostile."""

BASE_FEATURES = (
    NetFeature.MAC.mask
    | NetFeature.MTU.mask
    | NetFeature.STATUS.mask
    | NetFeature.MRG_RXBUF.mask
    | NetFeature.CTRL_VQ.mask
    | NetFeature.CTRL_RX.mask
    | NetFeature.CTRL_RX_EXTRA.mask
    | NetFeature.CTRL_VLAN.mask
    | NetFeature.CTRL_MAC_ADDR.mask
    | NetFeature.GUEST_ANNOUNCE.mask
    | Feature.VERSION_1.mask
    | Feature.RING_INDIRECT_DESC.mask
    | Feature.RING_EVENT_IDX.mask
    | Feature.ANY_LAYOUT.mask
)
"""Offered always (ANY_LAYOUT is shown to legacy drivers only)."""
OFFLOAD_FEATURES = (
    NetFeature.CSUM.mask
    | NetFeature.GUEST_CSUM.mask
    | NetFeature.HOST_TSO4.mask
    | NetFeature.HOST_TSO6.mask
    | NetFeature.HOST_ECN.mask
    | NetFeature.GUEST_TSO4.mask
    | NetFeature.GUEST_TSO6.mask
    | NetFeature.GUEST_ECN.mask
    | NetFeature.CTRL_GUEST_OFFLOADS.mask
)
"""Offered when the peer carries a virtio-net header (it can take and give offloads)."""

# Plain ints for the per-frame paths: an IntFlag operand sends each `&` through enum's
# Python-level operators, and FeatureBit.mask is a property.
_NEEDS_CSUM = int(net.HdrFlag.NEEDS_CSUM)
_CSUM_FLAGS = int(net.HdrFlag.NEEDS_CSUM | net.HdrFlag.DATA_VALID)
_GSO_NONE = int(net.GsoType.NONE)
_GUEST_ECN = NetFeature.GUEST_ECN.mask
_GUEST_CSUM = NetFeature.GUEST_CSUM.mask

_GSO_NEEDS: dict[int, int] = {
    net.GsoType.TCPV4: NetFeature.GUEST_TSO4.mask,
    net.GsoType.TCPV6: NetFeature.GUEST_TSO6.mask,
    net.GsoType.UDP: NetFeature.GUEST_UFO.mask,
    net.GsoType.UDP_L4: NetFeature.GUEST_USO4.mask | NetFeature.GUEST_USO6.mask,
}
"""Guest offload a received GSO packet of each type needs."""


class NetPeer(Protocol):
    """The other end of the wire; implemented by the server's network backends."""

    vnet_hdr: bool
    """Frames to and from the peer carry a 12-byte virtio_net_hdr_v1 in front."""

    def send(self, frame: Buffer) -> None:
        """Send one frame (with the header in front iff :attr:`vnet_hdr`). Must not block;
        raise HostError if the frame cannot be sent."""
        ...


class TxEngine(Protocol):
    """Transmit work done outside the model, on the same ring state (the server's C data
    path, vfuserver/netpath.py NetPath.transmit)."""

    def __call__(self, queue: VirtQueue, limit: int, publish: bool) -> tuple[int, bool, bool]:
        """Send up to ``limit`` chains of an idle ``queue`` (:meth:`VirtQueue.idle`)
        exactly as :meth:`VirtioNet._drain_tx` would, counting them in the device's and
        the peer's stats. Returns (chains done, finished, interrupt): finished if the ring
        has no more or ``limit`` went, every entry published; otherwise the next chain is
        the model's, and entries not yet published are its next flush's. ``interrupt``:
        a publish it made wants the driver interrupted."""
        ...


TX_ENGINE_ALL = 1 << 31
"""The ``limit`` of :class:`TxEngine` for "all available"."""


@dataclass
class NetStats:
    """Counters, for the operator; never reset by the guest."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    """Frames the guest sent while the link was down or that were empty."""
    tx_errors: int = 0
    """Frames the peer refused (HostError)."""
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_filtered: int = 0
    rx_dropped: int = 0
    """Frames that could not be delivered: device not ready, link down, too big..."""
    rx_no_buffers: int = 0
    """receive() calls answered False for lack of receive buffers."""


@dataclass
class RxFilter:
    """Receive mode and filters set through the control queue (QEMU VirtIONet fields)."""

    promisc: bool = True
    """QEMU starts promiscuous: a driver without CTRL_RX never gets to filter."""
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: list[bytes] = field(default_factory=list)
    multicast: list[bytes] = field(default_factory=list)
    uni_overflow: bool = False
    multi_overflow: bool = False
    vlans: set[int] | None = None
    """VLAN ids let through; None = no VLAN filtering (CTRL_VLAN not negotiated)."""

    def accepts(self, frame: memoryview, mac: bytes) -> bool:
        """QEMU receive_filter(): whether a frame for this device passes the filters."""
        if self.promisc:
            return True
        if len(frame) < net.ETH_HLEN:
            return False
        if self.vlans is not None:
            vid = net.vlan_id(frame)
            if vid is not None and vid not in self.vlans:
                return False
        dest = bytes(frame[: net.ETH_ALEN])
        if dest[0] & 1:  # group address
            if dest == net.BROADCAST_MAC:
                return not self.nobcast
            if self.nomulti:
                return False
            if self.allmulti or self.multi_overflow:
                return True
            return dest in self.multicast
        if self.nouni:
            return False
        if self.alluni or self.uni_overflow:
            return True
        return dest == mac or dest in self.unicast


class VirtioNet(VirtioDevice):
    """A virtio-net device with one queue pair and a control queue."""

    device_id = DeviceType.NET
    legacy_only_features = VirtioDevice.legacy_only_features | NetFeature.GSO.mask
    # What Linux 2.6.25 understood (QEMU virtio_net_bad_features)
    bad_features = (NetFeature.MAC.mask | NetFeature.CSUM.mask | NetFeature.HOST_TSO4.mask
                    | NetFeature.HOST_TSO6.mask | NetFeature.HOST_ECN.mask)

    def __init__(
        self,
        memory: GuestMemory,
        interrupts: VirtioInterrupts,
        peer: NetPeer,
        *,
        mac: bytes,
        mtu: int = 1500,
        link_up: bool = True,
        queue_max_size: int = 256,
        name: str = "virtio-net",
    ) -> None:
        if len(mac) != net.ETH_ALEN:
            raise ValueError(f"MAC address must be {net.ETH_ALEN} bytes, not {len(mac)}")
        if not net.MTU_MIN <= mtu <= net.MTU_MAX:
            raise ValueError(f"MTU {mtu} outside {net.MTU_MIN}..{net.MTU_MAX}")
        features = BASE_FEATURES | (OFFLOAD_FEATURES if peer.vnet_hdr else 0)
        super().__init__(
            memory,
            interrupts,
            queue_max_size=queue_max_size,
            name=name,
            num_queues=NUM_QUEUES,
            features=features,
        )
        self.queues[RX_QUEUE].max_chain_bytes = RX_MAX_CHAIN_BYTES
        self.queues[TX_QUEUE].max_chain_bytes = TX_MAX_CHAIN_BYTES
        self.queues[CTRL_QUEUE].max_chain_bytes = CTRL_MAX_CHAIN_BYTES
        self.peer = peer
        self.operator_mac = bytes(mac)
        self.mtu = mtu
        self.link_up = link_up
        self.stats = NetStats()
        self.on_rx_buffers: Callable[[], None] | None = None
        """Called when the driver adds receive buffers (kicks the receive queue), e.g.
        after :meth:`receive` returned False."""
        self.on_tx_pending: Callable[[], None] | None = None
        """If set, a transmit kick only calls this, and the server is to call
        :meth:`run_tx` soon, which sends at most :attr:`tx_burst` frames and calls this
        again while more wait (QEMU's tx bottom half). If None, a kick sends everything
        available at once."""
        self.tx_burst = TX_BURST
        self.tx_engine: TxEngine | None = None
        """If set, transmit chains go through it first; the model sends what it leaves
        (a chain it cannot take as it is, or the rest after a tap that would block)."""
        self.on_guest_offloads: Callable[[int], None] | None = None
        """Called with the new guest offload bits (GUEST_CSUM/TSO4/...) when they change,
        so the server can tell its backend (e.g. TUNSETOFFLOAD)."""
        self.mac = self.operator_mac
        self.rx_filter = RxFilter()
        self.announce_pending = False
        self.rx_busy = False
        """A GSO packet (a stream the host's stack coalesced) reached the guest since a
        lingering transmit run last found nothing: the next such run leaves the driver's
        notifications off once more (:meth:`run_tx`)."""
        self.guest_offloads = 0
        self.guest_gso_types = (0, False)
        """The received GSO packets the guest takes, from its offloads (§5.1.6.4.1): a
        bitmask with bit ``t`` set for each GsoType ``t`` it has the offload for, and
        whether it takes them with the ECN bit (GUEST_ECN)."""
        self.header_len = net.HDR_LEN_LEGACY
        self.mergeable_rx = False
        self.reset()

    # -- state ------------------------------------------------------------------------

    def _reset_device(self) -> None:
        self.mac = self.operator_mac
        self.rx_filter = RxFilter()
        self.announce_pending = False
        self.rx_busy = False
        self.header_len = net.header_length(version_1=False, mrg_rxbuf=False)
        self.mergeable_rx = False
        self._set_guest_offloads(0)

    def _validate_features(self, features: int) -> str | None:
        missing = net.missing_requirements(features)
        if missing:
            feature, needs = missing[0]
            names = " or ".join(need.name for need in needs)
            return f"{feature.name} accepted without {names}"
        return None

    def _features_changed(self) -> None:
        self.mergeable_rx = self.has_feature(NetFeature.MRG_RXBUF)
        self.header_len = net.header_length(
            version_1=self.has_feature(Feature.VERSION_1), mrg_rxbuf=self.mergeable_rx
        )
        # QEMU virtio_net_set_features: with CTRL_VLAN every VLAN starts filtered.
        self.rx_filter.vlans = set() if self.has_feature(NetFeature.CTRL_VLAN) else None
        self._set_guest_offloads(self.negotiated_features & net.GUEST_OFFLOAD_FEATURES)

    def _set_guest_offloads(self, offloads: int) -> None:
        changed = offloads != self.guest_offloads
        self.guest_offloads = offloads
        types = 0
        for gso, needs in _GSO_NEEDS.items():
            if offloads & needs:
                types |= 1 << gso
        self.guest_gso_types = (types, bool(offloads & _GUEST_ECN))
        if changed and self.on_guest_offloads is not None:
            self.on_guest_offloads(offloads)

    @property
    def net_status(self) -> int:
        """The config ``status`` field."""
        return (NetStatus.LINK_UP if self.link_up else 0) | (
            NetStatus.ANNOUNCE if self.announce_pending else 0
        )

    def _config_bytes(self) -> bytes:
        return net.CONFIG_HEAD_STRUCT.pack(self.mac, self.net_status, 1, self.mtu)

    @property
    def legacy_config_size(self) -> int:
        """offsetofend(virtio_net_config, status), as Linux's virtio-vfio-pci sizes the
        legacy BAR for the net functions it serves."""
        return net.CONFIG_SIZE_LEGACY

    def _write_config(self, offset: int, data: bytes) -> None:
        # Only the legacy interface lets the driver write the MAC, and only while
        # CTRL_MAC_ADDR is not negotiated (QEMU virtio_net_set_config).
        start, end = max(offset, net.ConfigOffset.MAC), min(offset + len(data), net.ETH_ALEN)
        if not self.legacy or self.has_feature(NetFeature.CTRL_MAC_ADDR) or start >= end:
            self.log.debug("%s: config write at %#x ignored", self.name, offset)
            return
        mac = bytearray(self.mac)
        mac[start:end] = data[start - offset : end - offset]
        self.mac = bytes(mac)

    def set_link(self, up: bool) -> None:
        """Operator: carrier on or off; the driver gets a configuration interrupt."""
        if up == self.link_up:
            return
        self.link_up = up
        self.config_changed()

    def announce(self) -> bool:
        """Operator (e.g. after migration): ask the guest to send gratuitous packets.

        Sets ANNOUNCE in the status with a configuration interrupt; the driver clears it
        with VIRTIO_NET_CTRL_ANNOUNCE_ACK. False if the driver cannot (GUEST_ANNOUNCE not
        negotiated or not running).
        """
        if not (self.driver_ok and self.has_feature(NetFeature.GUEST_ANNOUNCE)) or self.broken:
            return False
        self.announce_pending = True
        self.config_changed()
        return True

    # -- queue dispatch ---------------------------------------------------------------

    def _handle_queue(self, queue: VirtQueue) -> None:
        if queue.index == TX_QUEUE:
            if self.on_tx_pending is not None:
                # QEMU's tx bottom half: a kick only schedules the work, so the kick (a
                # synchronous IO-port write for a legacy driver) is answered at once and
                # the vCPU goes on; further kicks are suppressed until run_tx() runs.
                queue.set_notification(False)
                self.on_tx_pending()
                return
            self._process_tx(queue)
        elif queue.index == CTRL_QUEUE:
            self._process_ctrl(queue)
        elif self.on_rx_buffers is not None:
            self.on_rx_buffers()

    def _driver_ok(self) -> None:
        # Work the driver queued before DRIVER_OK (QEMU reschedules its tx bh on status
        # changes), and let a waiting receiver retry.
        for index in (TX_QUEUE, CTRL_QUEUE):
            self.notify(index)
        if self.queues[RX_QUEUE].enabled and self.on_rx_buffers is not None:
            self.on_rx_buffers()

    # -- transmit ---------------------------------------------------------------------

    def run_tx(self, *, linger: bool = False, resume: tuple[int, int] | None = None) -> bool:
        """Transmit what the driver queued (the server's transmit bottom half, scheduled
        through :attr:`on_tx_pending`): at most :attr:`tx_burst` frames, then it is
        scheduled again if more wait. Never raises for guest mistakes.

        With ``linger``, a run that sent frames leaves the driver's notifications off and
        returns True: the caller runs it again shortly (QEMU's tx timer,
        virtio_net_handle_tx_timer), so a driver that keeps transmitting is not made to
        notify, a synchronous round trip for a legacy driver, for every frame. A run that
        finds nothing turns them back on and returns False. The used entries of lingering
        runs are held back, as a NIC coalesces transmit completions (ethtool's
        tx-usecs/tx-frames): they are published by the run that finds nothing more (one
        timer period after the driver pauses), once half the ring waits for them, or when
        a burst is cut. The frames themselves are not delayed; a guest whose TCP stack
        waits for its completions (TSQ) sends fewer, larger segments and takes fewer
        interrupts. While the guest receives a stream (:attr:`rx_busy`: a GSO packet
        since the last run that found nothing), such a run still leaves notifications
        off and lingers once more, so the acknowledgements the driver queues right after
        are picked up by the next run instead of each notifying, as vhost-net polls the
        transmit ring while it receives (drivers/vhost/net.c, vhost_net_busy_poll).

        ``resume``: (budget, sent) of a run whose first drain another engine stopped part
        way (vfuserver/netpath.py NetRun): the run goes on from there, with ``sent`` of
        the ``budget`` chains it had already sent."""
        queue = self.queues[TX_QUEUE]
        if not queue.enabled or not self.may_process():
            return False
        try:
            return self._process_tx(queue, linger, resume)
        except GuestError as err:
            self.needs_reset(str(err))
            return False

    def _process_tx(self, queue: VirtQueue, linger: bool = False,
                    resume: tuple[int, int] | None = None) -> bool:
        # With on_tx_pending set, at most tx_burst frames per call (QEMU virtio_net_flush_tx
        # and its tx_burst): a guest that transmits without pause cannot starve the loop.
        budget = self.tx_burst if self.on_tx_pending is not None else None
        if resume is None and queue.unpublished and (
                not linger or queue.unpublished >= queue.size // 2):
            # completions that lingering runs held back: half the ring waits for them
            self._publish_tx(queue)
        while True:
            if resume is not None:
                # the first drain, which another engine began (notifications already off)
                budget, sent = resume
                resume = None
                done = sent + self._drain_tx(queue, budget - sent, publish=not linger)
            else:
                queue.set_notification(False)
                done = self._drain_tx(queue, budget, publish=not linger)
            if budget is not None and self.on_tx_pending is not None:
                budget -= done
                if budget <= 0 and queue.available():
                    # Notifications stay off; the server calls notify(TX_QUEUE) again soon.
                    self._publish_tx(queue)
                    self.on_tx_pending()
                    return False
            if linger and done:
                return True  # notifications stay off until a run finds nothing
            if queue.unpublished:
                self._publish_tx(queue)  # the driver paused: it gets its completions
            if linger and self.rx_busy:
                self.rx_busy = False
                return True  # a stream comes in: its acknowledgements are looked for
            queue.set_notification(True)
            # A kick may have been suppressed while notifications were off: look again.
            if not queue.available():
                return False

    def _publish_tx(self, queue: VirtQueue) -> None:
        if queue.flush():
            self.queue_interrupt(queue)

    def _drain_tx(self, queue: VirtQueue, limit: int | None, *, publish: bool = True) -> int:
        """Send up to ``limit`` (None: all) available frames; returns how many. Without
        ``publish`` their used entries wait for the next :meth:`VirtQueue.flush`."""
        hdr_len = self.header_len
        done = 0
        engine = self.tx_engine
        if engine is not None and self.link_up and queue.idle():
            done, finished, interrupt = engine(queue, TX_ENGINE_ALL if limit is None else limit,
                                               publish)
            if interrupt:
                self.queue_interrupt(queue)
            if finished:
                return done
        while limit is None or done < limit:
            chain = queue.pop()
            if chain is None:
                break
            if queue.unpublished >= queue.size:
                # a used ring holds no more than its size: a driver that offers again what
                # it has not seen completed must not get entries overwritten unseen
                self._publish_tx(queue)
            if chain.readable_len < hdr_len:
                raise VirtQueueError(
                    f"queue {queue.index}: transmit chain {chain.head} has "
                    f"{chain.readable_len} device-readable bytes, less than the "
                    f"{hdr_len}-byte virtio-net header"
                )
            if self.link_up:
                self._transmit(chain.read(), hdr_len)
            else:
                self.stats.tx_dropped += 1  # QEMU virtio_net_drop_tx_queue_data
            queue.push(chain, 0)
            done += 1
        if publish:
            self._publish_tx(queue)
        return done

    def _transmit(self, data: bytes, hdr_len: int) -> None:
        frame = memoryview(data)[hdr_len:]
        if not frame:
            self.stats.tx_dropped += 1
            return
        out: Buffer
        if self.peer.vnet_hdr:
            # The peer takes virtio_net_hdr_v1; a legacy 10-byte header gets num_buffers 0.
            out = data if hdr_len == net.HDR_LEN else data[:hdr_len] + b"\0\0" + frame
        elif data[0] & _NEEDS_CSUM:
            # Only a driver that broke the rules asks a headerless peer for a checksum
            # (CSUM is not offered then); finishing it costs little and keeps the frame.
            _, _, _, _, csum_start, csum_offset = net.HDR_LEGACY_STRUCT.unpack_from(data)
            buf = bytearray(frame)
            net.complete_checksum(buf, csum_start, csum_offset)
            out = buf
        else:
            out = frame
        try:
            self.peer.send(out)
        except HostError as err:
            self.stats.tx_errors += 1
            self.ratelimited.log(logging.WARNING, "%s: transmit failed: %s", self.name, err)
            return
        self.stats.tx_packets += 1
        self.stats.tx_bytes += len(frame)

    # -- receive ----------------------------------------------------------------------

    def receive(self, frame: Buffer, vnet_hdr: bytes | None = None) -> bool:
        """Deliver one frame from the peer to the guest.

        ``vnet_hdr`` is the peer's virtio_net_hdr for the frame (10 or 12 bytes), if it
        carries one. Returns True if the frame was consumed: delivered, filtered or
        dropped. Returns False if the receive queue has no room now; notifications are
        then enabled and :attr:`on_rx_buffers` fires when the driver adds buffers.
        """
        view = memoryview(frame)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        queue = self.queues[RX_QUEUE]
        if not (self.driver_ok and self.link_up and queue.enabled) or self.broken:
            self.stats.rx_dropped += 1
            return True
        if not self.rx_filter.accepts(view, self.mac):
            self.stats.rx_filtered += 1
            return True
        prepared = self._rx_header(view, vnet_hdr)
        if prepared is None:
            self.stats.rx_dropped += 1
            return True
        header, payload = prepared
        try:
            return self._place_rx(queue, header, payload)
        except GuestError as err:
            self.needs_reset(str(err))
            return True

    def _rx_header(
        self, frame: memoryview, vnet_hdr: bytes | None
    ) -> tuple[bytearray, memoryview] | None:
        """The guest header for ``frame`` and the frame to deliver, or None to drop it.

        Offloads the peer used but the guest has not enabled are undone where that is
        cheap (a partial checksum is completed) and the frame dropped where it is not (a
        GSO frame the guest cannot take; the server should have told the backend through
        :attr:`on_guest_offloads`).
        """
        flags = gso_type = hdr_len = gso_size = csum_start = csum_offset = 0
        if vnet_hdr is not None:
            if len(vnet_hdr) < net.HDR_LEN_LEGACY:
                raise ValueError(f"peer virtio-net header of {len(vnet_hdr)} bytes")
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = (
                net.HDR_LEGACY_STRUCT.unpack_from(vnet_hdr)
            )
        offloads = self.guest_offloads
        gso = gso_type & ~net.GSO_ECN
        if gso != _GSO_NONE:
            types, ecn = self.guest_gso_types
            if not (types >> gso) & 1 or (gso_type & net.GSO_ECN and not ecn):
                self.ratelimited.log(
                    logging.DEBUG,
                    "%s: dropped GSO frame (type %#x) the guest cannot take",
                    self.name,
                    gso_type,
                )
                return None
        elif self.has_feature(NetFeature.MTU) and len(frame) > (
            self.mtu + net.ETH_HLEN + net.VLAN_HLEN
        ):
            # §5.1.4.2: no non-GSO packet bigger than mtu + link header once MTU is in use.
            return None
        if not offloads & _GUEST_CSUM:
            if flags & _NEEDS_CSUM:
                buf = bytearray(frame)
                net.complete_checksum(buf, csum_start, csum_offset)
                frame = memoryview(buf)
            flags &= ~_CSUM_FLAGS
        header = bytearray(
            net.HDR_STRUCT.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 1)
        )
        return header[: self.header_len], frame

    def _place_rx(self, queue: VirtQueue, header: bytearray, frame: memoryview) -> bool:
        """Copy header + frame into receive buffers (QEMU virtio_net_receive_rcu)."""
        total = len(header) + len(frame)
        for attempt in range(2):
            chains = self._collect_rx(queue, total)
            capacity = sum(chain.writable_len for chain in chains)
            if capacity >= total:
                break
            queue.rewind(chains)
            if chains and (not self.mergeable_rx or len(chains) == queue.size):
                # It can never fit: one buffer too small without MRG_RXBUF (QEMU drops the
                # packet and keeps the buffer), or the whole ring is too small.
                self.stats.rx_dropped += 1
                self.ratelimited.log(
                    logging.DEBUG,
                    "%s: %d-byte packet dropped: receive buffers hold %d",
                    self.name,
                    total,
                    capacity,
                )
                return True
            # Ask for a kick (avail_event = the current index, so after the rewind), then
            # look once more in case buffers came in before the driver could see that.
            queue.set_notification(True)
            if attempt == 1:
                self.stats.rx_no_buffers += 1
                return False
        queue.set_notification(False)
        if self.header_len == net.HDR_LEN:
            net.NUM_BUFFERS_STRUCT.pack_into(header, net.NUM_BUFFERS_OFFSET, len(chains))
        pos = 0
        for i, chain in enumerate(chains):
            written = 0
            if i == 0:  # the header goes in the first buffer only (virtio_net_receive_rcu)
                written = chain.write(header)
            take = min(chain.writable_len - written, len(frame) - pos)
            written += chain.write(frame[pos : pos + take], written)
            pos += take
            queue.push(chain, written)
        if header[1] & ~net.GSO_ECN != _GSO_NONE:
            self.rx_busy = True
        if queue.flush():
            self.queue_interrupt(queue)
        self.stats.rx_packets += 1
        self.stats.rx_bytes += len(frame)
        return True

    def _collect_rx(self, queue: VirtQueue, total: int) -> list[DescriptorChain]:
        """Pop receive chains until they hold ``total`` bytes (one without MRG_RXBUF)."""
        chains: list[DescriptorChain] = []
        capacity = 0
        while capacity < total:
            chain = queue.pop()
            if chain is None:
                break
            if chain.readable_len or not chain.writable_len:
                raise VirtQueueError(
                    f"queue {queue.index}: receive chain {chain.head} has "
                    f"{chain.readable_len} device-readable and {chain.writable_len} "
                    "device-writable bytes; receive buffers must be device-writable"
                )
            if self.mergeable_rx and chain.writable_len < self.header_len:
                raise VirtQueueError(
                    f"queue {queue.index}: mergeable receive buffer {chain.head} holds "
                    f"{chain.writable_len} bytes, less than the {self.header_len}-byte header"
                )
            chains.append(chain)
            capacity += chain.writable_len
            if not self.mergeable_rx:
                break
        return chains

    # -- control queue (§5.1.6.5) -----------------------------------------------------

    def _process_ctrl(self, queue: VirtQueue) -> None:
        if not self.has_feature(NetFeature.CTRL_VQ):
            # The control queue exists only with CTRL_VQ; kicks on it mean nothing.
            return
        while (chain := queue.pop()) is not None:
            if chain.readable_len < net.CTRL_HDR_SIZE or chain.writable_len < net.CTRL_ACK_SIZE:
                # QEMU: "virtio-net ctrl missing headers"
                raise VirtQueueError(
                    f"queue {queue.index}: control chain {chain.head} lacks the "
                    f"{net.CTRL_HDR_SIZE}-byte device-readable command header or the "
                    f"device-writable ack byte ({chain.readable_len} readable, "
                    f"{chain.writable_len} writable)"
                )
            data = chain.read()
            ack = self._control(data[0], data[1], data[net.CTRL_HDR_SIZE :])
            chain.write(bytes([ack]))
            queue.push(chain, net.CTRL_ACK_SIZE)
        if queue.flush():
            self.queue_interrupt(queue)

    def _control(self, ctrl_class: int, command: int, data: bytes) -> CtrlAck:
        handler = _CTRL_HANDLERS.get(ctrl_class)
        ack = CtrlAck.ERR if handler is None else handler(self, command, data)
        if ack != CtrlAck.OK:
            self.ratelimited.log(
                logging.DEBUG,
                "%s: control class %d command %d (%d bytes) refused",
                self.name,
                ctrl_class,
                command,
                len(data),
            )
        return ack

    def _ctrl_rx(self, command: int, data: bytes) -> CtrlAck:
        if not self.has_feature(NetFeature.CTRL_RX) or len(data) != 1:
            return CtrlAck.ERR
        if command > net.CtrlRx.ALLMULTI and not self.has_feature(NetFeature.CTRL_RX_EXTRA):
            return CtrlAck.ERR
        try:
            name = net.CtrlRx(command).name.lower()
        except ValueError:
            return CtrlAck.ERR
        setattr(self.rx_filter, name, data[0] != 0)
        return CtrlAck.OK

    def _ctrl_mac(self, command: int, data: bytes) -> CtrlAck:
        if command == net.CtrlMac.ADDR_SET:
            if not self.has_feature(NetFeature.CTRL_MAC_ADDR) or len(data) != net.ETH_ALEN:
                return CtrlAck.ERR
            self.mac = bytes(data)
            self.config_updated()
            return CtrlAck.OK
        if command != net.CtrlMac.TABLE_SET or not self.has_feature(NetFeature.CTRL_RX):
            return CtrlAck.ERR
        tables = net.parse_mac_table_set(data)
        if tables is None:
            return CtrlAck.ERR
        unicast, multicast = tables
        rx = self.rx_filter
        # QEMU virtio_net_handle_mac: a table that does not fit sets the overflow flag
        # (that kind of address then passes unfiltered).
        rx.uni_overflow = len(unicast) > MAC_TABLE_ENTRIES
        rx.unicast = [] if rx.uni_overflow else unicast
        rx.multi_overflow = len(multicast) > MAC_TABLE_ENTRIES - len(rx.unicast)
        rx.multicast = [] if rx.multi_overflow else multicast
        return CtrlAck.OK

    def _ctrl_vlan(self, command: int, data: bytes) -> CtrlAck:
        vlans = self.rx_filter.vlans
        if vlans is None or len(data) != net.VLAN_ID_STRUCT.size:
            return CtrlAck.ERR
        (vid,) = net.VLAN_ID_STRUCT.unpack(data)
        if vid >= net.MAX_VLAN:
            return CtrlAck.ERR
        if command == net.CtrlVlan.ADD:
            vlans.add(vid)
        elif command == net.CtrlVlan.DEL:
            vlans.discard(vid)
        else:
            return CtrlAck.ERR
        return CtrlAck.OK

    def _ctrl_announce(self, command: int, data: bytes) -> CtrlAck:
        if command != net.CtrlAnnounce.ACK or not self.announce_pending:
            return CtrlAck.ERR
        self.announce_pending = False
        self.config_changed(interrupt=False)
        return CtrlAck.OK

    def _ctrl_mq(self, command: int, data: bytes) -> CtrlAck:
        # MQ and RSS are not offered: one queue pair, nothing to steer.
        return CtrlAck.ERR

    def _ctrl_guest_offloads(self, command: int, data: bytes) -> CtrlAck:
        if (
            command != net.CtrlGuestOffloads.SET
            or not self.has_feature(NetFeature.CTRL_GUEST_OFFLOADS)
            or len(data) != net.OFFLOADS_STRUCT.size
        ):
            return CtrlAck.ERR
        (offloads,) = net.OFFLOADS_STRUCT.unpack(data)
        allowed = self.negotiated_features & net.GUEST_OFFLOAD_FEATURES
        if offloads & ~allowed:
            return CtrlAck.ERR
        self._set_guest_offloads(offloads)
        return CtrlAck.OK


_CTRL_HANDLERS: dict[int, Callable[[VirtioNet, int, bytes], CtrlAck]] = {
    CtrlClass.RX: VirtioNet._ctrl_rx,
    CtrlClass.MAC: VirtioNet._ctrl_mac,
    CtrlClass.VLAN: VirtioNet._ctrl_vlan,
    CtrlClass.ANNOUNCE: VirtioNet._ctrl_announce,
    CtrlClass.MQ: VirtioNet._ctrl_mq,
    CtrlClass.GUEST_OFFLOADS: VirtioNet._ctrl_guest_offloads,
}
