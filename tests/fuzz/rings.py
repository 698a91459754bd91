"""Fuzz target 2: descriptor chains and split rings, laid out in the test driver's guest RAM.

Each input builds a fresh virtio-net (modern or legacy, features from the input) whose
three queues the test driver places in small guest RAM (tests/devices/driver.py), then
runs operations: write descriptors (addresses mostly inside RAM, any flags, any next),
publish heads on the avail ring with any avail idx, write raw RAM (indirect tables, ring
fields), kick a queue, deliver a frame from the peer, run the transmit bottom half, flip
the notification fields. notify, receive and run_tx never raise for guest mistakes (their
contract): the device processes the chains or goes NEEDS_RESET. Any exception is a
finding (the device's own bug checks raise RuntimeError: a head pushed that it does not
hold), as is more chains completed (pushed) in one operation than the queue holds, or more
chains in flight than the queue holds.
"""

from __future__ import annotations

from tests.devices.driver import (
    DESC,
    RAM_BASE,
    DriverQueue,
    GuestRam,
    RecordingInterrupts,
    RecordingPeer,
    driver_ok,
    negotiate_legacy,
    negotiate_modern,
)
from tests.fuzz.harness import ByteReader, Finding
from vfuserver.devices.virtio_net import NetPeer, VirtioNet
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio import Feature
from vfuserver.protocol.virtio_net import NetFeature

RAM_SIZE = 64 << 10
MAX_QUEUE_SIZE = 64
MAC = bytes.fromhex("525400abcdef")

FEATURE_CHOICES = (Feature.VERSION_1, Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX,
                   NetFeature.MRG_RXBUF, NetFeature.CTRL_VQ, NetFeature.CTRL_RX,
                   NetFeature.CTRL_VLAN, NetFeature.CSUM, NetFeature.GUEST_CSUM,
                   NetFeature.CTRL_MAC_ADDR, NetFeature.GUEST_ANNOUNCE, NetFeature.MQ,
                   NetFeature.CTRL_GUEST_OFFLOADS, NetFeature.HOST_TSO4, NetFeature.GUEST_TSO4,
                   NetFeature.MTU)
"""Features the input turns on or off, one bit each (the others are offered as is)."""

LEGACY, CONTIGUOUS = 1, 2
"""Flag bits of the first byte."""


class RingsTarget:
    """Operation codes (first byte of each operation, modulo 8)."""

    DESCRIPTOR, PUBLISH, RAM, KICK, RECEIVE, TRANSMIT, NOTIFY_FIELDS, AVAIL_IDX = range(8)

    def __call__(self, data: bytes) -> None:
        reader = ByteReader(data)
        flags = reader.u8()
        mask = reader.u16()
        sizes = [1 << (reader.u8() % 7) for _ in range(3)]
        ram = GuestRam(RAM_SIZE)
        self.ram = ram
        self.dev = dev = VirtioNet(ram.memory, RecordingInterrupts(), self.make_peer(), mac=MAC,
                                   queue_max_size=MAX_QUEUE_SIZE)
        want = dev.device_features
        for bit, feature in enumerate(FEATURE_CHOICES):
            if mask >> bit & 1:
                want &= ~(1 << feature)
        legacy = bool(flags & LEGACY)
        if legacy:
            negotiate_legacy(dev, want)
            sizes = [MAX_QUEUE_SIZE] * 3  # legacy queue sizes are the device's
        else:
            try:
                negotiate_modern(dev, want)
            except RuntimeError:  # the device refused the combination: a defined answer
                return
        event_idx = dev.has_feature(Feature.RING_EVENT_IDX)
        self.queues = [DriverQueue(ram, queue, size=size, event_idx=event_idx,
                                   contiguous=legacy or bool(flags & CONTIGUOUS))
                       for queue, size in zip(dev.queues, sizes, strict=True)]
        driver_ok(dev)
        self.ready()
        while reader.remaining:
            self.step(reader)

    def make_peer(self) -> NetPeer:
        """Where transmitted frames go."""
        return RecordingPeer()

    def ready(self) -> None:
        """Called once the driver is set up, before the first operation."""

    def receive(self, frame: bytes) -> None:
        """A frame from the peer (RECEIVE)."""
        self.dev.receive(frame)

    def transmit(self) -> None:
        """The transmit bottom half (TRANSMIT)."""
        self.dev.run_tx()

    def kick(self, index: int) -> None:
        """The driver notifies queue ``index`` (KICK)."""
        self.dev.notify(index)

    def step(self, reader: ByteReader) -> None:
        op = reader.u8() % 8
        queue = self.queues[reader.u8() % 3]
        if op == self.DESCRIPTOR:
            self.descriptor(reader, queue)
        elif op == self.PUBLISH:
            heads = [reader.u8() % (queue.size + 2) for _ in range(1 + reader.u8() % 4)]
            slot = queue.avail_idx
            for head in heads:
                queue.ram.put_u16(queue.avail + ring.AVAIL_RING_OFFSET + 2 * (slot % queue.size),
                                  head)
                slot += 1
            queue.set_avail_idx(slot)
        elif op == self.RAM:
            offset = reader.u16() % RAM_SIZE
            chunk = reader.take(reader.u8())[: RAM_SIZE - offset]
            self.ram.backing[offset : offset + len(chunk)] = chunk
        elif op == self.AVAIL_IDX:
            queue.set_avail_idx(queue.avail_idx + reader.u16())
        elif op == self.NOTIFY_FIELDS:
            value = reader.u16()
            queue.set_used_event(value)
            queue.set_no_interrupt(bool(value & 1))
        else:
            self.run(op, reader, queue)

    def descriptor(self, reader: ByteReader, queue: DriverQueue) -> None:
        """Input: index u8, address selector u8 (odd: a raw u64 follows, else a u16 offset
        into RAM), length u16, flags u8, next u8."""
        index = reader.u8() % queue.size
        addr = reader.u64() if reader.u8() & 1 else RAM_BASE + reader.u16()
        length, flags, next_ = reader.u16(), reader.u8(), reader.u8() % (queue.size + 2)
        queue.ram.write(queue.desc + ring.DESC_SIZE * index, DESC.pack(addr, length, flags, next_))

    def run(self, op: int, reader: ByteReader, queue: DriverQueue) -> None:
        # The device's own indices, not the ring in RAM: a guest may hand out a writable
        # buffer over its own used ring, and then the device rightly writes anything there.
        used_before = [q.queue.used_idx + q.queue.unpublished for q in self.queues]
        if op == self.KICK:
            self.kick(queue.queue.index)
        elif op == self.RECEIVE:
            self.receive(MAC + reader.take(reader.u8()))
        else:
            self.transmit()
        if self.dev.broken:
            return
        for q, before in zip(self.queues, used_before, strict=True):
            vq = q.queue
            moved = (vq.used_idx + vq.unpublished - before) & 0xFFFF
            in_flight = (vq.last_avail_idx - vq.used_idx - vq.unpublished) & 0xFFFF
            if moved > q.size or in_flight > q.size:
                raise Finding(f"queue {vq.index}: {moved} chains completed in one operation, "
                              f"{in_flight} in flight, queue size {q.size}")

    # -- seeds ------------------------------------------------------------------------

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        """A transmit, a receive, an indirect chain, a loop, and legacy."""
        def desc(queue: int, index: int, offset: int, length: int, flags: int = 0,
                 next_: int = 0) -> bytes:
            return (bytes([cls.DESCRIPTOR, queue, index, 0]) + offset.to_bytes(2, "little")
                    + length.to_bytes(2, "little") + bytes([flags, next_]))

        def publish(queue: int, *heads: int) -> bytes:
            return bytes([cls.PUBLISH, queue, len(heads) - 1, *heads])

        def kick(queue: int) -> bytes:
            return bytes([cls.KICK, queue])

        head = bytes([0]) + (0).to_bytes(2, "little") + bytes([4, 4, 4])
        next_, write, indirect = ring.DescFlag.NEXT, ring.DescFlag.WRITE, ring.DescFlag.INDIRECT
        tx = desc(1, 0, 0xE000, 12, next_, 1) + desc(1, 1, 0xE100, 60) + publish(1, 0) + kick(1)
        rx = desc(0, 0, 0xD000, 1526, write) + publish(0, 0) + kick(0) + bytes([cls.RECEIVE, 0,
                                                                                  54]) + bytes(54)
        table = DESC.pack(RAM_BASE + 0xE000, 12, next_, 1) + DESC.pack(RAM_BASE + 0xE100, 60, 0, 0)
        ind = (bytes([cls.RAM, 0]) + (0xC000).to_bytes(2, "little") + bytes([len(table)]) + table
               + desc(1, 0, 0xC000, len(table), indirect) + publish(1, 0) + kick(1))
        loop = desc(1, 0, 0xE000, 12, next_, 1) + desc(1, 1, 0xE000, 12, next_, 0) + publish(1, 0)
        ctrl = desc(2, 0, 0xB000, 2, next_, 1) + desc(2, 1, 0xB100, 1, write) + publish(2, 0)
        return {
            "transmit": head + tx,
            "receive": head + rx,
            "indirect": head + ind,
            "loop": head + loop + kick(1),
            "ctrl": head + ctrl + kick(2),
            "legacy": bytes([LEGACY]) + head[1:] + tx + rx,
            "avail-jump": head + tx + bytes([cls.AVAIL_IDX, 1, 0, 0x80]) + kick(1),
        }
