"""Split virtqueue formats: one round-trip table, sizes against the spec, hot-path structs."""

from __future__ import annotations

from typing import Any

import pytest
from construct import Container
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.roundtrip import assert_round_trip
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio_ring import (
    DescFlag,
    Descriptor,
    UsedElem,
    avail_ring,
    descriptor_table,
    used_ring,
)

ROUND_TRIP = [
    pytest.param(
        Descriptor,
        bytes.fromhex("0010000001000000" "ee050000" "0100" "0700"),
        Container(addr=0x1_0000_1000, len=1518, flags=DescFlag.NEXT, next=7),
        id="desc-next",
    ),
    pytest.param(
        Descriptor,
        bytes.fromhex("00f0ffffffffffff" "30000000" "0400" "0000"),
        Container(addr=0xFFFF_FFFF_FFFF_F000, len=48, flags=DescFlag.INDIRECT, next=0),
        id="desc-indirect",
    ),
    pytest.param(
        Descriptor,
        bytes.fromhex("0000200000000000" "0c000000" "0200" "0000"),
        Container(addr=0x200000, len=12, flags=DescFlag.WRITE, next=0),
        id="desc-write",
    ),
    pytest.param(
        UsedElem,
        bytes.fromhex("03000000" "4a000000"),
        Container(id=3, len=74),
        id="used-elem",
    ),
    pytest.param(
        descriptor_table(2),
        bytes.fromhex("0010000000000000" "0a000000" "0100" "0100")
        + bytes.fromhex("0020000000000000" "00060000" "0200" "0000"),
        [
            Container(addr=0x1000, len=10, flags=1, next=1),
            Container(addr=0x2000, len=1536, flags=2, next=0),
        ],
        id="desc-table-2",
    ),
    pytest.param(
        avail_ring(4),
        bytes.fromhex("0100" "0500" "0000" "0300" "0100" "0200" "0400"),
        Container(flags=1, idx=5, ring=[0, 3, 1, 2], used_event=4),
        id="avail-4",
    ),
    pytest.param(
        used_ring(2),
        bytes.fromhex("0000" "feff" "01000000" "2a000000" "00000000" "00000000" "ffff"),
        Container(flags=0, idx=0xFFFE, ring=[Container(id=1, len=42), Container(id=0, len=0)],
                  avail_event=0xFFFF),
        id="used-2-wrapping",
    ),
]


@pytest.mark.parametrize(("fmt", "raw", "obj"), ROUND_TRIP)
def test_round_trip(fmt: Any, raw: bytes, obj: Any) -> None:
    assert_round_trip(fmt, raw, obj)


@pytest.mark.parametrize("size", [1, 2, 256, 1024, 32768])
def test_sizes_match_spec(size: int) -> None:
    # split-ring.tex "Queue Part Sizes": 16 N, 6 + 2 N, 6 + 8 N (with the event fields)
    assert descriptor_table(size).sizeof() == ring.descriptor_table_size(size) == 16 * size
    assert avail_ring(size).sizeof() == ring.avail_ring_size(size) == 6 + 2 * size
    assert used_ring(size).sizeof() == ring.used_ring_size(size) == 6 + 8 * size
    assert ring.used_event_offset(size) == 4 + 2 * size
    assert ring.avail_event_offset(size) == 4 + 8 * size


def test_element_sizes() -> None:
    assert Descriptor.sizeof() == ring.DESC_SIZE == ring.DESC_STRUCT.size == 16
    assert UsedElem.sizeof() == ring.USED_ELEM_SIZE == ring.USED_ELEM_STRUCT.size == 8


@pytest.mark.parametrize(
    ("size", "valid"),
    [(0, False), (1, True), (3, False), (256, True), (384, False), (32768, True), (65536, False)],
)
def test_queue_size_validity(size: int, valid: bool) -> None:
    assert ring.is_valid_queue_size(size) is valid


def test_queue_size_respects_max() -> None:
    assert ring.is_valid_queue_size(256, 256)
    assert not ring.is_valid_queue_size(512, 256)


@pytest.mark.parametrize(
    ("base", "size", "expected"),
    [
        # legacy virtio-net queue of 256 entries: avail ends at 0x1206, used at 0x2000
        pytest.param(0x10000, 256, ring.RingLayout(0x10000, 0x11000, 0x12000), id="256"),
        pytest.param(0x10000, 1024, ring.RingLayout(0x10000, 0x14000, 0x15000), id="1024"),
        pytest.param(0x8000, 16, ring.RingLayout(0x8000, 0x8100, 0x9000), id="16"),
    ],
)
def test_contiguous_layout(base: int, size: int, expected: ring.RingLayout) -> None:
    assert ring.contiguous_layout(base, size) == expected


def test_contiguous_size_spec_example() -> None:
    # virtio-legacy notes: N=256 -> 8192 + 4096 bytes
    assert ring.contiguous_size(256) == 12288


def test_contiguous_layout_agrees_with_legacy_transport_helper() -> None:
    from vfuserver.protocol import virtio_legacy

    for size in (16, 256, 1024):
        legacy = virtio_legacy.queue_layout(0x123, size)
        assert tuple(legacy) == tuple(ring.contiguous_layout(0x123 << 12, size))
        assert virtio_legacy.queue_bytes(size) == ring.contiguous_size(size)


@pytest.mark.parametrize("bad", [0, -1])
def test_contiguous_layout_rejects_bad_size(bad: int) -> None:
    with pytest.raises(ValueError, match="queue size"):
        ring.contiguous_layout(0x1000, bad)


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        pytest.param(0, 1, 0, True, id="spec-example-first-buffer"),
        pytest.param(0, 0, 0, False, id="nothing-new"),
        pytest.param(5, 5, 3, False, id="reached-not-passed"),
        pytest.param(5, 6, 3, True, id="passed"),
        pytest.param(5, 6, 5, True, id="exactly-one-past"),
        pytest.param(5, 7, 6, False, id="already-passed-before"),
        pytest.param(10, 5, 0, False, id="not-yet"),
        pytest.param(0xFFFF, 1, 0xFFFE, True, id="wraps"),
        pytest.param(0xFFFD, 1, 0xFFFE, False, id="wraps-already-passed"),
        pytest.param(0, 0x8000, 0, True, id="large-batch"),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert ring.vring_need_event(event, new, old) is expected


@given(
    addr=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 0xFFFF),
    nxt=st.integers(0, 0xFFFF),
)
def test_desc_struct_matches_construct(addr: int, length: int, flags: int, nxt: int) -> None:
    raw = Descriptor.build(dict(addr=addr, len=length, flags=flags, next=nxt))
    assert ring.DESC_STRUCT.pack(addr, length, flags, nxt) == raw
    assert ring.DESC_STRUCT.unpack(raw) == (addr, length, flags, nxt)


@given(id_=st.integers(0, 2**32 - 1), length=st.integers(0, 2**32 - 1))
def test_used_elem_struct_matches_construct(id_: int, length: int) -> None:
    raw = UsedElem.build(dict(id=id_, len=length))
    assert ring.USED_ELEM_STRUCT.pack(id_, length) == raw


@given(value=st.integers(0, 0xFFFF))
def test_u16_struct_matches_ring_index_encoding(value: int) -> None:
    raw = avail_ring(1).build(dict(flags=0, idx=value, ring=[0], used_event=0))
    assert raw[ring.AVAIL_IDX_OFFSET : ring.AVAIL_IDX_OFFSET + 2] == ring.U16_STRUCT.pack(value)


def test_field_offsets() -> None:
    raw = used_ring(4).build(
        dict(flags=0x1111, idx=0x2222, ring=[dict(id=i, len=0) for i in range(4)],
             avail_event=0x3333)
    )
    assert ring.U16_STRUCT.unpack_from(raw, ring.USED_FLAGS_OFFSET) == (0x1111,)
    assert ring.U16_STRUCT.unpack_from(raw, ring.USED_IDX_OFFSET) == (0x2222,)
    assert ring.USED_ELEM_STRUCT.unpack_from(raw, ring.USED_RING_OFFSET + 8 * 2) == (2, 0)
    assert ring.U16_STRUCT.unpack_from(raw, ring.avail_event_offset(4)) == (0x3333,)
