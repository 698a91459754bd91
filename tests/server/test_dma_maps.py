"""DMA maps through a real libvfio-user: what the device knows, and what it logs about them.

QEMU maps guest RAM with an fd (memory-backend-memfd,share=on) and firmware ROM read-only
without one; at a disconnect or when the server stops, libvfio-user unregisters every map.
None of that is worth a warning; an unmap of a map the device never knew is.
"""

from __future__ import annotations

import functools
import itertools
import logging
import mmap
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.devices.driver import (
    Buf,
    DriverQueue,
    GuestRam,
    driver_ok,
    negotiate_modern,
)
from tests.server.conftest import ScratchFunction
from tests.server.served_net import (
    MAC,
    MIB,
    connected,
    detached,
    errors_in,
    kick_transmit,
    memfd,
    needs_reset,
    transmit_queue,
)
from vfuserver.client import Client, VfioUserError
from vfuserver.context import VfuContext
from vfuserver.devices.pci import ResetKind
from vfuserver.devices.virtio_net import RX_QUEUE, TX_QUEUE
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol import virtio_ring as ring
from vfuserver.server import serve_device

RAM_IOVA, RAM_SIZE = 0x100000, 0x10000
ROM_IOVA, ROM_SIZE = 0xF0000, 0x10000


def map_ram_and_rom(client: Client, ram_fd: int) -> None:
    client.dma_map(RAM_IOVA, RAM_SIZE, ram_fd)  # guest RAM: shared, writable
    client.dma_map(ROM_IOVA, ROM_SIZE, None, writable=False)  # firmware: no fd, read-only


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def wait_detached(context: VfuContext, function: ScratchFunction) -> None:
    with trio.fail_after(5):
        while ResetKind.LOST_CONNECTION not in function.resets or context.client_attached:
            await trio.sleep(0.01)


async def test_maps_are_known_and_a_disconnect_forgets_them_quietly(
        serve: Any, caplog: pytest.LogCaptureFixture, ram_fd: int) -> None:
    caplog.set_level(logging.DEBUG)
    function = ScratchFunction()
    context = await serve(function)
    seen: list[int] = []

    def session() -> None:
        with Client(context.socket_path) as client:
            map_ram_and_rom(client, ram_fd)
            seen.append(len(context.memory))

    await trio.to_thread.run_sync(session)
    await wait_detached(context, function)
    assert seen == [1]  # the RAM map is guest memory; the fd-less ROM is not
    assert len(context.memory) == 0
    assert warnings_in(caplog) == []


async def test_stopping_the_server_with_a_client_attached_logs_no_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, ram_fd: int) -> None:
    # what SIGTERM does while a VM still runs: the serving task is cancelled, the
    # context destroyed; libvfio-user then unregisters every map of the session
    function = ScratchFunction()
    client: Client | None = None
    try:
        with VfuContext(str(tmp_path / "dev.sock"), function) as context:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_device, context)
                client = await trio.to_thread.run_sync(Client, context.socket_path)
                await trio.to_thread.run_sync(map_ram_and_rom, client, ram_fd)
                assert len(context.memory) == 1
                nursery.cancel_scope.cancel()
            assert context.client_attached is False and function.resets == []
            # the client is still connected: closing the context ends its session
    finally:
        if client is not None:
            client.close()
    assert len(context.memory) == 0
    assert ResetKind.LOST_CONNECTION in function.resets
    assert warnings_in(caplog) == []


async def test_explicit_unmaps_are_quiet(serve: Any, caplog: pytest.LogCaptureFixture,
                                         ram_fd: int) -> None:
    context = await serve(ScratchFunction())

    def session() -> int:
        with Client(context.socket_path) as client:
            map_ram_and_rom(client, ram_fd)
            client.dma_unmap(ROM_IOVA, ROM_SIZE)
            client.dma_unmap(RAM_IOVA, RAM_SIZE)
            return len(context.memory)

    assert await trio.to_thread.run_sync(session) == 0
    assert warnings_in(caplog) == []


async def test_an_unmap_of_a_map_the_device_lost_is_a_warning(
        serve: Any, caplog: pytest.LogCaptureFixture, ram_fd: int) -> None:
    context = await serve(ScratchFunction())

    def session() -> None:
        with Client(context.socket_path) as client:
            client.dma_map(RAM_IOVA, RAM_SIZE, ram_fd)
            context.memory.remove(RAM_IOVA)  # the device's bookkeeping lost it
            client.dma_unmap(RAM_IOVA, RAM_SIZE)

    await trio.to_thread.run_sync(session)
    assert warnings_in(caplog) == [f"DMA unmap of unknown map at {RAM_IOVA:#x}"]


# -- maps that disagree with their file (issue 12, input 3 and siblings) ---------------------


async def test_a_map_larger_than_its_file_is_clipped_to_the_file(
        serve_net: Any, caplog: pytest.LogCaptureFixture) -> None:
    # issue 12, input 3: 2 MiB at IOVA 0 over a 16 KiB memfd, a transmit buffer at 1 MiB
    served = await serve_net()
    fd = memfd(16 * 1024)
    with mmap.mmap(fd, 16 * 1024) as shared:
        async with connected(served.context) as client:
            await trio.to_thread.run_sync(client.dma_map, 0, 2 * MIB, fd)
            assert [(m.iova, m.size) for m in served.context.memory] == [(0, 16 * 1024)]
            assert any("DMA map [0x0, +0x200000) is larger than what backs it" in e
                       and "only [0x0, +0x4000) is used" in e for e in errors_in(caplog))
            tx = transmit_queue(served.net, shared)
            good = served.net.header_len * b"\0" + MAC + MAC + b"\x08\x00" + b"ok"
            shared[0x3000 : 0x3000 + len(good)] = good
            tx.add_bufs([Buf(0x3000, len(good), False)])
            await kick_transmit(served.context, client)
            assert served.peer.sent == [good[served.net.header_len :]]  # inside the file: sent

            tx.add_bufs([Buf(MIB, 64, False)])
            await kick_transmit(served.context, client)
            assert needs_reset(served.net)
            assert len(served.peer.sent) == 1
            assert served.context.memory.lost.count == 0  # refused, not read: no SIGBUS at all
    os.close(fd)


@pytest.mark.parametrize(("offset", "size", "file_size", "usable", "error"), [
    pytest.param(0x4000, 0x8000, 0x10000, 0x8000, None, id="inside-the-file"),
    pytest.param(0x4000, 0x10000, 0x10000, 0xC000, "larger than what backs it",
                 id="runs-past-the-end"),
    pytest.param(0x800, 0x1000, 0x10000, 0x800, "not page-aligned",  # lib/dma.c maps short
                 id="unaligned-offset"),
    pytest.param(0x20000, 0x1000, 0x10000, 0, "refused: no byte of it is backed",
                 id="offset-past-the-end"),
])
async def test_a_map_at_an_offset_into_its_file(
        serve_net: Any, caplog: pytest.LogCaptureFixture, offset: int, size: int,
        file_size: int, usable: int, error: str | None) -> None:
    served = await serve_net()
    fd = memfd(file_size)
    os.pwrite(fd, bytes(range(256)) * (file_size // 256), 0)
    async with connected(served.context) as client:
        await trio.to_thread.run_sync(functools.partial(client.dma_map, RAM_IOVA, size, fd,
                                                       offset=offset))
        memory = served.context.memory
        assert [(m.iova, m.size) for m in memory] == ([(RAM_IOVA, usable)] if usable else [])
        if usable:
            assert (memory.read(RAM_IOVA + usable - 16, 16)
                    == os.pread(fd, 16, offset + usable - 16))
    errors = errors_in(caplog)
    if error is None:
        assert errors == []
    else:  # each line names the map; one says what is wrong with it
        assert all(e.startswith(f"DMA map [{RAM_IOVA:#x}, +{size:#x})") for e in errors)
        assert any(error in e for e in errors)
    os.close(fd)


async def test_maps_the_library_refuses_leave_the_server_serving(
        serve_net: Any, ram_fd: int) -> None:
    served = await serve_net()
    read_only = os.open(f"/proc/self/fd/{ram_fd}", os.O_RDONLY)
    pipe_read, pipe_write = os.pipe()
    attempts = {  # name: (iova, size, fd)
        "overlap": (RAM_IOVA + 0x1000, RAM_SIZE, ram_fd),
        "zero-length": (0x800000, 0, ram_fd),
        "writable-over-a-read-only-fd": (0x800000, RAM_SIZE, read_only),  # mmap: EACCES
        "a-pipe": (0x800000, RAM_SIZE, pipe_read),  # mmap: ENODEV
    }

    def session() -> list[str]:
        refused = []
        with Client(served.context.socket_path) as client:
            client.dma_map(RAM_IOVA, RAM_SIZE, ram_fd)
            for name, (iova, size, fd) in attempts.items():
                try:
                    client.dma_map(iova, size, fd)
                except VfioUserError:
                    refused.append(name)
            assert client.read(vu.PciRegion.CONFIG, 0, 2) == b"\xf4\x1a"
        return refused

    try:
        assert await trio.to_thread.run_sync(session) == list(attempts)
    finally:
        for fd in (read_only, pipe_read, pipe_write):
            os.close(fd)
    await detached(served.context)
    assert [(m.iova, m.size) for m in served.context.memory] == []


async def test_a_map_past_2_64_is_refused_and_its_unmap_is_quiet(
        serve_net: Any, caplog: pytest.LogCaptureFixture, ram_fd: int) -> None:
    served = await serve_net()
    top = (1 << 64) - 0x1000

    def session() -> None:
        with Client(served.context.socket_path) as client:
            client.dma_map(top, 0x2000, ram_fd)
            assert len(served.context.memory) == 0
            client.dma_unmap(top, 0x2000)

    await trio.to_thread.run_sync(session)
    assert [m for m in warnings_in(caplog) if "wraps around 2**64" not in m] == []
    assert any("wraps around 2**64" in e for e in errors_in(caplog))


async def test_unmapping_the_rings_under_a_live_queue_needs_reset(serve_net: Any) -> None:
    served = await serve_net()
    fd = memfd(RAM_SIZE)
    with mmap.mmap(fd, RAM_SIZE) as shared:
        async with connected(served.context) as client:
            await trio.to_thread.run_sync(client.dma_map, 0, RAM_SIZE, fd)
            tx = transmit_queue(served.net, shared)
            await trio.to_thread.run_sync(client.dma_unmap, 0, RAM_SIZE)  # rings gone
            tx.add([served.net.header_len * b"\0" + MAC + MAC + b"\x08\x00"])
            await kick_transmit(served.context, client)
            assert needs_reset(served.net)
            assert served.peer.sent == []
    os.close(fd)


# -- the same guest RAM as two adjacent maps (issue 12, input 4) ----------------------------


async def test_buffers_and_rings_across_maps_of_one_memfd(serve_net: Any) -> None:
    # As a vIOMMU presents RAM: one memfd as adjacent maps; the transmit queue's
    # descriptor table crosses the first boundary, the buffers the second.
    served = await serve_net()
    net = served.net
    cuts = [0, MIB, MIB + MIB // 2, 2 * MIB]
    fd = memfd(2 * MIB)
    with mmap.mmap(fd, 2 * MIB) as shared:
        async with connected(served.context) as client:
            for start, end in itertools.pairwise(cuts):
                await trio.to_thread.run_sync(functools.partial(
                    client.dma_map, start, end - start, fd, offset=start))
            assert [m.iova for m in served.context.memory] == cuts[:-1]
            negotiate_modern(net)
            ram = GuestRam(2 * MIB, 0, shared=shared)
            ram.skip_to(MIB - 512)
            tx = DriverQueue(ram, net.queues[TX_QUEUE])
            rx = DriverQueue(ram, net.queues[RX_QUEUE])
            assert tx.desc < MIB < tx.desc + ring.descriptor_table_size(tx.size)
            driver_ok(net)

            data = net.header_len * b"\0" + MAC + MAC + b"\x08\x00" + bytes(range(256)) * 4
            shared[cuts[2] - 100 : cuts[2] - 100 + len(data)] = data
            tx.add_bufs([Buf(cuts[2] - 100, len(data), False)])
            await kick_transmit(served.context, client)
            assert served.peer.sent == [data[net.header_len :]]

            rx.add_bufs([Buf(cuts[2] - 5, 1536, True)])  # the header itself is cut in two
            net.notify(RX_QUEUE)
            frame = MAC + MAC + b"\x08\x00" + bytes(range(255, -1, -1)) * 4
            assert net.receive(frame)
            [used] = rx.get_used()
            assert used.data[net.header_len :] == frame
            assert not needs_reset(net)
    os.close(fd)


async def test_the_same_map_twice_is_one_map_until_its_unmap(
        serve: Any, caplog: pytest.LogCaptureFixture, ram_fd: int) -> None:
    """libvfio-user takes an exact repeat of a map (same range, file, offset, protection) as
    the map it has (dma_controller_add_region returns its index), answers success and
    registers it again; it unregisters it once. Found by the vfio-user fuzz target: the
    repeat was refused as an overlap and remembered as unused, so the one unmap left the
    map in guest memory as a view of memory libvfio-user had unmapped (a fault at the
    next access of the device)."""
    context = await serve(ScratchFunction())

    def session() -> tuple[int, int]:
        with Client(context.socket_path) as client:
            client.dma_map(RAM_IOVA, RAM_SIZE, ram_fd)
            client.dma_map(RAM_IOVA, RAM_SIZE, ram_fd)
            mapped = len(context.memory)
            client.dma_unmap(RAM_IOVA, RAM_SIZE)
            return mapped, len(context.memory)

    assert await trio.to_thread.run_sync(session) == (1, 0)
    assert warnings_in(caplog) == []


@pytest.mark.xfail(strict=True, reason="libvfio-user (QEMU's subproject revision) never "
                   "closes the fd of an exact repeat of a map: handle_dma_map consumes it, "
                   "dma_controller_add_region returns the existing region without it")
async def test_a_repeated_map_leaves_no_fd_open(serve: Any, ram_fd: int) -> None:
    """Found by the vfio-user fuzz target; every repeat costs the server process one fd
    for good, so a client repeating maps can exhaust the fds all devices share."""
    function = ScratchFunction()
    context = await serve(function)
    before = len(os.listdir("/proc/self/fd"))

    def session() -> None:
        with Client(context.socket_path) as client:
            for _ in range(3):
                client.dma_map(RAM_IOVA, RAM_SIZE, ram_fd)

    await trio.to_thread.run_sync(session)
    await wait_detached(context, function)
    assert len(os.listdir("/proc/self/fd")) == before
