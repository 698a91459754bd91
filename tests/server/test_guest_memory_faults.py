"""A client that shrinks the file behind its DMA map, and the pieces that keep the server
alive: the seal against shrinking (vfuserver/dma_backing.py) and the SIGBUS guard
(vfuserver/csrc/vfuserver.c). Issue 12, input 3's second half.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.devices.driver import Buf
from tests.server.served_net import (
    PAGE,
    connected,
    kick_transmit,
    memfd,
    needs_reset,
    transmit_queue,
)
from vfuserver import dma_backing
from vfuserver.binding import ffi, lib
from vfuserver.client import Client
from vfuserver.protocol import vfio_user as vu

RAM_SIZE = 0x10000


# -- a client that shrinks its file after mapping it -------------------------------------------


async def test_a_sealable_file_is_sealed_against_shrinking(serve_net: Any) -> None:
    served = await serve_net()
    fd = memfd(RAM_SIZE, sealable=True)
    async with connected(served.context) as client:
        await trio.to_thread.run_sync(client.dma_map, 0, RAM_SIZE, fd)
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE)
        os.ftruncate(fd, 2 * RAM_SIZE)  # growing stays the client's business
    os.close(fd)


async def test_a_file_shrunk_under_a_map_stops_that_device_only(
        serve_net: Any, caplog: pytest.LogCaptureFixture) -> None:
    # A memfd without MFD_ALLOW_SEALING cannot be sealed: the SIGBUS guard has to save
    # the process when the device reads a page the client cut off.
    served = await serve_net("victim")
    other = await serve_net("bystander")
    fd = memfd(RAM_SIZE)
    with mmap.mmap(fd, PAGE) as shared:
        async with connected(served.context) as client:
            await trio.to_thread.run_sync(client.dma_map, 0, RAM_SIZE, fd)
            assert [(m.iova, m.size) for m in served.context.memory] == [(0, RAM_SIZE)]
            tx = transmit_queue(served.net, shared)  # rings in the first page, which stays
            os.ftruncate(fd, PAGE)
            lost_page = RAM_SIZE // 2
            tx.add_bufs([Buf(lost_page + 0x10, 64, False)])
            await kick_transmit(served.context, client)

            assert served.context.memory.lost.count == 1
            assert served.context.memory.lost.iova == lost_page + 0x10
            assert needs_reset(served.net)
            assert any(f"guest memory at {lost_page + 0x10:#x} was lost: the client shrank the "
                       "file behind its DMA map" in r.getMessage() for r in caplog.records)
            # the page now reads as zeros, for the device only
            assert served.context.memory.read(lost_page, 16) == bytes(16)

            def bystander() -> bytes:
                with Client(other.context.socket_path) as client:
                    return client.read(vu.PciRegion.CONFIG, 0, 2)

            assert await trio.to_thread.run_sync(bystander) == b"\xf4\x1a"
            assert other.context.memory.lost.count == 0
    os.close(fd)


# -- guest RAM whose page faults wait for another process -------------------------------------


async def test_guest_ram_on_fuse_is_refused_without_touching_it(
        serve_net: Any, fuse_ram: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A client can mount FUSE in a user namespace of its own and map its RAM from there;
    # a page fault on it waits for the client's daemon. The map used to be taken (and the
    # file opened through /proc/self/map_files: a FUSE open, answered by that daemon);
    # the first buffer past the daemon's stall would then have put the serving thread to
    # sleep for good, holding the device's lock, and the event loop with it at its next
    # stats query or disk completion.
    served = await serve_net("victim")
    other = await serve_net("bystander")
    fd = os.open(fuse_ram, os.O_RDWR)
    try:
        async with connected(served.context) as client:
            await trio.to_thread.run_sync(client.dma_map, 0, 1 << 20, fd)
            assert list(served.context.memory) == []
            refusals = [r.getMessage() for r in caplog.records
                        if "DMA map [0x0, +0x100000) refused: its file" in r.getMessage()]
            assert len(refusals) == 1
            assert f"{fuse_ram} is on a file system of type fuse" in refusals[0]
            assert "memory-backend-memfd" in refusals[0]
            assert (await trio.to_thread.run_sync(client.read, vu.PciRegion.CONFIG, 0, 2)
                    == b"\xf4\x1a")

            def bystander() -> bytes:
                with Client(other.context.socket_path) as other_client:
                    return other_client.read(vu.PciRegion.CONFIG, 0, 2)

            assert await trio.to_thread.run_sync(bystander) == b"\xf4\x1a"
    finally:
        os.close(fd)


# -- the pieces on their own -------------------------------------------------------------------


def test_inspect_finds_the_file_offset_and_seals_a_memfd() -> None:
    fd = memfd(4 * PAGE, sealable=True)
    try:
        with mmap.mmap(fd, 2 * PAGE, offset=PAGE) as view:
            address = ctypes.addressof(ctypes.c_char.from_buffer(view)) + 0x10
            backing = dma_backing.inspect(dma_backing.mapping_at(address), address)
            del address
        assert backing.name.startswith("/memfd:guest-ram")
        assert (backing.offset, backing.file_size, backing.sealed) == (PAGE + 0x10, 4 * PAGE,
                                                                        True)
        assert backing.backed(8 * PAGE) == 3 * PAGE - 0x10
    finally:
        os.close(fd)


@pytest.mark.parametrize("source", ["memfd", "/dev/shm", "/dev/zero"])
def test_guest_ram_the_way_qemu_gives_it_has_no_stall_risk(source: str,
                                                           tmp_path: Path) -> None:
    if source == "memfd":  # memory-backend-memfd: the kernel's internal shmem mount
        fd = memfd(2 * PAGE)
    elif source == "/dev/shm":  # memory-backend-file,mem-path=/dev/shm/...: a tmpfs
        fd = os.open(f"/dev/shm/vfuserver-test-{os.getpid()}", os.O_RDWR | os.O_CREAT, 0o600)
        os.unlink(f"/dev/shm/vfuserver-test-{os.getpid()}")
        os.ftruncate(fd, 2 * PAGE)
    else:  # shared anonymous memory, as a client might hand it over
        fd = os.open(source, os.O_RDWR)
    try:
        with mmap.mmap(fd, 2 * PAGE) as view:
            buffer = ctypes.c_char.from_buffer(view)
            mapping = dma_backing.mapping_at(ctypes.addressof(buffer))
            assert dma_backing.stall_risk(mapping) is None
            del buffer
    finally:
        os.close(fd)


def test_inspect_of_anonymous_memory_is_an_oserror() -> None:
    with mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as anonymous:
        buffer = ctypes.c_char.from_buffer(anonymous)
        address = ctypes.addressof(buffer)
        with pytest.raises(OSError):  # a mapping without a file: no /proc/self/map_files
            dma_backing.inspect(dma_backing.mapping_at(address), address)
        del buffer


GUARDED_SIGBUS_ELSEWHERE = """
import mmap, os
from vfuserver.binding import lib
assert lib.vfuserver_guard_install() == 0
fd = os.memfd_create("not-guest-ram")
os.ftruncate(fd, 2 * mmap.PAGESIZE)
m = mmap.mmap(fd, 2 * mmap.PAGESIZE)
os.ftruncate(fd, 0)
m[mmap.PAGESIZE]  # SIGBUS outside every guest map
"""


def test_a_sigbus_outside_guest_maps_still_kills_the_process() -> None:
    # the guard hands it to the previous disposition: the default, death by SIGBUS
    done = subprocess.run([sys.executable, "-c", GUARDED_SIGBUS_ELSEWHERE],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGBUS, done.stderr


def test_guard_slots_run_out_and_come_back() -> None:
    lost = ffi.new("vfuserver_lost_pages_t *")
    slots = []
    try:
        while (slot := lib.vfuserver_guard_add(ffi.cast("void *", 0x10000), PAGE, PAGE, 0,
                                               lost)) >= 0:
            slots.append(slot)
            assert len(slots) <= 1 << 16
        assert ffi.errno == errno.ENOSPC and len(set(slots)) == len(slots) > 0
        lib.vfuserver_guard_remove(slots.pop(3))
        slots.append(lib.vfuserver_guard_add(ffi.cast("void *", 0x10000), PAGE, PAGE, 0, lost))
        assert slots[-1] >= 0
    finally:
        for slot in slots:
            lib.vfuserver_guard_remove(slot)
    assert lib.vfuserver_guard_add(ffi.NULL, PAGE, 3, 0, lost) == -1  # page size not 2**n
    assert ffi.errno == errno.EINVAL
