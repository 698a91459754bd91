"""The split-ring engine against a test-side driver laying out rings like Linux."""

from __future__ import annotations

import pytest

from tests.devices.driver import DriverQueue, GuestRam
from vfuserver.devices.errors import GuestError
from vfuserver.devices.virtqueue import VirtQueue, VirtQueueError
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio_pci import MSI_NO_VECTOR

NEXT, WRITE, INDIRECT = ring.DescFlag.NEXT, ring.DescFlag.WRITE, ring.DescFlag.INDIRECT


@pytest.fixture
def ram() -> GuestRam:
    return GuestRam()


def make(ram: GuestRam, size: int = 8, *, max_size: int = 256, event_idx: bool = False,
         max_chain_bytes: int = 1 << 20, contiguous: bool = False) -> tuple[VirtQueue,
                                                                            DriverQueue]:
    queue = VirtQueue(ram.memory, 1, max_size, max_chain_bytes=max_chain_bytes)
    queue.event_idx = event_idx
    return queue, DriverQueue(ram, queue, size=size, event_idx=event_idx, contiguous=contiguous)


# -- configuration ------------------------------------------------------------------------


def test_initial_state(ram: GuestRam) -> None:
    queue = VirtQueue(ram.memory, 3, 256)
    assert (queue.index, queue.size, queue.enabled, queue.msix_vector) == (
        3, 256, False, MSI_NO_VECTOR)
    assert (queue.last_avail_idx, queue.used_idx) == (0, 0)


@pytest.mark.parametrize("bad", [0, 3, 100, 512, 65536])
def test_bad_queue_size_is_a_guest_error(ram: GuestRam, bad: int) -> None:
    queue = VirtQueue(ram.memory, 0, 256)
    with pytest.raises(VirtQueueError, match=f"queue 0: size {bad} is not a power of two "
                                             "between 1 and 256"):
        queue.set_size(bad)
    with pytest.raises(GuestError):
        queue.size = bad
    assert queue.size == 256


def test_max_size_must_be_valid(ram: GuestRam) -> None:
    with pytest.raises(ValueError, match="power of two"):
        VirtQueue(ram.memory, 0, 300)


def test_reset_restores_defaults(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.add([b"x"])
    queue.msix_vector = 2
    assert queue.pop() is not None
    queue.reset()
    assert (queue.size, queue.enabled, queue.msix_vector, queue.last_avail_idx,
            queue.desc_addr) == (256, False, MSI_NO_VECTOR, 0, 0)


def test_place_contiguous_legacy_layout(ram: GuestRam) -> None:
    queue, drv = make(ram, size=256, contiguous=True)
    assert queue.enabled
    assert queue.avail_addr == queue.desc_addr + 4096
    assert queue.used_addr == queue.desc_addr + 8192
    drv.add([b"legacy"])
    chain = queue.pop()
    assert chain is not None and chain.read() == b"legacy"
    queue.place_contiguous(0)
    assert not queue.enabled and queue.desc_addr == 0


# -- popping ------------------------------------------------------------------------------


def test_pop_empty(ram: GuestRam) -> None:
    queue, _ = make(ram)
    assert queue.available() == 0
    assert queue.pop() is None


def test_pop_readable_and_writable_segments(ram: GuestRam) -> None:
    queue, drv = make(ram)
    head = drv.add([b"hdr", b"payload"], [4, 6])
    assert queue.available() == 1
    chain = queue.pop()
    assert chain is not None
    assert chain.head == head
    assert [length for _, length in chain.readable] == [3, 7]
    assert [length for _, length in chain.writable] == [4, 6]
    assert (chain.readable_len, chain.writable_len, chain.descriptors) == (10, 10, 4)
    assert chain.read() == b"hdrpayload"
    assert queue.pop() is None
    assert queue.last_avail_idx == 1


def test_pop_indirect(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.add([b"ab", b"cd"], [8], indirect=True)
    chain = queue.pop()
    assert chain is not None
    assert chain.read() == b"abcd"
    assert chain.writable_len == 8
    assert chain.descriptors == 3


def test_pop_direct_descriptors_then_indirect_table(ram: GuestRam) -> None:
    # split-ring.tex: the device MUST handle zero or more chained descriptors followed by
    # a single indirect one
    queue, drv = make(ram)
    first = drv.buffers([b"direct-"], [])[0]
    inner = drv.buffers([b"indirect"], [5])
    table = ram.alloc(32)
    drv.write_desc(0, inner[0].addr, inner[0].length, NEXT, 1, table=table)
    drv.write_desc(1, inner[1].addr, inner[1].length, WRITE, table=table)
    drv.write_desc(4, first.addr, first.length, NEXT, 5)
    drv.write_desc(5, table, 32, INDIRECT | WRITE)  # WRITE on it must be ignored
    drv.publish(4)
    chain = queue.pop()
    assert chain is not None
    assert chain.read() == b"direct-indirect"
    assert chain.writable_len == 5


def test_zero_length_descriptors_are_skipped(ram: GuestRam) -> None:
    queue, drv = make(ram)
    buf = drv.buffers([b"data"], [])[0]
    drv.write_desc(0, buf.addr, 0, NEXT, 1)
    drv.write_desc(1, buf.addr, buf.length, 0)
    drv.publish(0)
    chain = queue.pop()
    assert chain is not None and chain.readable == [(buf.addr, 4)]


def test_write_scatters_across_segments(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.add([], [3, 2, 10])
    chain = queue.pop()
    assert chain is not None
    assert chain.write(b"abcdefg") == 7
    assert chain.write(b"XY", offset=4) == 2
    assert chain.write(b"0123456789abcdef", offset=10) == 5
    queue.push(chain, 15)
    queue.flush()
    [used] = drv.get_used()
    assert used.data == b"abcdXYg" + bytes(3) + b"01234"


def test_rewind_pops_the_same_chains_again(ram: GuestRam) -> None:
    queue, drv = make(ram)
    heads = [drv.add([], [16]) for _ in range(3)]
    popped = [c for c in (queue.pop(), queue.pop()) if c is not None]
    assert [c.head for c in popped] == heads[:2]
    queue.rewind(popped)
    assert queue.available() == 3
    chain = queue.pop()
    assert chain is not None and chain.head == heads[0]


def test_a_head_offered_while_the_device_holds_it_is_an_error(ram: GuestRam) -> None:
    queue, drv = make(ram)
    head = drv.add([], [16])
    assert queue.pop() is not None
    drv.publish(head)  # the driver offers the same chain again before getting it back
    with pytest.raises(VirtQueueError, match="still holds"):
        queue.pop()


def test_completing_a_head_the_device_does_not_hold_is_a_bug(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.add([], [16])
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 0)
    with pytest.raises(RuntimeError, match="device bug"):
        queue.push(chain, 0)


def test_avail_index_wraps(ram: GuestRam) -> None:
    queue, drv = make(ram, size=4)
    drv.set_avail_idx(0xFFFE)
    queue.last_avail_idx = 0xFFFE
    queue.used_idx = drv.last_used = 0xFFFE
    ram.put_u16(drv.used + ring.USED_IDX_OFFSET, 0xFFFE)
    heads = [drv.add([bytes([i])]) for i in range(3)]
    assert drv.avail_idx == 1
    for head in heads:
        chain = queue.pop()
        assert chain is not None and chain.head == head
        queue.push(chain, 0)
    queue.flush()
    assert queue.used_idx == 1
    assert [u.head for u in drv.get_used()] == heads


# -- pushing and interrupt suppression -----------------------------------------------------


def test_push_flush_publishes_used_entries(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.add([], [64])
    chain = queue.pop()
    assert chain is not None
    chain.write(b"reply")
    queue.push(chain, 5)
    assert drv.used_idx == 0, "not visible before flush"
    assert queue.flush() is True
    [used] = drv.get_used()
    assert (used.head, used.length, used.data) == (chain.head, 5, b"reply")
    assert queue.flush() is False, "nothing new to publish"


def test_push_more_than_writable_is_a_bug(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.add([], [4])
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(ValueError):
        queue.push(chain, 5)


def test_no_interrupt_flag_suppresses(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.set_no_interrupt(True)
    drv.add([b"x"])
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 0)
    assert queue.flush() is False
    drv.set_no_interrupt(False)
    drv.add([b"y"])
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 0)
    assert queue.flush() is True


def test_event_idx_used_event(ram: GuestRam) -> None:
    queue, drv = make(ram, event_idx=True)
    drv.set_no_interrupt(True)  # must be ignored with EVENT_IDX
    drv.set_used_event(2)  # interrupt once used idx passes 2, i.e. on the third buffer
    results = []
    for i in range(4):
        drv.add([bytes([i])])
        chain = queue.pop()
        assert chain is not None
        queue.push(chain, 0)
        results.append(queue.flush())
    # first flush always interrupts (nothing signalled yet), then only when crossing 2
    assert results == [True, False, True, False]


def test_event_idx_batch_crossing_used_event(ram: GuestRam) -> None:
    queue, drv = make(ram, event_idx=True)
    drv.set_used_event(0)
    drv.add([b"a"])
    chain = queue.pop()
    assert chain is not None
    queue.push(chain, 0)
    assert queue.flush() is True
    drv.set_used_event(3)
    for i in range(4):
        drv.add([bytes([i])])
    for _ in range(4):
        chain = queue.pop()
        assert chain is not None
        queue.push(chain, 0)
    assert queue.flush() is True, "used idx went 1 -> 5, passing used_event 3"


# -- notification suppression --------------------------------------------------------------


def test_notification_flag_without_event_idx(ram: GuestRam) -> None:
    queue, drv = make(ram)
    assert drv.publish(drv.add([b"a"], publish=False)) is True
    queue.set_notification(False)
    assert drv.used_flags & ring.UsedFlag.NO_NOTIFY
    assert drv.publish(drv.add([b"b"], publish=False)) is False
    queue.set_notification(True)
    assert not drv.used_flags & ring.UsedFlag.NO_NOTIFY
    assert queue.notification_enabled


def test_notification_avail_event(ram: GuestRam) -> None:
    queue, drv = make(ram, event_idx=True)
    drv.add([b"a"])
    drv.add([b"b"])
    queue.set_notification(True)
    assert drv.avail_event == 2, "enabling asks for a kick after the current index"
    assert queue.pop() is not None
    assert drv.avail_event == 1, "pop with notifications on tracks last_avail_idx"
    queue.set_notification(False)
    assert queue.pop() is not None
    assert drv.avail_event == 1, "disabled: avail_event is left behind"
    assert drv.publish(drv.add([b"c"], publish=False)) is False
    queue.set_notification(True)
    assert drv.avail_event == 3
    assert drv.publish(drv.add([b"d"], publish=False)) is True


# -- hostile drivers: every broken rule is a VirtQueueError naming it -----------------------


def _pop_error(queue: VirtQueue) -> str:
    with pytest.raises(VirtQueueError) as info:
        queue.pop()
    assert isinstance(info.value, GuestError)
    return str(info.value)


def test_descriptor_loop(ram: GuestRam) -> None:
    queue, drv = make(ram)
    buf = drv.buffers([b"x"], [])[0]
    drv.write_desc(0, buf.addr, 1, NEXT, 1)
    drv.write_desc(1, buf.addr, 1, NEXT, 0)
    drv.publish(0)
    assert "descriptor loop: chain 0 returns to descriptor table entry 0" in _pop_error(queue)


def test_descriptor_loop_in_indirect_table(ram: GuestRam) -> None:
    queue, drv = make(ram)
    buf = drv.buffers([b"x"], [])[0]
    table = ram.alloc(48)
    for i in range(3):
        drv.write_desc(i, buf.addr, 1, NEXT, (i + 1) % 3, table=table)
    drv.write_desc(0, table, 48, INDIRECT)
    drv.publish(0)
    assert "descriptor loop: chain 0 returns to indirect table" in _pop_error(queue)


def test_chain_longer_than_queue_size(ram: GuestRam) -> None:
    queue, drv = make(ram, size=4)
    buf = drv.buffers([b"x"], [])[0]
    table = ram.alloc(16 * 5)
    for i in range(5):
        drv.write_desc(i, buf.addr, 1, NEXT if i < 4 else 0, i + 1, table=table)
    drv.write_desc(0, table, 16 * 5, INDIRECT)
    drv.publish(0)
    assert "chain 0 is longer than the queue size 4" in _pop_error(queue)


def test_head_index_beyond_queue_size(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.publish(8)
    assert "available ring slot 0 names descriptor 8, but the queue has 8" in _pop_error(queue)


def test_next_index_beyond_queue_size(ram: GuestRam) -> None:
    queue, drv = make(ram)
    buf = drv.buffers([b"x"], [])[0]
    drv.write_desc(0, buf.addr, 1, NEXT, 9)
    drv.publish(0)
    assert "descriptor table entry 0 links to 9, but there are only 8 entries" in _pop_error(
        queue)


def test_next_index_beyond_indirect_table(ram: GuestRam) -> None:
    queue, drv = make(ram)
    buf = drv.buffers([b"x"], [])[0]
    table = ram.alloc(32)
    drv.write_desc(0, buf.addr, 1, NEXT, 2, table=table)
    drv.write_desc(0, table, 32, INDIRECT)
    drv.publish(0)
    assert "entry 0 links to 2, but there are only 2 entries" in _pop_error(queue)


def test_buffer_outside_guest_memory(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.write_desc(0, ram.end - 8, 64, 0)
    drv.publish(0)
    message = _pop_error(queue)
    assert "chain 0: device-readable buffer of descriptor table entry 0" in message
    assert "not mapped" in message


def test_writable_buffer_in_read_only_map(ram: GuestRam) -> None:
    rom_base = ram.end + 0x10000
    ram.memory.add(rom_base, bytearray(4096), writable=False)
    queue, drv = make(ram)
    drv.write_desc(0, rom_base, 64, WRITE)
    drv.publish(0)
    message = _pop_error(queue)
    assert "device-writable buffer" in message and "read-only" in message


def test_ring_outside_guest_memory(ram: GuestRam) -> None:
    queue, drv = make(ram)
    queue.avail_addr = 0x1000
    assert "available ring at 0x1000" in _pop_error(queue)
    queue.avail_addr = drv.avail
    drv.add([b"x"])
    queue.desc_addr = ram.end - 16
    assert "descriptor table at" in _pop_error(queue)


def test_huge_length(ram: GuestRam) -> None:
    queue, drv = make(ram, max_chain_bytes=65536)
    buf = drv.buffers([b"x"], [])[0]
    drv.write_desc(0, buf.addr, 0xFFFF_FFFF, 0)
    drv.publish(0)
    assert "chain 0 is 4294967295 bytes or more at descriptor table entry 0, over the " \
           "65536-byte limit" in _pop_error(queue)


def test_total_length_over_limit(ram: GuestRam) -> None:
    queue, drv = make(ram, max_chain_bytes=100)
    drv.add([bytes(60), bytes(60)])
    assert "over the 100-byte limit" in _pop_error(queue)


def test_readable_after_writable(ram: GuestRam) -> None:
    queue, drv = make(ram)
    bufs = drv.buffers([b"late"], [4])
    drv.write_desc(0, bufs[1].addr, 4, WRITE | NEXT, 1)
    drv.write_desc(1, bufs[0].addr, 4, 0)
    drv.publish(0)
    assert "device-readable descriptor table entry 1 follows a device-writable one" in (
        _pop_error(queue))


@pytest.mark.parametrize("length", [0, 24])
def test_bad_indirect_table_length(ram: GuestRam, length: int) -> None:
    queue, drv = make(ram)
    drv.write_desc(0, ram.alloc(32), length, INDIRECT)
    drv.publish(0)
    assert f"indirect table length {length} is not a non-zero multiple of 16" in _pop_error(
        queue)


def test_nested_indirect(ram: GuestRam) -> None:
    queue, drv = make(ram)
    table = ram.alloc(16)
    drv.write_desc(0, table, 16, INDIRECT, table=table)
    drv.write_desc(0, table, 16, INDIRECT)
    drv.publish(0)
    assert "indirect table entry 0 is itself INDIRECT" in _pop_error(queue)


def test_indirect_with_next(ram: GuestRam) -> None:
    queue, drv = make(ram)
    table = ram.alloc(16)
    drv.write_desc(0, table, 16, INDIRECT | NEXT, 1)
    drv.publish(0)
    assert "descriptor 0 has both INDIRECT and NEXT set" in _pop_error(queue)


def test_avail_index_jumps_past_queue_size(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.set_avail_idx(9)
    assert "available index moved from 0 to 9, more than the queue size 8 ahead" in (
        _pop_error(queue))
    with pytest.raises(VirtQueueError):
        queue.available()


def test_errors_do_not_advance_the_ring(ram: GuestRam) -> None:
    queue, drv = make(ram)
    drv.publish(8)
    _pop_error(queue)
    assert queue.last_avail_idx == 0
