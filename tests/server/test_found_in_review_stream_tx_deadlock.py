"""Review finding: QueuedBackend._tx_lock (a plain, non-reentrant threading.Lock) is held
around _flush(); a write that fails calls _write_failed(), and StreamBackend's
_write_failed() calls _drop_tx_queue(), which takes _tx_lock again: the thread deadlocks
on itself. With a client attached that thread is the device's serving thread, and it
holds the device lock meanwhile (the transmit ran under it): the guest's transmit never
completes and every later access that needs the model hangs. Without a client the
flusher task on the event loop deadlocks the same way, and with it the whole server.

Reproduced with real parts: a ``stream,server=on`` backend on a unix socket, whose peer
(this test) shuts its read side down, so the next write of the device fails with EPIPE
while the connection stays up (no EOF for the receive task to see first). The scenario
runs in a child process: a deadlock there is a timeout here, not a hung test run.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.devices.driver import DriverQueue, GuestRam, Used, driver_ok, negotiate_modern
from vfuserver.client import Client
from vfuserver.device import ServedNetDevice, open_device
from vfuserver.devices.virtio_net import TX_QUEUE
from vfuserver.devices.virtio_pci import MODERN_BAR, NOTIFY_OFF_MULTIPLIER, Layout
from vfuserver.netdev.options import parse_netdev
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.virtio_net import HDR_LEN
from vfuserver.spec import DeviceSpec

RAM_BYTES = 4 << 20
FRAME = b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x88\xb5" + bytes(46)


async def scenario(directory: str) -> None:
    """The child: serve a virtio-net on a stream backend, make its write fail, transmit."""
    tmp = Path(directory)
    peer_path = tmp / "peer.sock"
    netdev = parse_netdev(f"stream,server=on,addr.type=unix,addr.path={peer_path}")
    spec = DeviceSpec(name="net0", socket=str(tmp / "n.sock"), netdev=netdev)
    device = await open_device(spec)
    assert isinstance(device, ServedNetDevice)
    ram_fd = os.memfd_create("guest-ram")
    os.ftruncate(ram_fd, RAM_BYTES)
    async with trio.open_nursery() as nursery:
        await nursery.start(device.run)
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(str(peer_path))
        with trio.fail_after(5):
            while not device.backend._connected():
                await trio.sleep(0.005)
        peer.shutdown(socket.SHUT_RD)  # the device's next send() fails with EPIPE
        client = await trio.to_thread.run_sync(Client, spec.socket)
        with mmap.mmap(ram_fd, RAM_BYTES) as shared:
            await trio.to_thread.run_sync(client.dma_map, 0, RAM_BYTES, ram_fd)
            ram = GuestRam(RAM_BYTES, 0, shared=shared)
            with device.lock:
                negotiate_modern(device.net)
                tx = DriverQueue(ram, device.net.queues[TX_QUEUE], size=64)
                driver_ok(device.net)
            tx.add([bytes(HDR_LEN) + FRAME])
            await trio.to_thread.run_sync(
                client.write, vu.PciRegion.BAR0 + MODERN_BAR,
                Layout.NOTIFY + NOTIFY_OFF_MULTIPLIER * TX_QUEUE,
                TX_QUEUE.to_bytes(2, "little"))
            used: list[Used] = []
            with trio.move_on_after(5):
                while not used:
                    used = tx.get_used()
                    await trio.sleep(0.005)
            if not used:
                print("STUCK: the transmit never completed; _tx_lock held:",
                      device.backend._tx_lock.locked(), flush=True)
                os._exit(3)
            print("OK", device.stats()["backend"], flush=True)
            client.close()
        nursery.cancel_scope.cancel()


def test_a_failed_stream_write_does_not_deadlock_the_transmitting_thread(
        tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c",
         "import faulthandler, sys, trio; faulthandler.dump_traceback_later(20, exit=True); "
         "from tests.server.test_found_in_review_stream_tx_deadlock "
         "import scenario; trio.run(scenario, sys.argv[1])", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    print(child.stdout, child.stderr[-3000:])
    # a deadlock: faulthandler's dump (both threads in _drop_tx_queue) and exit code 1
    assert child.returncode == 0, child.stderr[-3000:]
    assert "OK" in child.stdout
