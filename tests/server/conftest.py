"""Fixtures that serve real libvfio-user contexts inside the test's trio loop.

The vfio-user client is synchronous (like QEMU's vCPU threads, it blocks for replies),
so tests run it in a worker thread with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from tests.server.served_net import ServedNet, served_net
from vfuserver.client import Client
from vfuserver.context import VfuContext
from vfuserver.devices.pci import Bar, BarKind, ConfigSpace, Interrupts, ResetKind
from vfuserver.protocol import vfio_user as vu
from vfuserver.server import serve_device


class ScratchRegion:
    """A BAR backed by plain memory."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data


class ScratchFunction:
    """The smallest real PCI function: a header and one 4 KiB memory BAR."""

    msix_vectors = 2
    intx = True

    def __init__(self, name: str = "scratch") -> None:
        self.name = name
        self.config = ConfigSpace()
        self.config.set_header(vendor_id=0x1AF4, device_id=0x10FF, revision_id=1,
                               base_class=0xFF, interrupt_pin=1)
        self.bar0 = ScratchRegion(4096)
        self.config.add_bar(Bar(0, 4096, BarKind.MEM32, self.bar0))
        self.resets: list[ResetKind] = []
        self.interrupts: Interrupts | None = None

    def config_region(self) -> ConfigSpace:
        return self.config

    def bars(self) -> list[Bar]:
        return list(self.config.bars.values())

    def attach_interrupts(self, interrupts: Interrupts) -> None:
        self.interrupts = interrupts

    def reset(self, kind: ResetKind) -> None:
        self.resets.append(kind)

    def counters(self) -> dict[str, dict[str, int]]:
        return {}

    def close(self) -> None:
        pass


ServeFn = Callable[..., "trio.lowlevel.Task"]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[[object, str], trio.Event]]:
    """serve(function, name) starts serving ``function`` on tmp_path/name.sock."""
    contexts: list[VfuContext] = []
    async with trio.open_nursery() as nursery:

        async def start(function: object, name: str = "dev") -> VfuContext:
            context = VfuContext(str(tmp_path / f"{name}.sock"), function)  # type: ignore[arg-type]
            contexts.append(context)
            await nursery.start(serve_device, context)
            return context

        yield start  # type: ignore[misc]
        nursery.cancel_scope.cancel()
    for context in contexts:
        context.close()


@pytest.fixture
async def serve_net(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServedNet]]]:
    """serve_net(name) serves a virtio-net device (tests/server/served_net.py) on
    tmp_path/name.sock, in the test's trio loop."""
    served: list[ServedNet] = []
    async with trio.open_nursery() as nursery:

        async def start(name: str = "net") -> ServedNet:
            device = served_net(str(tmp_path / f"{name}.sock"), name)
            served.append(device)
            await nursery.start(serve_device, device.context)
            return device

        yield start
        nursery.cancel_scope.cancel()
    for device in served:
        device.context.close()

GUEST_RAM_BYTES = 4 << 20
"""Size of the :func:`ram_fd` memfd: guest RAM a test client maps (any part of it)."""


@pytest.fixture
def ram_fd() -> Iterator[int]:
    """A memfd of GUEST_RAM_BYTES, as QEMU's memory-backend-memfd,share=on hands out."""
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, GUEST_RAM_BYTES)
    yield fd
    os.close(fd)


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Until ``condition()`` is true, looked at every millisecond, at most ``timeout`` s
    (then trio.TooSlowError): for what another thread (a serving thread, an event-loop
    task) publishes a moment after the event the test saw."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.001)


def attached_session(context: VfuContext, serve: Callable[[], object] | None = None,
                     ) -> tuple[Client, threading.Thread, list[object]]:
    """A client whose VERSION handshake ``context`` took, served by a thread running
    ``serve`` (default ``context.serve_client``; its result lands in the list): the
    server's own serving loop, without the event loop around it."""
    client = Client(context.socket_path, negotiate=False)
    caps = {"max_msg_fds": 16, "max_data_xfer_size": vu.MAX_DATA_XFER_SIZE}
    version = client.send(vu.Command.VERSION, vu.build_version(0, 0, caps))
    context.attach()
    client.receive(version, vu.Command.VERSION)
    results: list[object] = []
    body = serve if serve is not None else context.serve_client
    thread = threading.Thread(target=lambda: results.append(body()))
    thread.start()
    return client, thread, results


@pytest.fixture
def fuse_ram(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file on a real FUSE mount (tests/server/fuse_ram.py), whose reads past the
    first 64 KiB never return: guest RAM whose page faults wait for another process."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: the kernel has no FUSE (modprobe fuse)")
    if os.geteuid() != 0:
        pytest.skip("mounting the test's FUSE file system and turning off its readahead "
                    "(/sys/class/bdi) need root")
    mountpoint = tmp_path / "fuse"
    mountpoint.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tests.server.fuse_ram", str(mountpoint), str(1 << 20),
         "--stall-from", str(0x10000)],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == "mounted\n"
        yield mountpoint / "ram"
    finally:
        daemon.terminate()
        daemon.wait(10)
        if os.path.ismount(mountpoint):  # the daemon died without unmounting
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        if daemon.stdout is not None:
            daemon.stdout.close()
