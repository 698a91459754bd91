"""Virtio block device formats (virtio 1.x §5.2, device-types/blk/description.tex;
Linux uapi virtio_blk.h).

Feature bits, the device configuration layout (the same bytes at offset 20/24 of the
legacy IO BAR as in the modern device-specific area), the request header, the
discard/write-zeroes segment and the status byte. Legacy guests use guest-native
endianness, i.e. little-endian on every guest this project serves, so one set of
little-endian definitions covers both.

Sector numbers and counts are always in 512-byte units, whatever ``blk_size`` says
(§5.2.6 "Device Operation").
"""

from __future__ import annotations

import enum
import struct

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from vfuserver.protocol.fields import IntEnumAdapter
from vfuserver.protocol.virtio import FeatureBit

SECTOR_SIZE = 512
"""Unit of ``capacity``, ``sector`` and every ``*_sectors`` field (SECTOR_SHIFT 9)."""
SECTOR_SHIFT = 9
ID_BYTES = 20
"""VIRTIO_BLK_ID_BYTES: a GET_ID answer is the serial, zero-padded, not NUL-terminated
when all 20 bytes are used."""


class BlkFeature(FeatureBit):
    """Block device feature bit numbers (VIRTIO_BLK_F_*)."""

    BARRIER = 0
    """Legacy only: request barriers."""
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    SCSI = 7
    """Legacy only: SCSI packet commands."""
    FLUSH = 9
    """Called VIRTIO_BLK_F_WCE by legacy drivers (same bit)."""
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class RequestType(enum.IntEnum):
    """virtio_blk_outhdr.type (VIRTIO_BLK_T_*)."""

    IN = 0
    OUT = 1
    SCSI_CMD = 2
    """Legacy only."""
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


BARRIER_FLAG = 0x8000_0000
"""VIRTIO_BLK_T_BARRIER: legacy drivers may or it into ``type``; it means nothing here
(QEMU virtio_blk_handle_request masks it off)."""


class Status(enum.IntEnum):
    """The status byte the device writes last (VIRTIO_BLK_S_*)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class DiscardFlag(enum.IntFlag):
    """virtio_blk_discard_write_zeroes.flags."""

    UNMAP = 1
    """WRITE_ZEROES only: the device may deallocate the range (reads still give zeros)."""


# --------------------------------------------------------------------------------------
# Device configuration (§5.2.4)


class ConfigOffset(enum.IntEnum):
    """Byte offsets in struct virtio_blk_config."""

    CAPACITY = 0
    SIZE_MAX = 8
    SEG_MAX = 12
    GEOMETRY = 16
    BLK_SIZE = 20
    TOPOLOGY = 24
    WRITEBACK = 32
    NUM_QUEUES = 34
    MAX_DISCARD_SECTORS = 36
    MAX_DISCARD_SEG = 40
    DISCARD_SECTOR_ALIGNMENT = 44
    MAX_WRITE_ZEROES_SECTORS = 48
    MAX_WRITE_ZEROES_SEG = 52
    WRITE_ZEROES_MAY_UNMAP = 56


BlkGeometry = Struct(
    "cylinders" / Int16ul,
    "heads" / Int8ul,
    "sectors" / Int8ul,
)
"""struct virtio_blk_geometry; valid if VIRTIO_BLK_F_GEOMETRY."""

BlkTopology = Struct(
    "physical_block_exp" / Int8ul * "log2(physical blocks per logical block)",
    "alignment_offset" / Int8ul * "offset of the first aligned logical block",
    "min_io_size" / Int16ul * "suggested minimum I/O size, in logical blocks",
    "opt_io_size" / Int32ul * "optimal (suggested maximum) I/O size, in logical blocks",
)
"""The topology fields; valid if VIRTIO_BLK_F_TOPOLOGY."""

BlkConfig = Struct(
    "capacity" / Int64ul * "size of the disk in 512-byte sectors",
    "size_max" / Int32ul * "largest segment in bytes; valid if VIRTIO_BLK_F_SIZE_MAX",
    "seg_max" / Int32ul * "most segments in a request; valid if VIRTIO_BLK_F_SEG_MAX",
    "geometry" / BlkGeometry,
    "blk_size" / Int32ul * "logical block size in bytes; valid if VIRTIO_BLK_F_BLK_SIZE",
    "topology" / BlkTopology,
    "writeback" / Int8ul * "1 = write-back cache, 0 = write-through; VIRTIO_BLK_F_CONFIG_WCE",
    "unused0" / Int8ul,
    "num_queues" / Int16ul * "request queues; valid if VIRTIO_BLK_F_MQ",
    "max_discard_sectors" / Int32ul * "valid if VIRTIO_BLK_F_DISCARD",
    "max_discard_seg" / Int32ul * "segments in one DISCARD; valid if VIRTIO_BLK_F_DISCARD",
    "discard_sector_alignment" / Int32ul * "in 512-byte sectors; VIRTIO_BLK_F_DISCARD",
    "max_write_zeroes_sectors" / Int32ul * "valid if VIRTIO_BLK_F_WRITE_ZEROES",
    "max_write_zeroes_seg" / Int32ul * "segments in one WRITE_ZEROES",
    "write_zeroes_may_unmap" / Int8ul * "1 if WRITE_ZEROES with UNMAP may deallocate",
    "unused1" / Bytes(3),
)
"""struct virtio_blk_config up to the write-zeroes fields (60 bytes); the secure-erase
and zoned fields that follow belong to features this project does not offer."""

CONFIG_SIZE = 60
CONFIG_STRUCT = struct.Struct("<QII HBB I BBHI BBH IIIII B3x")
"""The whole of :data:`BlkConfig` flat, in field order, for building it on every read."""


# --------------------------------------------------------------------------------------
# Requests (§5.2.6)

BlkOutHdr = Struct(
    "type" / IntEnumAdapter(RequestType, Int32ul) * "RequestType, maybe | BARRIER_FLAG",
    "ioprio" / Int32ul * "a hint; ignored",
    "sector" / Int64ul * "first 512-byte sector of IN/OUT; 0 for the other types",
)
"""struct virtio_blk_outhdr: the first 16 device-readable bytes of every request."""

OUTHDR_SIZE = 16
OUTHDR_STRUCT = struct.Struct("<IIQ")
"""type, ioprio, sector."""

StatusByte = Struct("status" / IntEnumAdapter(Status, Int8ul))
"""The last device-writable byte of every request."""

DiscardWriteZeroes = Struct(
    "sector" / Int64ul * "first 512-byte sector",
    "num_sectors" / Int32ul * "512-byte sectors",
    "flags" / Int32ul * "DiscardFlag bits; others reserved (UNSUPP)",
)
"""struct virtio_blk_discard_write_zeroes: one segment of DISCARD / WRITE_ZEROES data."""

DWZ_SEGMENT_SIZE = 16
DWZ_STRUCT = struct.Struct("<QII")
"""sector, num_sectors, flags."""
