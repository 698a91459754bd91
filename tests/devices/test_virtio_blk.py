"""virtio-blk driven by the test-side driver, on real image files.

The device model is real, the image is a real file in tmp_path opened by the real
:class:`RawImage`; the only fake link is :class:`InlineBackend`, which runs the image's
blocking ``execute`` on the test's thread when the test says (so completion order is the
test's to choose), where the server runs it on worker threads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from construct import Container

from tests.devices.driver import (
    DriverQueue,
    GuestRam,
    RecordingInterrupts,
    Used,
    driver_ok,
    negotiate_legacy,
    negotiate_modern,
)
from tests.devices.legacy_driver import LegacyRig
from vfuserver.blkdev.raw import RawImage
from vfuserver.devices.virtio_blk import (
    BASE_FEATURES,
    BYTE_WEIGHT,
    DESCRIPTOR_WEIGHT,
    REQUEST_WEIGHT,
    WRITE_FEATURES,
    BlockRequest,
    VirtioBlk,
)
from vfuserver.devices.virtio_pci import VirtioPciFunction
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import virtio_blk as blk
from vfuserver.protocol.virtio import DeviceStatus, Feature
from vfuserver.protocol.virtio_blk import BlkFeature, RequestType, Status
from vfuserver.protocol.virtio_legacy import BAD_FEATURE, Register

DISK_SIZE = 1 << 20
QUEUE_SIZE = 64
SERIAL = b"vfu-disk-0001"


class InlineBackend:
    """A BlockBackend that runs :meth:`RawImage.execute` when :meth:`finish` is called."""

    def __init__(self, image: RawImage) -> None:
        self.image = image
        self.size = image.size
        self.block_size = image.block_size
        self.read_only = image.read_only
        self.pending: list[BlockRequest] = []
        self.refuse = False

    def submit(self, request: BlockRequest) -> None:
        if self.refuse:
            raise OSError(108, "the disk backend is not running")
        self.pending.append(request)

    def finish(self, device: VirtioBlk, order: Callable[[list[BlockRequest]], list[
            BlockRequest]] = lambda pending: pending) -> None:
        batch = order(self.pending)
        self.pending = [request for request in self.pending if request not in batch]
        for request in batch:
            self.image.execute(request)
        device.complete(batch)


def make_image(tmp_path: Path, size: int = DISK_SIZE) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (size // 256))
    return path


class Rig:
    def __init__(self, path: Path, *, read_only: bool = False, num_queues: int = 1,
                 legacy: bool = False, want: int | None = None) -> None:
        self.path = path
        self.ram = GuestRam()
        self.irqs = RecordingInterrupts()
        self.image = RawImage(str(path), read_only=read_only)
        self.backend = InlineBackend(self.image)
        self.dev = VirtioBlk(self.ram.memory, self.irqs, self.backend, num_queues=num_queues,
                             serial=SERIAL, queue_max_size=QUEUE_SIZE)
        if legacy:
            self.features = negotiate_legacy(self.dev, want)
        else:
            self.features = negotiate_modern(self.dev, want)
        self.queues = self.driver_queues(contiguous=legacy)
        driver_ok(self.dev)

    def driver_queues(self, *, contiguous: bool = False) -> list[DriverQueue]:
        event_idx = bool(self.features & Feature.RING_EVENT_IDX.mask)
        return [DriverQueue(self.ram, q, contiguous=contiguous, event_idx=event_idx)
                for q in self.dev.queues]

    def close(self) -> None:
        self.image.close()

    def submit(self, kind: int, sector: int = 0, *, data: bytes = b"", read: int = 0,
               queue: int = 0, status_bytes: int = 1, ioprio: int = 0) -> int:
        """A request as Linux virtblk_add_req lays it out: header, data, status."""
        header = blk.OUTHDR_STRUCT.pack(kind, ioprio, sector)
        out = [header] + ([data] if data else [])
        ins = ([read] if read else []) + ([status_bytes] if status_bytes else [])
        head = self.queues[queue].add(out, ins)
        self.dev.notify(queue)
        return head

    def used(self, queue: int = 0) -> list[Used]:
        return self.queues[queue].get_used()

    def finish(self, **kwargs: Callable[[list[BlockRequest]], list[BlockRequest]]) -> None:
        self.backend.finish(self.dev, **kwargs)

    def disk(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(make_image(tmp_path))
    yield r
    r.close()


def status_of(entry: Used) -> int:
    return entry.data[-1]


def test_features_and_config(rig: Rig) -> None:
    assert rig.features == BASE_FEATURES | WRITE_FEATURES
    config = blk.BlkConfig.parse(rig.dev.read_config(0, rig.dev.config_size))
    assert rig.dev.config_size == blk.CONFIG_SIZE
    assert config == Container(
        capacity=DISK_SIZE // 512, size_max=65536, seg_max=QUEUE_SIZE - 2,
        geometry=Container(cylinders=0, heads=0, sectors=0), blk_size=512,
        topology=Container(physical_block_exp=0, alignment_offset=0, min_io_size=0,
                           opt_io_size=0),
        writeback=1, unused0=0, num_queues=1, max_discard_sectors=0x3FFFFF,
        max_discard_seg=1, discard_sector_alignment=1, max_write_zeroes_sectors=0x3FFFFF,
        max_write_zeroes_seg=1, write_zeroes_may_unmap=1, unused1=bytes(3))


def test_write_then_read_reaches_the_file(rig: Rig) -> None:
    data = os.urandom(8192)
    rig.submit(RequestType.OUT, 16, data=data)
    assert rig.used() == []  # not before the disk has it
    rig.finish()
    [done] = rig.used()
    assert status_of(done) == Status.OK and done.length == 1
    assert rig.disk()[16 * 512 : 16 * 512 + 8192] == data
    rig.submit(RequestType.IN, 16, read=8192)
    rig.finish()
    [done] = rig.used()
    assert done.length == 8193 and done.data == data + b"\0"
    assert rig.irqs.queue == [0, 0]
    assert (rig.dev.stats.read_bytes, rig.dev.stats.write_bytes) == (8192, 8192)


def test_requests_complete_out_of_order(rig: Rig) -> None:
    first = rig.submit(RequestType.IN, 0, read=512)
    second = rig.submit(RequestType.IN, 1, read=512)
    rig.finish(order=lambda pending: pending[1:])  # the disk finishes the second first
    [done] = rig.used()
    assert done.head == second and done.data[:512] == bytes(range(256)) * 2
    rig.finish()
    [done] = rig.used()
    assert done.head == first
    assert rig.dev.stats.in_flight == 0


def test_flush_and_get_id(rig: Rig) -> None:
    rig.submit(RequestType.FLUSH)
    rig.finish()
    [flushed] = rig.used()
    assert status_of(flushed) == Status.OK and rig.dev.stats.flush_ops == 1
    rig.submit(RequestType.GET_ID, read=blk.ID_BYTES)  # answered at once
    [ident] = rig.used()
    assert ident.data == SERIAL.ljust(20, b"\0") + b"\0"
    rig.submit(RequestType.GET_ID, read=4)  # QEMU: at most the buffer's length
    [short] = rig.used()
    assert short.data == SERIAL[:4] + b"\0"


def test_barrier_flag_of_legacy_drivers_is_ignored(rig: Rig) -> None:
    rig.submit(RequestType.OUT | blk.BARRIER_FLAG, 2, data=b"\xaa" * 512)
    rig.finish()
    assert status_of(rig.used()[0]) == Status.OK
    assert rig.disk()[1024:1536] == b"\xaa" * 512


def test_write_zeroes_and_discard(rig: Rig) -> None:
    segment = blk.DWZ_STRUCT.pack(8, 16, 0)
    rig.submit(RequestType.WRITE_ZEROES, data=segment)
    rig.submit(RequestType.WRITE_ZEROES, data=blk.DWZ_STRUCT.pack(64, 8, blk.DiscardFlag.UNMAP))
    rig.submit(RequestType.DISCARD, data=blk.DWZ_STRUCT.pack(128, 8, 0))
    rig.finish()
    assert [status_of(u) for u in rig.used()] == [Status.OK] * 3
    disk = rig.disk()
    assert disk[4096 : 4096 + 8192] == bytes(8192)
    assert disk[4096 - 1] == 255 and disk[4096 + 8192] == 0  # only the range
    assert disk[64 * 512 : 72 * 512] == bytes(4096)
    assert len(disk) == DISK_SIZE  # KEEP_SIZE
    # discard is advisory: the range may keep its data, but the file keeps its size
    assert (rig.dev.stats.write_zeroes_ops, rig.dev.stats.discard_ops) == (2, 1)


REFUSED = [
    pytest.param(dict(kind=RequestType.IN, sector=DISK_SIZE // 512, read=512), Status.IOERR,
                 id="read-beyond-the-disk"),
    pytest.param(dict(kind=RequestType.IN, sector=DISK_SIZE // 512 - 1, read=1024),
                 Status.IOERR, id="read-straddling-the-end"),
    pytest.param(dict(kind=RequestType.IN, sector=2**63, read=512), Status.IOERR,
                 id="read-at-huge-sector"),
    pytest.param(dict(kind=RequestType.OUT, sector=0, data=b"x" * 100), Status.IOERR,
                 id="write-of-a-partial-sector"),
    pytest.param(dict(kind=RequestType.IN, sector=0, read=700), Status.IOERR,
                 id="read-of-a-partial-sector"),
    pytest.param(dict(kind=RequestType.SCSI_CMD), Status.UNSUPP, id="scsi-command"),
    pytest.param(dict(kind=RequestType.GET_LIFETIME, read=16), Status.UNSUPP,
                 id="get-lifetime-not-offered"),
    pytest.param(dict(kind=RequestType.SECURE_ERASE, data=bytes(16)), Status.UNSUPP,
                 id="secure-erase-not-offered"),
    pytest.param(dict(kind=0x7777), Status.UNSUPP, id="reserved-type"),
    pytest.param(dict(kind=RequestType.DISCARD, data=blk.DWZ_STRUCT.pack(0, 8, 0) * 2),
                 Status.UNSUPP, id="discard-two-segments"),
    pytest.param(dict(kind=RequestType.DISCARD, data=blk.DWZ_STRUCT.pack(0, 8, 1)),
                 Status.UNSUPP, id="discard-with-unmap"),
    pytest.param(dict(kind=RequestType.WRITE_ZEROES, data=blk.DWZ_STRUCT.pack(0, 8, 2)),
                 Status.UNSUPP, id="write-zeroes-reserved-flag"),
    pytest.param(dict(kind=RequestType.WRITE_ZEROES, data=bytes(8)), Status.IOERR,
                 id="write-zeroes-short-segment"),
    pytest.param(dict(kind=RequestType.DISCARD,
                      data=blk.DWZ_STRUCT.pack(DISK_SIZE // 512 - 4, 8, 0)),
                 Status.IOERR, id="discard-beyond-the-disk"),
]


@pytest.mark.parametrize(("request_args", "status"), REFUSED)
def test_bad_requests_get_a_status(rig: Rig, request_args: dict[str, object],
                                   status: Status) -> None:
    before = rig.disk()
    rig.submit(**request_args)  # type: ignore[arg-type]
    [done] = rig.used()  # answered at once: the backend never saw it
    assert status_of(done) == status and rig.backend.pending == []
    assert not rig.dev.broken and rig.disk() == before
    # and the device goes on working
    rig.submit(RequestType.IN, 0, read=512)
    rig.finish()
    assert status_of(rig.used()[0]) == Status.OK


def test_short_header_is_an_io_error(rig: Rig) -> None:
    rig.queues[0].add([b"\x00" * 8], [1])
    rig.dev.notify(0)
    [done] = rig.used()
    assert done.data == bytes([Status.IOERR]) and not rig.dev.broken


def test_chain_without_status_byte_needs_reset(rig: Rig) -> None:
    rig.submit(RequestType.IN, 0, status_bytes=0)
    assert rig.dev.broken and rig.dev.status & DeviceStatus.NEEDS_RESET
    assert rig.used() == []


def test_host_io_error_answers_ioerr(rig: Rig) -> None:
    os.truncate(rig.path, DISK_SIZE // 2)  # the image shrinks under the device
    rig.submit(RequestType.IN, DISK_SIZE // 512 - 1, read=512)
    rig.finish()
    [done] = rig.used()
    assert status_of(done) == Status.IOERR and rig.dev.stats.io_errors == 1
    assert not rig.dev.broken


def test_backend_refusing_a_request_answers_ioerr(rig: Rig) -> None:
    rig.backend.refuse = True
    rig.submit(RequestType.FLUSH)
    assert status_of(rig.used()[0]) == Status.IOERR


def test_reset_drops_completions_of_older_requests(rig: Rig) -> None:
    rig.submit(RequestType.IN, 0, read=512)
    stale = rig.backend.pending
    rig.dev.set_status(0)
    negotiate_modern(rig.dev)
    rig.queues = rig.driver_queues()
    driver_ok(rig.dev)
    rig.finish(order=lambda pending: stale)
    assert rig.used() == [] and rig.dev.stats.stale_completions == 1
    assert not rig.dev.broken


def test_in_flight_data_is_bounded_and_the_rest_waits(rig: Rig) -> None:
    rig.dev.max_in_flight_bytes = 8192
    heads = [rig.submit(RequestType.IN, 8 * i, read=4096) for i in range(3)]
    assert len(rig.backend.pending) == 2  # the third stays in the ring
    assert rig.dev.stats.throttled == 1 and rig.queues[0].queue.available() == 1
    rig.finish()  # the completions free the budget: the third goes to the backend
    assert [u.head for u in rig.used()] == heads[:2]
    assert len(rig.backend.pending) == 1
    rig.finish()
    assert [u.head for u in rig.used()] == heads[2:]
    assert rig.dev.stats.in_flight_bytes == 0


def test_legacy_queue_removed_while_a_request_is_on_the_disk(tmp_path: Path) -> None:
    rig = Rig(make_image(tmp_path), legacy=True)
    try:
        rig.submit(RequestType.IN, 0, read=512)
        rig.dev.queues[0].place_contiguous(0)  # QUEUE_PFN 0 (Linux legacy del_vq)
        rig.finish()
        assert rig.dev.stats.stale_completions == 1 and not rig.dev.broken
    finally:
        rig.close()


def test_ring_moved_under_a_request_needs_reset(rig: Rig) -> None:
    rig.submit(RequestType.IN, 0, read=512)
    rig.dev.queues[0].used_addr = rig.ram.end + 0x1000  # outside guest memory
    rig.finish()  # no exception: the device stops, the driver is told
    assert rig.dev.broken and rig.dev.status & DeviceStatus.NEEDS_RESET


def test_buffers_unmapped_before_completion_need_reset(rig: Rig) -> None:
    rig.submit(RequestType.IN, 0, read=512)
    rig.ram.memory.clear()  # the client unmapped guest memory meanwhile
    rig.finish()
    assert rig.dev.broken  # and no crash, no write outside the maps


def test_read_only_disk(tmp_path: Path) -> None:
    rig = Rig(make_image(tmp_path), read_only=True)
    try:
        assert rig.features & BlkFeature.RO.mask and not rig.features & WRITE_FEATURES
        before = rig.disk()
        rig.submit(RequestType.OUT, 0, data=bytes(512))
        rig.submit(RequestType.DISCARD, data=blk.DWZ_STRUCT.pack(0, 8, 0))
        assert [status_of(u) for u in rig.used()] == [Status.IOERR, Status.UNSUPP]
        assert rig.disk() == before
        config = blk.BlkConfig.parse(rig.dev.read_config(0, blk.CONFIG_SIZE))
        assert config.max_discard_sectors == config.max_write_zeroes_sectors == 0
    finally:
        rig.close()


def test_write_through_without_flush_and_config_wce(tmp_path: Path) -> None:
    rig = Rig(make_image(tmp_path), want=~BlkFeature.FLUSH.mask)
    try:
        # QEMU virtio_blk_set_features: no FLUSH, so writes go through (fua)
        assert rig.dev.read_config(blk.ConfigOffset.WRITEBACK, 1) == b"\0"
        rig.submit(RequestType.OUT, 0, data=bytes(512))
        assert rig.backend.pending[0].fua
        rig.finish()
        rig.dev.write_config(blk.ConfigOffset.WRITEBACK, b"\x01")  # CONFIG_WCE
        rig.submit(RequestType.OUT, 0, data=bytes(512))
        assert not rig.backend.pending[0].fua
        rig.finish()
    finally:
        rig.close()


def test_writeback_is_read_only_without_config_wce(tmp_path: Path) -> None:
    rig = Rig(make_image(tmp_path), want=~BlkFeature.CONFIG_WCE.mask)
    try:
        rig.dev.write_config(blk.ConfigOffset.WRITEBACK, b"\x00")
        assert rig.dev.writeback
    finally:
        rig.close()


def test_multiple_queues(tmp_path: Path) -> None:
    rig = Rig(make_image(tmp_path), num_queues=4)
    try:
        assert rig.dev.read_config(blk.ConfigOffset.NUM_QUEUES, 2) == b"\x04\x00"
        rig.submit(RequestType.IN, 0, read=512, queue=3)
        rig.submit(RequestType.IN, 2, read=512, queue=1)
        rig.finish()
        assert rig.irqs.queue == [3, 1]
        assert rig.used(3)[0].data[:4] == bytes([0, 1, 2, 3])
        assert rig.used(1)[0].data[:4] == bytes([0, 1, 2, 3])
    finally:
        rig.close()


def test_legacy_driver_sees_bits_0_to_31(tmp_path: Path) -> None:
    rig = Rig(make_image(tmp_path), legacy=True)
    try:
        assert rig.dev.legacy and rig.features == (BASE_FEATURES | WRITE_FEATURES) & 0xFFFF_FFFF
        assert not rig.dev.has_feature(Feature.VERSION_1)
        data = hashlib.sha256(b"legacy").digest() * 16
        rig.submit(RequestType.OUT, 8, data=data)
        rig.finish()
        rig.submit(RequestType.IN, 8, read=512)
        rig.finish()
        assert [status_of(u) for u in rig.used()] == [Status.OK, Status.OK]
        assert rig.disk()[4096 : 4096 + 512] == data
    finally:
        rig.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(num_queues=0), "request queues"), (dict(serial=b"x" * 21), "longer than 20")],
)
def test_bad_construction(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    image = RawImage(str(make_image(tmp_path)))
    try:
        with pytest.raises(ValueError, match=message):
            VirtioBlk(GuestRam().memory, RecordingInterrupts(), InlineBackend(image),
                      **kwargs)  # type: ignore[arg-type]
    finally:
        image.close()


# -- the PCI presentations ---------------------------------------------------------------


def test_modern_identity(rig: Rig) -> None:
    function = VirtioPciFunction(rig.dev, name="d", msix_vectors=2)
    header = pcifmt.Type0Header.parse(function.config_region().read(0, 64))
    assert (header.vendor_id, header.device_id, header.revision_id) == (0x1AF4, 0x1042, 1)
    assert (header.base_class, header.subclass) == (0x01, 0x00)  # PCI_CLASS_STORAGE_SCSI
    assert (header.subsystem_vendor_id, header.subsystem_id) == (0x1AF4, 0x1100)


def test_transitional_identity_and_legacy_config(rig: Rig) -> None:
    legacy = LegacyRig(rig.ram, rig.dev)
    header = pcifmt.Type0Header.parse(legacy.config.read(0, 64))
    assert (header.device_id, header.revision_id) == (0x1001, 0)
    assert (header.subsystem_vendor_id, header.subsystem_id) == (0x1AF4, 0x0002)
    assert legacy.fn.bar0_size == 128  # 24 + 60 config bytes, rounded up
    legacy.legacy_driver_start()
    capacity = (DISK_SIZE // 512).to_bytes(8, "little")
    # the device config follows the 20-byte header, or the 24-byte one with MSI-X
    assert legacy.bar0.read(20, 4) + legacy.bar0.read(24, 4) == capacity
    legacy.set_msix(True)
    assert legacy.bar0.read(24, 4) + legacy.bar0.read(28, 4) == capacity
    assert legacy.read(24 + blk.ConfigOffset.BLK_SIZE, 4) == 512
    # QEMU's virtio_ioport_read: the 32 low bits, with VIRTIO_F_BAD_FEATURE (30) offered
    assert legacy.read(Register.HOST_FEATURES, 4) == (
        BASE_FEATURES | WRITE_FEATURES | 1 << BAD_FEATURE) & 0xFFFFFFFF


# -- the raw image under the device ------------------------------------------------------


def test_direct_io_round_trip(tmp_path: Path) -> None:
    path = make_image(tmp_path)
    ram = GuestRam()
    image = RawImage(str(path), direct=True)
    try:
        backend = InlineBackend(image)
        dev = VirtioBlk(ram.memory, RecordingInterrupts(), backend, queue_max_size=QUEUE_SIZE)
        negotiate_modern(dev)
        queue = DriverQueue(ram, dev.queues[0])
        driver_ok(dev)
        data = os.urandom(4096)
        queue.add([blk.OUTHDR_STRUCT.pack(RequestType.OUT, 0, 8), data], [1])
        queue.add([blk.OUTHDR_STRUCT.pack(RequestType.IN, 0, 8)], [4096, 1])
        dev.notify(0)
        backend.finish(dev)
        done = queue.get_used()
        assert [u.data[-1] for u in done] == [Status.OK, Status.OK]
        assert done[1].data[:4096] == data and path.read_bytes()[4096:8192] == data
    finally:
        image.close()


def test_image_size_is_whole_sectors_and_other_files_are_refused(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(4096 + 100))
    image = RawImage(str(odd))
    assert image.size == 4096
    image.close()
    image.close()  # idempotent
    with pytest.raises(OSError, match="neither a regular file nor a block device"):
        RawImage(os.devnull, read_only=True)  # a character device
    with pytest.raises(OSError, match="Is a directory"):
        RawImage(str(tmp_path))
    with pytest.raises(OSError, match=r"cannot open disk image .*absent.img"):
        RawImage(str(tmp_path / "absent.img"))


# -- one queue's turn is bounded (a guest cannot hold the thread devices share) -------------


def _unsupported_requests(queue: DriverQueue, count: int, *, descriptors: int = 2) -> list[int]:
    """``count`` requests of a type the device does not know (answered UNSUPP at once),
    each an indirect chain of ``descriptors``: the header, one-byte reads, the status."""
    header = blk.OUTHDR_STRUCT.pack(0x7F, 0, 0)
    out = [header] + [b"\0"] * (descriptors - 2)
    heads = [queue.add(out, [1], indirect=True, publish=False) for _ in range(count)]
    queue.publish(*heads)
    return heads


def test_a_turn_stops_at_the_descriptor_weight_and_asks_for_another(rig: Rig) -> None:
    pending: list[int] = []
    rig.dev.on_queue_pending = lambda: pending.append(rig.dev.stats.unsupported)
    per_request = 32
    heads = _unsupported_requests(rig.queues[0], QUEUE_SIZE, descriptors=per_request)
    rig.dev.notify(0)
    first = DESCRIPTOR_WEIGHT // per_request
    assert [u.head for u in rig.used()] == heads[:first]
    assert pending == [first] and rig.dev.stats.requeued == 1
    rig.dev.notify(0)  # a kick before the next turn: the device's weight is spent
    assert rig.used() == [] and pending == [first]
    rig.dev.run_pending()  # the next turn
    assert [u.head for u in rig.used()] == heads[first:]
    rig.dev.run_pending()  # the ring is empty: nothing more was asked for
    assert rig.used() == [] and pending == [first] and rig.dev.stats.requeued == 1


def test_the_weights_hold_for_the_device_whichever_queues_are_kicked(tmp_path: Path) -> None:
    rig = Rig(make_image(tmp_path), num_queues=4)
    asked: list[int] = []
    rig.dev.on_queue_pending = lambda: asked.append(rig.dev.stats.unsupported)
    per_request, per_queue = 32, 16  # 4 queues x 16 requests x 32 descriptors: 2048
    heads = [_unsupported_requests(q, per_queue, descriptors=per_request)
             for q in rig.queues]
    for index in range(4):
        rig.dev.notify(index)
    first = DESCRIPTOR_WEIGHT // per_request  # two queues' worth
    assert [len(rig.used(i)) for i in range(4)] == [16, 16, 0, 0]
    assert rig.dev.stats.unsupported == first and asked == [first, first]
    rig.dev.run_pending()
    assert [[u.head for u in rig.used(i)] for i in range(4)] == [[], [], heads[2], heads[3]]
    rig.close()


def test_a_full_ring_of_flushes_cannot_grow_with_resets(rig: Rig) -> None:
    # Found in review: requests without data (FLUSH, DISCARD, WRITE_ZEROES) counted no
    # bytes, so resetting and refilling the queue piled them up on the backend.
    for _ in range(3):
        for _ in range(QUEUE_SIZE // 2):
            rig.submit(RequestType.FLUSH)
        rig.dev.set_status(0)
        negotiate_modern(rig.dev)
        rig.queues = rig.driver_queues()
        driver_ok(rig.dev)
    assert len(rig.backend.pending) == QUEUE_SIZE == rig.dev.max_in_flight
    assert rig.dev.stats.throttled >= 1
    rig.finish()
    assert rig.dev.stats.in_flight == 0 and rig.dev.stats.stale_completions == QUEUE_SIZE


def test_a_turn_stops_at_the_request_weight(tmp_path: Path) -> None:
    ram = GuestRam()
    image = RawImage(str(make_image(tmp_path)))
    dev = VirtioBlk(ram.memory, RecordingInterrupts(), InlineBackend(image),
                    queue_max_size=1024)
    negotiate_modern(dev)
    queue = DriverQueue(ram, dev.queues[0])
    driver_ok(dev)
    asked: list[int] = []
    dev.on_queue_pending = lambda: asked.append(dev.stats.unsupported)
    heads = _unsupported_requests(queue, REQUEST_WEIGHT + 10)
    dev.notify(0)
    assert [u.head for u in queue.get_used()] == heads[:REQUEST_WEIGHT]
    assert asked == [REQUEST_WEIGHT]
    dev.run_pending()
    assert [u.head for u in queue.get_used()] == heads[REQUEST_WEIGHT:]
    image.close()


def test_a_turn_stops_at_the_byte_weight(rig: Rig) -> None:
    asked: list[int] = []
    rig.dev.on_queue_pending = lambda: asked.append(len(rig.backend.pending))
    size = 1 << 20
    queue = rig.queues[0]
    header = blk.OUTHDR_STRUCT
    heads = [queue.add([header.pack(RequestType.OUT, 0, 0), bytes(size)], [1],
                       indirect=True, publish=False) for _ in range(6)]
    queue.publish(*heads)
    rig.dev.notify(0)
    # the request that reaches the weight is the turn's last
    assert asked == [BYTE_WEIGHT // (size + blk.OUTHDR_SIZE) + 1]
    rig.dev.run_pending()
    assert len(rig.backend.pending) == 6 and asked == asked[:1]


def test_without_a_scheduler_a_turn_takes_everything(rig: Rig) -> None:
    heads = _unsupported_requests(rig.queues[0], QUEUE_SIZE, descriptors=32)
    rig.dev.notify(0)
    assert [u.head for u in rig.used()] == heads and rig.dev.stats.requeued == 0


def test_a_reset_keeps_counting_what_the_backend_holds(rig: Rig) -> None:
    # Issue found by a hostile client: a reset zeroed the in-flight budget while the
    # backend still held the requests' data, so resetting and refilling the queue over
    # and over grew the server's memory without bound.
    rig.dev.max_in_flight_bytes = 8192
    for i in range(2):
        rig.submit(RequestType.OUT, 8 * i, data=bytes(4096))
    held = list(rig.backend.pending)
    assert rig.dev.stats.in_flight_bytes == 8192
    rig.dev.set_status(0)
    negotiate_modern(rig.dev)
    rig.queues = rig.driver_queues()
    driver_ok(rig.dev)
    assert rig.dev.stats.in_flight == 2 and rig.dev.stats.in_flight_bytes == 8192
    rig.submit(RequestType.OUT, 64, data=bytes(4096))
    assert rig.backend.pending == held  # the new request waits for the old ones' data
    assert rig.dev.stats.throttled == 1
    rig.finish(order=lambda pending: held)  # stale: dropped, but their data is let go
    assert rig.dev.stats.stale_completions == 2
    assert len(rig.backend.pending) == 1 and rig.dev.stats.in_flight_bytes == 4096
    rig.finish()
    assert status_of(rig.used()[0]) == Status.OK
    assert rig.dev.stats.in_flight == 0 and rig.dev.stats.in_flight_bytes == 0


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (e2fsprogs)")
def test_an_image_that_cannot_be_written_names_readonly(tmp_path: Path) -> None:
    # Found trying the server as an operator: an immutable image said only "Operation not
    # permitted".
    path = make_image(tmp_path)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip(f"the file system of {tmp_path} has no immutable attribute")
    try:
        with pytest.raises(OSError, match=r"Operation not permitted \(to serve it read-only: "
                                          r"--readonly, or readonly = true\)"):
            RawImage(str(path))
        RawImage(str(path), read_only=True).close()
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_image_without_a_whole_sector_is_refused(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(bytes(100))
    with pytest.raises(OSError, match=r"holds 100 bytes, not one whole 512-byte sector"):
        RawImage(str(tiny))


def test_an_image_in_use_is_refused_as_qemu_refuses_it(tmp_path: Path) -> None:
    # Found trying the server as an operator: two devices given the same image for
    # writing were both served, and their guests' writes would have corrupted it. The
    # image now carries QEMU's locks (tests/e2e/test_blk.py: against a real QEMU).
    path = make_image(tmp_path)
    writer = RawImage(str(path))
    for read_only in (False, True):
        with pytest.raises(OSError, match=r"disk image .* is in use: .* write permission"):
            RawImage(str(path), read_only=read_only)
    writer.close()
    readers = [RawImage(str(path), read_only=True) for _ in range(2)]  # readers share
    with pytest.raises(OSError, match=r"is in use: another user of it does not share the "
                                      r"write permission"):
        RawImage(str(path))
    for reader in readers:
        reader.close()
    RawImage(str(path)).close()  # closing lets go of the locks
