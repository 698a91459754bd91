"""virtio-blk formats: one round-trip table, sizes and offsets against the spec, hot-path
structs against the construct definitions."""

from __future__ import annotations

from typing import Any

import pytest
from construct import Container
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.roundtrip import assert_round_trip
from vfuserver.protocol import virtio_blk as blk
from vfuserver.protocol.virtio_blk import (
    BlkConfig,
    BlkFeature,
    BlkOutHdr,
    DiscardWriteZeroes,
    RequestType,
    Status,
    StatusByte,
)

# A 64 MiB disk as QEMU's virtio-blk-pci shows it with 4 queues (lspci -vv / the config
# dump a Linux guest reads): capacity 131072 sectors, seg_max 126, blk_size 512,
# writeback on, discard and write-zeroes limits of QEMU's defaults.
CONFIG_RAW = bytes.fromhex(
    "0000020000000000"  # capacity 131072
    "00000000" "7e000000"  # size_max 0, seg_max 126
    "0000" "00" "00"  # geometry
    "00020000"  # blk_size 512
    "00" "00" "0100" "00000000"  # topology: exp 0, offset 0, min_io 1, opt_io 0
    "01" "00" "0400"  # writeback 1, unused0, num_queues 4
    "ffff3f00" "01000000" "01000000"  # max_discard_sectors, seg, alignment
    "ffff3f00" "01000000" "01" "000000"  # max_write_zeroes_sectors, seg, may_unmap, pad
)
CONFIG_OBJ = Container(
    capacity=131072, size_max=0, seg_max=126,
    geometry=Container(cylinders=0, heads=0, sectors=0), blk_size=512,
    topology=Container(physical_block_exp=0, alignment_offset=0, min_io_size=1,
                       opt_io_size=0),
    writeback=1, unused0=0, num_queues=4, max_discard_sectors=0x3FFFFF, max_discard_seg=1,
    discard_sector_alignment=1, max_write_zeroes_sectors=0x3FFFFF, max_write_zeroes_seg=1,
    write_zeroes_may_unmap=1, unused1=bytes(3),
)

ROUND_TRIP = [
    pytest.param(BlkConfig, CONFIG_RAW, CONFIG_OBJ, id="config"),
    pytest.param(BlkOutHdr, bytes.fromhex("00000000" "00000000" "0008000000000000"),
                 Container(type=RequestType.IN, ioprio=0, sector=2048), id="outhdr-in"),
    pytest.param(BlkOutHdr, bytes.fromhex("01000000" "00000000" "ffffffffffffff7f"),
                 Container(type=RequestType.OUT, ioprio=0, sector=0x7FFF_FFFF_FFFF_FFFF),
                 id="outhdr-out-huge-sector"),
    pytest.param(BlkOutHdr, bytes.fromhex("01000080" "00000000" "0000000000000000"),
                 Container(type=RequestType.OUT | blk.BARRIER_FLAG, ioprio=0, sector=0),
                 id="outhdr-legacy-barrier"),
    pytest.param(BlkOutHdr, bytes.fromhex("63000000" "07000000" "0000000000000000"),
                 Container(type=99, ioprio=7, sector=0), id="outhdr-reserved-type"),
    pytest.param(StatusByte, b"\x02", Container(status=Status.UNSUPP), id="status-unsupp"),
    pytest.param(DiscardWriteZeroes, bytes.fromhex("0010000000000000" "00080000" "01000000"),
                 Container(sector=4096, num_sectors=2048, flags=blk.DiscardFlag.UNMAP),
                 id="write-zeroes-unmap"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "raw", "obj"), ROUND_TRIP)
def test_round_trip(fmt: Any, raw: bytes, obj: Any) -> None:
    assert_round_trip(fmt, raw, obj)


def test_sizes_match_spec() -> None:
    assert BlkConfig.sizeof() == blk.CONFIG_SIZE == blk.CONFIG_STRUCT.size == 60
    assert BlkOutHdr.sizeof() == blk.OUTHDR_SIZE == blk.OUTHDR_STRUCT.size == 16
    assert DiscardWriteZeroes.sizeof() == blk.DWZ_SEGMENT_SIZE == blk.DWZ_STRUCT.size == 16


def test_config_offsets_match_uapi() -> None:
    """offsetof() in Linux's struct virtio_blk_config."""
    offsets, position = {}, 0
    for sub in BlkConfig.subcons:
        offsets[sub.name] = position
        position += sub.sizeof()
    expected = {"capacity": 0, "size_max": 8, "seg_max": 12, "geometry": 16, "blk_size": 20,
                "topology": 24, "writeback": 32, "num_queues": 34, "max_discard_sectors": 36,
                "max_discard_seg": 40, "discard_sector_alignment": 44,
                "max_write_zeroes_sectors": 48, "max_write_zeroes_seg": 52,
                "write_zeroes_may_unmap": 56}
    assert {name: offsets[name] for name in expected} == expected
    assert {off.name.lower(): int(off) for off in blk.ConfigOffset} == expected


@given(fields=st.tuples(
    st.integers(0, 2**64 - 1), *[st.integers(0, 2**32 - 1)] * 2, st.integers(0, 0xFFFF),
    *[st.integers(0, 255)] * 2, st.integers(0, 2**32 - 1), *[st.integers(0, 255)] * 2,
    st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), *[st.integers(0, 255)] * 2,
    st.integers(0, 0xFFFF), *[st.integers(0, 2**32 - 1)] * 5, st.integers(0, 255)))
def test_config_struct_matches_construct(fields: tuple[int, ...]) -> None:
    (capacity, size_max, seg_max, cylinders, heads, sectors, blk_size, exp, align, min_io,
     opt_io, writeback, unused0, queues, mds, mdseg, dsa, mwzs, mwzseg, may_unmap) = fields
    raw = BlkConfig.build(dict(
        capacity=capacity, size_max=size_max, seg_max=seg_max,
        geometry=dict(cylinders=cylinders, heads=heads, sectors=sectors), blk_size=blk_size,
        topology=dict(physical_block_exp=exp, alignment_offset=align, min_io_size=min_io,
                      opt_io_size=opt_io),
        writeback=writeback, unused0=unused0, num_queues=queues, max_discard_sectors=mds,
        max_discard_seg=mdseg, discard_sector_alignment=dsa, max_write_zeroes_sectors=mwzs,
        max_write_zeroes_seg=mwzseg, write_zeroes_may_unmap=may_unmap, unused1=bytes(3)))
    assert blk.CONFIG_STRUCT.pack(*fields) == raw


@given(kind=st.integers(0, 2**32 - 1), ioprio=st.integers(0, 2**32 - 1),
       sector=st.integers(0, 2**64 - 1))
def test_outhdr_struct_matches_construct(kind: int, ioprio: int, sector: int) -> None:
    raw = BlkOutHdr.build(dict(type=kind, ioprio=ioprio, sector=sector))
    assert blk.OUTHDR_STRUCT.pack(kind, ioprio, sector) == raw


@given(sector=st.integers(0, 2**64 - 1), count=st.integers(0, 2**32 - 1),
       flags=st.integers(0, 2**32 - 1))
def test_dwz_struct_matches_construct(sector: int, count: int, flags: int) -> None:
    raw = DiscardWriteZeroes.build(dict(sector=sector, num_sectors=count, flags=flags))
    assert blk.DWZ_STRUCT.pack(sector, count, flags) == raw


@pytest.mark.parametrize(
    ("feature", "bit"),
    [
        ("BARRIER", 0), ("SIZE_MAX", 1), ("SEG_MAX", 2), ("GEOMETRY", 4), ("RO", 5),
        ("BLK_SIZE", 6), ("SCSI", 7), ("FLUSH", 9), ("TOPOLOGY", 10), ("CONFIG_WCE", 11),
        ("MQ", 12), ("DISCARD", 13), ("WRITE_ZEROES", 14), ("LIFETIME", 15),
        ("SECURE_ERASE", 16), ("ZONED", 17),
    ],
)
def test_feature_bits_match_spec(feature: str, bit: int) -> None:
    assert BlkFeature[feature] == bit


@pytest.mark.parametrize(
    ("name", "value"),
    [("IN", 0), ("OUT", 1), ("SCSI_CMD", 2), ("FLUSH", 4), ("GET_ID", 8),
     ("GET_LIFETIME", 10), ("DISCARD", 11), ("WRITE_ZEROES", 13), ("SECURE_ERASE", 14)],
)
def test_request_types_match_spec(name: str, value: int) -> None:
    assert RequestType[name] == value


def test_status_values_match_spec() -> None:
    assert [(s.name, int(s)) for s in Status] == [("OK", 0), ("IOERR", 1), ("UNSUPP", 2)]
