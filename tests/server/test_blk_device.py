"""A virtio-blk device served end to end without a guest: the real server (open_device,
ServedBlkDevice.run over the real libvfio-user), a real image file, and a vfio-user client
that plays the guest driver: it maps a memfd as guest RAM, programs the modern common
configuration through BAR4 and lays out requests the way Linux virtio_blk does."""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from tests.server.conftest import GUEST_RAM_BYTES
from vfuserver.client import Client
from vfuserver.device import ServedBlkDevice, open_device
from vfuserver.devices.virtio_blk import DESCRIPTOR_WEIGHT
from vfuserver.devices.virtio_pci import Layout
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol import virtio_blk as blk
from vfuserver.protocol.virtio import DeviceStatus, Feature
from vfuserver.protocol.virtio_blk import BlkFeature, RequestType, Status
from vfuserver.protocol.virtio_pci import CommonCfgRegister as Reg
from vfuserver.spec import DeviceSpec

RAM_IOVA, RAM_SIZE = 0x100000, GUEST_RAM_BYTES
QUEUE_SIZE = 64
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000  # offsets in RAM
DATA = 0x10000
BAR4 = vu.PciRegion.BAR4
_T = TypeVar("_T")


class BlkDriver:
    """The guest side: one request queue, no interrupts (the used ring is polled)."""

    def __init__(self, client: Client, ram: mmap.mmap) -> None:
        self.client = client
        self.ram = ram
        self.avail_idx = 0
        self.next_free = DATA
        self.features = 0
        self.notify_offset = 0

    def w(self, reg: int, value: int, size: int) -> None:
        self.client.write(BAR4, Layout.COMMON + reg, value.to_bytes(size, "little"))

    def r(self, reg: int, size: int) -> int:
        return int.from_bytes(self.client.read(BAR4, Layout.COMMON + reg, size), "little")

    def start(self, want: int, queue_size: int = QUEUE_SIZE) -> None:
        self.w(Reg.DEVICE_STATUS, 0, 1)
        self.w(Reg.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER, 1)
        offered = 0
        for select in (0, 1):
            self.w(Reg.DEVICE_FEATURE_SELECT, select, 4)
            offered |= self.r(Reg.DEVICE_FEATURE, 4) << (32 * select)
        self.features = offered & want
        for select in (0, 1):
            self.w(Reg.DRIVER_FEATURE_SELECT, select, 4)
            self.w(Reg.DRIVER_FEATURE, (self.features >> (32 * select)) & 0xFFFFFFFF, 4)
        ok = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        self.w(Reg.DEVICE_STATUS, ok, 1)
        assert self.r(Reg.DEVICE_STATUS, 1) & DeviceStatus.FEATURES_OK
        self.w(Reg.QUEUE_SELECT, 0, 2)
        self.w(Reg.QUEUE_SIZE, queue_size, 2)
        for reg, offset in ((Reg.QUEUE_DESC_LO, DESC), (Reg.QUEUE_DRIVER_LO, AVAIL),
                            (Reg.QUEUE_DEVICE_LO, USED)):
            self.w(reg, RAM_IOVA + offset, 4)
        self.notify_offset = self.r(Reg.QUEUE_NOTIFY_OFF, 2) * 4
        self.w(Reg.QUEUE_ENABLE, 1, 2)
        self.w(Reg.DEVICE_STATUS, ok | DeviceStatus.DRIVER_OK, 1)

    def config(self) -> bytes:
        return self.client.read(BAR4, Layout.DEVICE, blk.CONFIG_SIZE)

    def _buffer(self, size: int) -> int:
        addr = self.next_free
        self.next_free += (size + 15) & ~15
        return addr

    def request(self, kind: int, sector: int = 0, *, data: bytes = b"", read: int = 0
                ) -> tuple[int, int]:
        """Queue and kick one request; (offset of its read buffer, of its status byte)."""
        header = self._buffer(16)
        self.ram[header : header + 16] = blk.OUTHDR_STRUCT.pack(kind, 0, sector)
        parts = [(header, 16, 0)]
        if data:
            where = self._buffer(len(data))
            self.ram[where : where + len(data)] = data
            parts.append((where, len(data), 0))
        buffer = self._buffer(read) if read else 0
        if read:
            parts.append((buffer, read, 2))  # VRING_DESC_F_WRITE
        status = self._buffer(1)
        self.ram[status] = 0xFF
        parts.append((status, 1, 2))
        head = (self.avail_idx * 4) % QUEUE_SIZE
        for i, (addr, length, flags) in enumerate(parts):
            more = i + 1 < len(parts)
            struct.pack_into("<QIHH", self.ram, DESC + 16 * (head + i), RAM_IOVA + addr,
                             length, flags | (1 if more else 0), head + i + 1 if more else 0)
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % QUEUE_SIZE), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)
        self.client.write(BAR4, Layout.NOTIFY + self.notify_offset, b"\0\0")
        return buffer, status

    def wait_used(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while struct.unpack_from("<H", self.ram, USED + 2)[0] < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} requests not used in 10 s")
            time.sleep(0.00005)


def session(socket: str, ram_fd: int, body: Callable[[BlkDriver], _T]) -> _T:
    with Client(socket, timeout=10) as client, mmap.mmap(ram_fd, RAM_SIZE) as ram:
        client.dma_map(RAM_IOVA, RAM_SIZE, ram_fd)
        return body(BlkDriver(client, ram))


async def serve_disk(nursery: trio.Nursery, spec: DeviceSpec) -> ServedBlkDevice:
    device = await open_device(spec)
    assert isinstance(device, ServedBlkDevice)
    await nursery.start(device.run)
    return device


@pytest.mark.parametrize("profile", ["modern", "transitional"])
async def test_write_flush_read_through_the_server(tmp_path: Path, ram_fd: int,
                                                   nursery: trio.Nursery, profile: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    spec = DeviceSpec(name="disk0", socket=str(tmp_path / "d.sock"), type="virtio-blk",
                      image=str(image), serial="vfu-serial-1", profile=profile)
    device = await serve_disk(nursery, spec)
    payload = hashlib.sha256(b"0").digest() * 2048  # 64 KiB

    def body(driver: BlkDriver) -> tuple[bytes, bytes, bytes]:
        driver.start(Feature.VERSION_1.mask | BlkFeature.FLUSH.mask | BlkFeature.BLK_SIZE.mask)
        config = driver.config()
        _, written = driver.request(RequestType.OUT, 8, data=payload)
        _, flushed = driver.request(RequestType.FLUSH)
        driver.wait_used(2)
        read_at, read_status = driver.request(RequestType.IN, 8, read=len(payload))
        id_at, id_status = driver.request(RequestType.GET_ID, read=20)
        driver.wait_used(4)
        statuses = bytes(driver.ram[s] for s in (written, flushed, read_status, id_status))
        return config, statuses, bytes(driver.ram[read_at : read_at + len(payload)]) + bytes(
            driver.ram[id_at : id_at + 20])

    config, statuses, back = await trio.to_thread.run_sync(session, spec.socket, ram_fd, body)
    assert blk.BlkConfig.parse(config).capacity == (4 << 20) // 512
    assert statuses == bytes([Status.OK] * 4)
    assert back[: len(payload)] == payload
    assert back[len(payload) :] == b"vfu-serial-1".ljust(20, b"\0")
    assert image.read_bytes()[4096 : 4096 + len(payload)] == payload
    stats = device.stats()
    assert stats["virtio_blk"]["write_bytes"] == stats["virtio_blk"]["read_bytes"] == len(payload)
    assert stats["backend"]["completed"] == 3  # OUT, FLUSH, IN; GET_ID is answered at once


async def test_read_only_disk_refuses_writes(tmp_path: Path, ram_fd: int,
                                             nursery: trio.Nursery) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (1 << 20))
    os.chmod(image, 0o444)  # opened O_RDONLY: a read-only file is enough
    spec = DeviceSpec(name="disk0", socket=str(tmp_path / "d.sock"), type="virtio-blk",
                      image=str(image), readonly=True)
    await serve_disk(nursery, spec)

    def body(driver: BlkDriver) -> tuple[int, int, int]:
        driver.start(Feature.VERSION_1.mask | BlkFeature.RO.mask)
        _, written = driver.request(RequestType.OUT, 0, data=bytes(512))
        read_at, read_status = driver.request(RequestType.IN, 0, read=512)
        driver.wait_used(2)
        return driver.features, driver.ram[written], driver.ram[read_status] | (
            driver.ram[read_at] << 8)

    features, written, read = await trio.to_thread.run_sync(session, spec.socket, ram_fd, body)
    assert features & BlkFeature.RO.mask
    assert written == Status.IOERR and read == Status.OK | 0x5A << 8
    assert image.read_bytes() == b"\x5a" * (1 << 20)


async def test_request_queues_from_the_spec(tmp_path: Path, ram_fd: int,
                                           nursery: trio.Nursery) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    spec = DeviceSpec(name="disk0", socket=str(tmp_path / "d.sock"), type="virtio-blk",
                      image=str(image), queues=4)
    device = await serve_disk(nursery, spec)
    assert len(device.blk.queues) == 4
    config = await trio.to_thread.run_sync(session, spec.socket, ram_fd,
                                           lambda driver: driver.config())
    assert blk.BlkConfig.parse(config).num_queues == 4
    # one MSI-X vector per queue and one for configuration changes
    assert device.function.msix_vectors == 5


async def test_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    spec = DeviceSpec(name="disk0", socket=str(tmp_path / "d.sock"), type="virtio-blk",
                      image=str(tmp_path / "nope.img"))
    with pytest.raises(OSError, match=r"cannot open disk image .*nope.img: No such file"):
        await open_device(spec)
    assert not (tmp_path / "d.sock").exists()


FEEDER = """
import ctypes, mmap, sys, time
ram = mmap.mmap(int(sys.argv[1]), int(sys.argv[2]))
avail, statuses, size = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
avail_idx = ctypes.c_uint16.from_buffer(ram, avail + 2)  # one 16-bit store, as a driver's
deadline = time.monotonic() + float(sys.argv[6])
done = 0
print("feeding", flush=True)
while time.monotonic() < deadline:  # the guest's other vCPU: keep the ring full
    status = statuses + 32 * (done % size)
    if ram[status] != 0xFF:  # answered (the used index is published at the turn's end)
        ram[status] = 0xFF
        done += 1
        avail_idx.value = (done + size) & 0xFFFF
"""
"""A guest vCPU that puts each request back on the available ring as soon as its status
byte is written: the ring stays full for as long as the device keeps taking requests."""


async def test_a_guest_that_keeps_its_ring_full_does_not_stall_another_disk(
        tmp_path: Path, ram_fd: int, nursery: trio.Nursery) -> None:
    # Found by a hostile client: a kick took requests for as long as the ring had any, on
    # the event loop every disk shares; a guest that refilled its ring while the device
    # worked held it (and every other disk's completions, and the control socket) for as
    # long as it liked. A queue's turn now ends at a weight (DESCRIPTOR_WEIGHT here) and
    # the queue runs again after the other devices' work.
    hog_image, other_image = tmp_path / "hog.img", tmp_path / "other.img"
    for image in (hog_image, other_image):
        image.write_bytes(bytes(1 << 20))
    hog_spec = DeviceSpec(name="hog", socket=str(tmp_path / "hog.sock"), type="virtio-blk",
                          image=str(hog_image))
    other_spec = DeviceSpec(name="other", socket=str(tmp_path / "other.sock"),
                            type="virtio-blk", image=str(other_image))
    hog = await serve_disk(nursery, hog_spec)
    await serve_disk(nursery, other_spec)
    other_ram = os.memfd_create("other-guest-ram")
    os.ftruncate(other_ram, RAM_SIZE)
    size, per_request = 256, 8  # a full ring of 8-descriptor requests: 2048 descriptors
    tables, headers = DATA, DATA + 0x10000

    def hog_guest(driver: BlkDriver) -> None:
        driver.start(Feature.VERSION_1.mask | Feature.RING_INDIRECT_DESC.mask, size)
        for i in range(size):  # an unknown request type: answered UNSUPP at once
            header, status = headers + 32 * i, headers + 32 * i + 16
            driver.ram[header:header + 16] = blk.OUTHDR_STRUCT.pack(0x7F, 0, 0)
            driver.ram[status] = 0xFF
            table = tables + 16 * per_request * i
            parts = [(header, 16, 0)] + [(header, 1, 0)] * (per_request - 2) + [(status, 1, 2)]
            for j, (addr, length, flags) in enumerate(parts):
                more = j + 1 < per_request
                struct.pack_into("<QIHH", driver.ram, table + 16 * j, RAM_IOVA + addr, length,
                                 flags | (1 if more else 0), j + 1 if more else 0)
            struct.pack_into("<QIHH", driver.ram, DESC + 16 * i, RAM_IOVA + table,
                             16 * per_request, 4, 0)  # VRING_DESC_F_INDIRECT
            struct.pack_into("<H", driver.ram, AVAIL + 4 + 2 * i, i)
        struct.pack_into("<H", driver.ram, AVAIL + 2, size)
        feeder = subprocess.Popen(
            [sys.executable, "-c", FEEDER, str(ram_fd), str(RAM_SIZE), str(AVAIL),
             str(headers + 16), str(size), "60"],
            pass_fds=[ram_fd], stdout=subprocess.PIPE, text=True)
        try:
            assert feeder.stdout is not None and feeder.stdout.readline() == "feeding\n"
            driver.client.write(BAR4, Layout.NOTIFY + driver.notify_offset, b"\0\0")
            time.sleep(0.2)  # the kick is being served

            def other_guest(other: BlkDriver) -> int:
                other.start(Feature.VERSION_1.mask)
                _, status = other.request(RequestType.IN, 0, read=4096)
                other.wait_used(1)  # TimeoutError while the hog holds the loop
                return other.ram[status]

            assert session(other_spec.socket, other_ram, other_guest) == Status.OK
            assert feeder.poll() is None  # answered while the hog's guest kept feeding
        finally:
            feeder.kill()
            feeder.wait()
            assert feeder.stdout is not None
            feeder.stdout.close()

    try:
        await trio.to_thread.run_sync(session, hog_spec.socket, ram_fd, hog_guest)
    finally:
        os.close(other_ram)
    stats = hog.stats()["virtio_blk"]
    # the first turn found the full ring: it ended at the weight, and the queue ran again
    assert stats["requeued"] >= 1, stats
    assert stats["unsupported"] > DESCRIPTOR_WEIGHT // per_request, stats
