"""A virtio-blk device served end to end without a guest: the real server (open_device,
ServedBlkDevice.run over the real libvfio-user), a real image file, and a vfio-user client
that plays the guest driver: it maps a memfd as guest RAM, programs the modern common
configuration through BAR4 and lays out requests the way Linux virtio_blk does."""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from tests.server.conftest import GUEST_RAM_BYTES
from vfuserver.client import Client
from vfuserver.device import ServedBlkDevice, open_device
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

    def start(self, want: int) -> None:
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
        self.w(Reg.QUEUE_SIZE, QUEUE_SIZE, 2)
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
