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

import os
import socket
import subprocess
import sys
from pathlib import Path

import trio

from tests.devices.driver import Used
from tests.server.attached_net import attached_net, frame
from tests.server.conftest import until
from vfuserver.device import ServedNetDevice
from vfuserver.devices.virtio_net import TX_QUEUE
from vfuserver.netdev.options import parse_netdev
from vfuserver.protocol.virtio_net import HDR_LEN
from vfuserver.spec import DeviceSpec

RAM_BYTES = 4 << 20


async def scenario(directory: str) -> None:
    """The child: serve a virtio-net on a stream backend, make its write fail, transmit."""
    tmp = Path(directory)
    peer_path = tmp / "peer.sock"
    netdev = parse_netdev(f"stream,server=on,addr.type=unix,addr.path={peer_path}")
    spec = DeviceSpec(name="net0", socket=str(tmp / "n.sock"), netdev=netdev)
    ram_fd = os.memfd_create("guest-ram")
    os.ftruncate(ram_fd, RAM_BYTES)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        # the peer connects once the backend listens: the device runs from here on
        async with attached_net(spec, ram_fd, RAM_BYTES, nursery) as net:
            device: ServedNetDevice = net.device
            peer.connect(str(peer_path))
            await until(device.backend._connected, 5)
            peer.shutdown(socket.SHUT_RD)  # the device's next send() fails with EPIPE
            net.tx.add([bytes(HDR_LEN) + frame(0)])
            await net.kick(TX_QUEUE)
            used: list[Used] = []
            with trio.move_on_after(5):
                while not used:
                    used = net.tx.get_used()
                    await trio.sleep(0.005)
            if not used:
                print("STUCK: the transmit never completed; _tx_lock held:",
                      device.backend._tx_lock.locked(), flush=True)
                os._exit(3)
            print("OK", device.stats()["backend"], flush=True)
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
