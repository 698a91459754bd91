"""The data path on the serving thread (vfuserver/context.py DataPath): a virtio-net
device served end to end (open_device, ServedNetDevice.run over the real libvfio-user, a
real ``dgram`` backend on AF_UNIX sockets), a client that maps guest RAM and kicks, and the
test's own socket as the host peer. The driver side of the rings is laid out in that RAM
in-process (tests/devices/driver.py); every kick is a real notify write over the socket.

While a client is attached, a kick is run by the serving thread (no eventfd to the event
loop: ``kick_signals`` stays 0), the frame it transmits is written there, and frames from
the backend are read and delivered there too.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.devices.driver import DriverQueue, Used
from tests.server.attached_net import AttachedNet, attached_net, frame
from tests.server.conftest import GUEST_RAM_BYTES, until
from vfuserver.devices.virtio_net import RX_QUEUE, TX_QUEUE
from vfuserver.netdev.options import parse_netdev
from vfuserver.protocol.virtio_net import HDR_LEN
from vfuserver.spec import DeviceSpec

RX_BUFFER = 2048
TIMEOUT = 10.0
TX_TIMER_NS = 1_000_000_000
"""The data path's timer in the lingering test: 1 s instead of 150 µs, as the test takes
longer than 150 µs between its steps."""


@dataclass
class Session(AttachedNet):
    peer: socket.socket
    device_address: str

    async def host_receives(self, count: int) -> list[bytes]:
        got: list[bytes] = []
        with trio.fail_after(TIMEOUT):
            while len(got) < count:
                await trio.lowlevel.wait_readable(self.peer)
                got.append(self.peer.recv(4096))
        return got

    async def used(self, queue: DriverQueue, count: int) -> list[Used]:
        """The used entries of ``queue`` once there are at least ``count``: the serving
        thread publishes them after the frame went out (or in) and before its run ends."""
        got: list[Used] = []
        with trio.fail_after(TIMEOUT):
            while len(got) < count:
                got += queue.get_used()
                await trio.sleep(0.001)
        return got

    async def guest_receives(self, count: int) -> list[bytes]:
        return [used.data[HDR_LEN:] for used in await self.used(self.rx, count)]


@asynccontextmanager
async def session(tmp_path: Path, ram_fd: int, nursery: trio.Nursery
                  ) -> AsyncIterator[Session]:
    """The device on a dgram backend whose peer is this test's socket, attached
    (tests/server/attached_net.py)."""
    device_address, peer_address = str(tmp_path / "dev.dgram"), str(tmp_path / "peer.dgram")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_address)
    netdev = parse_netdev(f"dgram,local.type=unix,local.path={device_address},"
                          f"remote.type=unix,remote.path={peer_address}")
    spec = DeviceSpec(name="net0", socket=str(tmp_path / "n.sock"), netdev=netdev)
    try:
        async with attached_net(spec, ram_fd, GUEST_RAM_BYTES, nursery) as net:
            yield Session(net.device, net.client, net.rx, net.tx, peer, device_address)
    finally:
        peer.close()


async def test_a_kick_is_transmitted_by_the_serving_thread(tmp_path: Path, ram_fd: int,
                                                           nursery: trio.Nursery) -> None:
    async with session(tmp_path, ram_fd, nursery) as s:
        runs = s.counters()["data_path_runs"]
        s.tx.add([bytes(HDR_LEN) + frame(1)])
        await s.kick(TX_QUEUE)
        assert await s.host_receives(1) == [frame(1)]
        assert [used.head for used in await s.used(s.tx, 1)] == [0]
        # the run has ended
        await until(lambda: s.counters()["data_path_runs"] > runs, TIMEOUT)
        counters = s.counters()
        assert counters["kick_signals"] == 0  # the event loop never saw the kick
        assert counters["fast:notify-1"] == 1


async def test_a_burst_longer_than_tx_burst_is_sent_whole_after_one_kick(
        tmp_path: Path, ram_fd: int, nursery: trio.Nursery) -> None:
    async with session(tmp_path, ram_fd, nursery) as s:
        s.device.net.tx_burst = 4  # QEMU's tx_burst, small: the run is cut three times
        for seq in range(14):
            s.tx.add([bytes(HDR_LEN) + frame(seq)])
        await s.kick(TX_QUEUE)
        assert await s.host_receives(14) == [frame(seq) for seq in range(14)]
        assert s.counters()["kick_signals"] == 0


async def test_frames_queued_after_a_transmit_run_go_out_without_a_kick(
        tmp_path: Path, ram_fd: int, nursery: trio.Nursery) -> None:
    """After a run that sent frames, the driver is not asked to kick (QEMU's tx timer):
    the serving thread looks at the ring again DATA_TIMER_NS later by itself."""
    async with session(tmp_path, ram_fd, nursery) as s:
        # a timer of 1 s instead of 150 µs: this test is slower than 150 µs between steps
        s.device.context.native.dev.data_timer_ns = TX_TIMER_NS
        tx = s.device.net.queues[TX_QUEUE]
        # the run DRIVER_OK asked for (it found nothing)
        await until(lambda: s.counters()["data_path_runs"] > 0, TIMEOUT)
        kicks = seq = 0
        for _ in range(5):
            await until(lambda: tx.notification_enabled, TIMEOUT)  # no timer pending
            started = time.monotonic()  # the timer of the run below expires 1 s after this
            seq += 1
            s.tx.add([bytes(HDR_LEN) + frame(seq)])
            old = s.tx.avail_idx
            await s.kick(TX_QUEUE)
            kicks += 1
            assert await s.host_receives(1) == [frame(seq)]
            seq += 1
            s.tx.add([bytes(HDR_LEN) + frame(seq)])
            if not s.tx.kick_needed(old):
                break  # the driver would not kick: the timer sends it
            # kicks are wanted: right only once the timer ran and found nothing, this test
            # having been held up (a loaded machine) for longer than the timer; once more
            assert time.monotonic() - started >= TX_TIMER_NS / 1e9, \
                "a run that sent a frame asked for kicks again at once"
            await s.kick(TX_QUEUE)
            kicks += 1
            assert await s.host_receives(1) == [frame(seq)]
        else:
            pytest.fail("five tries, each held up for longer than the timer")
        assert await s.host_receives(1) == [frame(seq)]
        # a run found nothing: kicks wanted
        await until(lambda: tx.notification_enabled, TIMEOUT)
        assert s.counters()["fast:notify-1"] == kicks


async def test_frames_from_the_backend_wait_for_buffers_and_keep_their_order(
        tmp_path: Path, ram_fd: int, nursery: trio.Nursery) -> None:
    async with session(tmp_path, ram_fd, nursery) as s:
        s.rx.add(in_sizes=[RX_BUFFER])
        await s.kick(RX_QUEUE)
        for seq in range(3):
            s.peer.sendto(frame(seq), s.device_address)
        assert await s.guest_receives(1) == [frame(0)]
        # frame 1 is held for lack of buffers, frame 2 still queued on the socket
        await trio.sleep(0.05)
        assert s.rx.get_used() == []
        for _ in range(2):
            s.rx.add(in_sizes=[RX_BUFFER])
        await s.kick(RX_QUEUE)
        assert await s.guest_receives(2) == [frame(1), frame(2)]
        # counted once the model took the frame (after the guest could see it)
        await until(lambda: s.device.stats()["backend"]["rx_frames"] >= 3, TIMEOUT)
        stats = s.device.stats()
        assert stats["backend"]["rx_frames"] == 3
        assert stats["fast_path"]["kick_signals"] == 0


async def test_the_event_loop_receives_again_once_the_client_left(
        tmp_path: Path, ram_fd: int, nursery: trio.Nursery) -> None:
    async with session(tmp_path, ram_fd, nursery) as s:
        await s.kick(TX_QUEUE)  # a first client, attached and served
    device = s.device
    await until(lambda: not device.client_attached, TIMEOUT)
    # No client: the backend's own task reads again (and the reset model takes the
    # frame without a driver to give it to, as QEMU's purges its queue on reset).
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    (tmp_path / "peer.dgram").unlink()
    peer.bind(str(tmp_path / "peer.dgram"))
    try:
        peer.sendto(frame(7), s.device_address)
        await until(lambda: device.stats()["backend"]["rx_frames"] > 0, TIMEOUT)
        assert not device.client_attached
    finally:
        peer.close()
