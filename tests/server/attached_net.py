"""A virtio-net device served end to end for data-path tests: open_device and
ServedNetDevice.run over the real libvfio-user with a real backend, a client that maps a
memfd as guest RAM, and the driver's receive and transmit queues laid out in that RAM and
set up on the model in-process (tests/devices/driver.py). Every kick is a real notify write
over the socket, at the queue's own notify address.
"""

from __future__ import annotations

import mmap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio

from tests.devices.driver import DriverQueue, GuestRam, driver_ok, negotiate_modern
from vfuserver.client import Client
from vfuserver.device import ServedNetDevice, open_device
from vfuserver.devices.virtio_net import RX_QUEUE, TX_QUEUE
from vfuserver.devices.virtio_pci import MODERN_BAR, NOTIFY_OFF_MULTIPLIER, Layout
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.virtio import Feature
from vfuserver.spec import DeviceSpec

_T = TypeVar("_T")
QUEUE_SIZE = 64


def frame(seq: int) -> bytes:
    """A 60-byte Ethernet frame numbered ``seq`` (broadcast, a local ethertype)."""
    return b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x88\xb5" + seq.to_bytes(4, "big") + bytes(42)


@dataclass
class AttachedNet:
    device: ServedNetDevice
    client: Client
    rx: DriverQueue
    tx: DriverQueue

    async def call(self, fn: Callable[..., _T], *args: object) -> _T:
        return await trio.to_thread.run_sync(fn, *args)

    async def kick(self, queue: int) -> None:
        """The driver's notify write at the queue's own address (queue_notify_off)."""
        await self.call(self.client.write, vu.PciRegion.BAR0 + MODERN_BAR,
                        Layout.NOTIFY + NOTIFY_OFF_MULTIPLIER * queue, queue.to_bytes(2, "little"))

    def counters(self) -> dict[str, int]:
        return self.device.stats()["fast_path"]


@asynccontextmanager
async def attached_net(spec: DeviceSpec, ram_fd: int, ram_bytes: int, nursery: trio.Nursery,
                       ) -> AsyncIterator[AttachedNet]:
    """The device of ``spec`` running in ``nursery``, a client attached with ``ram_bytes``
    of ``ram_fd`` mapped at IOVA 0, and both queues set up and DRIVER_OK."""
    device = await open_device(spec)
    assert isinstance(device, ServedNetDevice)
    await nursery.start(device.run)
    client = await trio.to_thread.run_sync(Client, spec.socket)
    try:
        with mmap.mmap(ram_fd, ram_bytes) as shared:
            await trio.to_thread.run_sync(client.dma_map, 0, ram_bytes, ram_fd)
            ram = GuestRam(ram_bytes, 0, shared=shared)
            with device.lock:  # the driver's probe, done on the model in-process
                negotiate_modern(device.net)
                event_idx = device.net.has_feature(Feature.RING_EVENT_IDX)
                rx, tx = (DriverQueue(ram, device.net.queues[index], size=QUEUE_SIZE,
                                      event_idx=event_idx) for index in (RX_QUEUE, TX_QUEUE))
                driver_ok(device.net)
            yield AttachedNet(device, client, rx, tx)
    finally:
        client.close()
