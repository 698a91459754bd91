"""Guest memory that is several DMA maps: buffers and rings across a map boundary, and
every way a driver's address can fall outside the maps (issue 12, input 4 and siblings).

The same guest RAM is registered as adjacent maps (GuestRam's ``splits``), as a vIOMMU or
a RAM block split around a hole presents it to a vfio-user server; QEMU's own device
model splits such a buffer into several iovecs (virtqueue_map_desc) and reads rings
through address_space caches that do the same.
"""

from __future__ import annotations

import pytest

from tests.devices.driver import DESC as DESC_ENTRY
from tests.devices.driver import RAM_BASE, RAM_SIZE, Buf, DriverQueue, GuestRam
from tests.devices.test_virtio_net import MAC, Rig, frame, make_rig
from vfuserver.devices.errors import GuestMemoryError
from vfuserver.devices.memory import IOVA_LIMIT, GuestMemory
from vfuserver.devices.virtio_net import TX_QUEUE
from vfuserver.devices.virtqueue import VirtQueue, VirtQueueError
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio import DeviceStatus

SPLIT = RAM_BASE + (1 << 20)
"""Where the guest RAM is cut into two maps, 1 MiB in."""

# Queue of 8 allocated first by DriverQueue: descriptor table (128 bytes), available ring
# (22 bytes, 2-aligned), used ring (70 bytes, 4-aligned).
DESC, AVAIL, USED = RAM_BASE, RAM_BASE + 128, RAM_BASE + 152


# -- GuestMemory --------------------------------------------------------------------------


def two_maps() -> tuple[GuestMemory, bytearray]:
    backing = bytearray(0x2000)
    memory = GuestMemory()
    memory.add(0x1000, memoryview(backing)[:0x1000], writable=True)
    memory.add(0x2000, memoryview(backing)[0x1000:], writable=False)
    return memory, backing


def test_pieces_follow_adjacent_maps() -> None:
    memory, backing = two_maps()
    backing[0xFF0:0x1010] = bytes(range(0x20))
    parts = memory.pieces(0x1FF0, 0x20)
    assert [len(p) for p in parts] == [0x10, 0x10]
    assert b"".join(parts) == bytes(range(0x20))
    assert memory.read(0x1FF0, 0x20) == bytes(range(0x20))


def test_view_is_one_map_only() -> None:
    memory, _ = two_maps()
    with pytest.raises(GuestMemoryError, match="not mapped"):
        memory.view(0x1FF0, 0x20)


@pytest.mark.parametrize(("addr", "length", "writable", "reason"), [
    pytest.param(0x2FF0, 0x20, False, r"\[0x2ff0, \+0x20\) not mapped from 0x3000",
                 id="runs-past-the-last-map"),
    pytest.param(0xFF0, 0x20, False, r"\[0xff0, \+0x20\) not mapped$", id="starts-in-a-hole"),
    pytest.param(0x1FF0, 0x20, True, "is read-only", id="writable-into-read-only"),
    pytest.param(IOVA_LIMIT - 8, 16, False, "not mapped", id="wraps-around-2**64"),
])
def test_pieces_refuse(addr: int, length: int, writable: bool, reason: str) -> None:
    memory, _ = two_maps()
    with pytest.raises(GuestMemoryError, match=reason):
        memory.pieces(addr, length, writable=writable)


@pytest.mark.parametrize(("iova", "size", "message"), [
    pytest.param(0x1000, 0, "empty", id="zero-length"),
    pytest.param(IOVA_LIMIT - 0x1000, 0x2000, "wraps around", id="past-2**64"),
    pytest.param(0x1800, 0x1000, "overlaps", id="overlaps-the-end"),
    pytest.param(0x800, 0x1000, "overlaps", id="overlaps-the-start"),
])
def test_maps_that_cannot_be_added(iova: int, size: int, message: str) -> None:
    memory, _ = two_maps()
    with pytest.raises(ValueError, match=message):
        memory.add(iova, bytearray(size), writable=True)
    assert len(memory) == 2


# -- buffers across a boundary (virtio-net) ----------------------------------------------


def split_rig() -> Rig:
    return make_rig(ram=GuestRam(splits=[SPLIT]))


@pytest.mark.parametrize("layout", ["pushed", "split", "indirect"])
def test_transmit_buffer_across_two_maps_is_sent_intact(layout: str) -> None:
    rig = split_rig()
    data = frame(payload=bytes(range(256)) * 4)
    rig.ram.skip_to(SPLIT - 100)  # the next buffer starts 100 bytes before the boundary
    rig.send(data, layout=layout)
    assert rig.peer.sent == [data]
    assert not rig.dev.status & DeviceStatus.NEEDS_RESET
    assert [u.length for u in rig.tx.get_used()] == [0]


@pytest.mark.parametrize("before", [5, 12, 100, 1000])  # 12: the header's own size
def test_receive_buffer_across_two_maps_gets_the_whole_frame(before: int) -> None:
    rig = split_rig()
    data = frame(payload=bytes(range(256)) * 4)
    rig.rx.add_bufs([Buf(SPLIT - before, 1536, True)])  # mergeable: one buffer per packet
    rig.dev.notify(0)
    assert rig.dev.receive(data)
    [(_header, received)] = rig.received()
    assert received == data
    assert not rig.dev.status & DeviceStatus.NEEDS_RESET


def test_receive_buffer_over_a_read_only_map_needs_reset() -> None:
    ram = GuestRam()
    ram.memory.add(ram.end, bytearray(0x1000), writable=False)  # firmware after RAM
    rig = make_rig(ram=ram)
    rig.rx.add_bufs([Buf(ram.end - 16, 1536, True)])
    rig.dev.notify(0)
    rig.dev.receive(frame())
    assert rig.dev.status & DeviceStatus.NEEDS_RESET


# -- rings across a boundary -----------------------------------------------------------------


def ring_queue(split: int, *, event_idx: bool, size: int = 8) -> tuple[VirtQueue, DriverQueue]:
    ram = GuestRam(splits=[split])
    queue = VirtQueue(ram.memory, 0, 256)
    queue.event_idx = event_idx
    driver = DriverQueue(ram, queue, size=size, event_idx=event_idx)
    assert (driver.desc, driver.avail, driver.used) == (DESC, AVAIL, USED)
    return queue, driver


CROSSINGS = [
    pytest.param(DESC + 64, id="descriptor-table"),
    pytest.param(DESC + 64 + 8, id="descriptor-4-addr|len"),
    pytest.param(AVAIL + 2, id="available-ring-flags|idx"),
    pytest.param(AVAIL + 4 + 2 * 3, id="available-ring-entry-3"),
    pytest.param(USED + 2, id="used-ring-flags|idx"),
    pytest.param(USED + 4 + 8 * 3 + 4, id="used-element-3-id|len"),
    pytest.param(USED + 4 + 8 * 8, id="used-ring-avail_event"),
]


@pytest.mark.parametrize("event_idx", [False, True], ids=["no-event-idx", "event-idx"])
@pytest.mark.parametrize("split", CROSSINGS)
def test_rings_across_two_maps_work_lap_after_lap(split: int, event_idx: bool) -> None:
    queue, driver = ring_queue(split, event_idx=event_idx)
    queue.set_notification(True)
    for lap in range(3 * driver.size):  # several laps: every ring slot is used
        payload = lap.to_bytes(2, "little") * 20
        head = driver.add([payload], [len(payload)], indirect=lap % 3 == 0)
        chain = queue.pop()
        assert chain is not None and chain.head == head
        assert chain.write(chain.read()[::-1]) == len(payload)
        queue.push(chain, len(payload))
        assert queue.pop() is None
        interrupt = queue.flush()
        assert interrupt  # the driver re-arms after each harvest
        [used] = driver.get_used()
        assert (used.head, used.data) == (head, payload[::-1])
    assert driver.used_idx == queue.used_idx == 3 * driver.size
    if event_idx:
        assert driver.avail_event == queue.last_avail_idx


@pytest.mark.parametrize("before", [16, 32])  # entries of the table before the split
def test_indirect_table_across_two_maps(before: int) -> None:
    ram = GuestRam(splits=[SPLIT])
    queue = VirtQueue(ram.memory, 0, 256)
    driver = DriverQueue(ram, queue, size=8)
    bufs = driver.buffers([b"head", b"er"], [6])
    ram.skip_to(SPLIT - before)
    head = driver.add_bufs(bufs, indirect=True)  # three entries, 48 bytes
    table, length, flags, _ = DESC_ENTRY.unpack(ram.read(driver.desc + 16 * head, 16))
    assert flags == ring.DescFlag.INDIRECT and table == SPLIT - before and length == 48
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert chain.read() == b"header"
    assert chain.write(b"answer") == 6
    queue.push(chain, 6)
    queue.flush()
    [used] = driver.get_used()
    assert used.data == b"answer"


def test_a_ring_field_cut_by_a_map_boundary_is_an_error() -> None:
    # used.idx at USED+2..USED+4 cut in half: one 16-bit store cannot be split
    queue, driver = ring_queue(USED + 3, event_idx=False)
    head = driver.add([b"x"], [1])
    chain = queue.pop()
    assert chain is not None and chain.head == head
    queue.push(chain, 0)
    with pytest.raises(VirtQueueError, match=r"used ring field at .* not inside one writable"):
        queue.flush()


def test_contiguous_legacy_ring_across_two_maps() -> None:
    split = RAM_BASE + ring.contiguous_layout(0, 64)[2] + 2  # inside used.flags|idx
    rig = make_rig(legacy=True, ram=GuestRam(splits=[split]))
    data = frame(dest=MAC)
    rig.fill_rx(1)
    rig.send(data)
    assert rig.peer.sent == [data]
    assert rig.dev.receive(data)
    assert [f for _, f in rig.received()] == [data]


# -- addresses outside every map -------------------------------------------------------------


@pytest.mark.parametrize(("addr", "length", "why"), [
    pytest.param(RAM_BASE + RAM_SIZE - 16, 64, "not mapped from", id="partly-past-the-end"),
    pytest.param(RAM_BASE - 16, 64, "not mapped", id="partly-before-the-start"),
    pytest.param(IOVA_LIMIT - 16, 64, "not mapped", id="wraps-around-2**64"),
    pytest.param(IOVA_LIMIT - 1, 0xFFFF_FFFF, "not mapped", id="longest-at-the-top"),
])
def test_transmit_descriptor_partly_outside_every_map_needs_reset(
        addr: int, length: int, why: str) -> None:
    rig = split_rig()
    rig.tx.add_bufs([Buf(addr, length, False)])
    rig.dev.notify(TX_QUEUE)
    assert rig.dev.status & DeviceStatus.NEEDS_RESET
    assert rig.peer.sent == []


def test_unmapping_the_rings_while_a_queue_uses_them_needs_reset_at_the_next_kick() -> None:
    rig = split_rig()
    rig.send(frame())
    assert len(rig.peer.sent) == 1
    rig.ram.memory.remove(RAM_BASE)  # the client unmapped the map holding the rings
    rig.tx.add([rig.header() + frame()])  # the driver's write lands in the test's bytearray
    rig.dev.notify(TX_QUEUE)
    assert rig.dev.status & DeviceStatus.NEEDS_RESET
    assert len(rig.peer.sent) == 1


def test_lost_pages_stop_the_queue_at_the_end_of_the_batch() -> None:
    rig = split_rig()
    rig.ram.memory.lost.count += 1  # what the server's SIGBUS guard does
    rig.ram.memory.lost.iova = SPLIT + 0x3000
    rig.send(frame())
    assert rig.dev.status & DeviceStatus.NEEDS_RESET
    # a queue counts from what it finds at its reset: after the driver's reset and
    # set-up the device works again
    rig = make_rig(ram=rig.ram)
    rig.send(frame())
    assert not rig.dev.status & DeviceStatus.NEEDS_RESET
