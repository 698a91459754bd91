"""A virtio-net function served through a real libvfio-user, and a client that sets up
its queues the way a guest would: for tests of what a client does with guest memory.

The test process plays QEMU and the guest at once: its :class:`~vfuserver.client.Client`
maps a memfd the test also mmaps, and the test-side driver (tests/devices/driver.py) lays
out rings and buffers in that shared memory; the device reads them through the DMA maps
libvfio-user registered.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from tests.devices.driver import (
    DriverQueue,
    GuestRam,
    RecordingInterrupts,
    RecordingPeer,
    driver_ok,
    negotiate_modern,
)
from vfuserver.client import Client
from vfuserver.context import VfuContext
from vfuserver.devices.memory import GuestMemory
from vfuserver.devices.virtio_net import TX_QUEUE, VirtioNet
from vfuserver.devices.virtio_pci import MODERN_BAR, Layout, VirtioPciFunction
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.pci import ClassCode
from vfuserver.protocol.virtio import DeviceStatus

MIB = 1 << 20
PAGE = mmap.PAGESIZE
MAC = bytes.fromhex("525400abcdef")


@dataclass
class ServedNet:
    """A virtio-net function served over a real libvfio-user context."""

    context: VfuContext
    net: VirtioNet
    peer: RecordingPeer


@asynccontextmanager
async def connected(context: VfuContext) -> AsyncIterator[Client]:
    """A client connected from a worker thread (it blocks for the server's replies)."""
    client = await trio.to_thread.run_sync(Client, context.socket_path)
    try:
        yield client
    finally:
        client.close()


def memfd(size: int, *, sealable: bool = False) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, size)
    return fd


def transmit_queue(net: VirtioNet, shared: mmap.mmap) -> DriverQueue:
    """Linux's probe on the device model, with the rings at the start of ``shared``
    (guest RAM at IOVA 0), as the guest would leave them before kicking."""
    negotiate_modern(net)
    ram = GuestRam(len(shared), 0, shared=shared)
    queue = DriverQueue(ram, net.queues[TX_QUEUE])
    driver_ok(net)
    return queue


async def kick_transmit(context: VfuContext, client: Client) -> None:
    """The driver's notify write for the transmit queue (modern BAR, notify area), and the
    kick run by the model, as the server's kick task runs it (the fast path only records
    it). The test drove the model directly, so what it changed is published first, as a
    release of the device lock does."""
    with context.lock:
        pass
    await trio.to_thread.run_sync(client.write, vu.PciRegion.BAR0 + MODERN_BAR, Layout.NOTIFY,
                                  TX_QUEUE.to_bytes(2, "little"))
    context.process_kicks()


async def detached(context: VfuContext, timeout: float = 10.0) -> None:
    """Wait until the serving thread has seen the client go (libvfio-user unmapped its
    maps and reset the device): a client's close reaches the server asynchronously."""
    with trio.fail_after(timeout):
        while context.client_attached:
            await trio.sleep(0.005)


def needs_reset(net: VirtioNet) -> bool:
    return bool(net.status & DeviceStatus.NEEDS_RESET)


def errors_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def served_net(socket_path: str, name: str) -> ServedNet:
    """A virtio-net device (no backend: a recording peer) and the context serving it."""
    memory = GuestMemory()
    peer = RecordingPeer()
    net = VirtioNet(memory, RecordingInterrupts(), peer, mac=MAC, queue_max_size=64,
                    name=name)
    function = VirtioPciFunction(net, name=name, class_code=ClassCode.NETWORK_ETHERNET)
    return ServedNet(VfuContext(socket_path, function, memory=memory), net, peer)
