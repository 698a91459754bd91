"""Review finding: a tap deleted under an attached client (EBADFD from every read,
tun_chr_read_iter) is reported by the serving thread's data path with one ERROR line per
run of the data path, that is per transmit kick of the guest, for as long as the client
stays attached: a guest that keeps transmitting floods the log at its packet rate. (Before
the data path moved to the serving thread, the receive task raised NetdevHostError once
and the device stopped, "device net0 failed: tap ... failed".)

Real parts: a tap in a network namespace of this test (as tests/server/test_netdev.py's
tap tests), the real ServedNetDevice with a real client; the scenario runs as a child
inside the namespace, as netdev_tap_probe.py does, and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from tests.server.attached_net import attached_net, frame
from tests.server.test_netdev import needs_tap, netns  # noqa: F401 (the fixture)
from vfuserver.devices.virtio_net import TX_QUEUE
from vfuserver.netdev.options import parse_netdev
from vfuserver.protocol.virtio_net import HDR_LEN
from vfuserver.spec import DeviceSpec

RAM_BYTES = 4 << 20
TRANSMITS = 20
IFNAME = "vfurevtap0"


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def scenario() -> None:
    """The child, inside the namespace: a device on a tap, a client, the tap deleted,
    then TRANSMITS frames, one kick each."""
    subprocess.run(["ip", "tuntap", "add", "dev", IFNAME, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", IFNAME, "up"], check=True)
    errors = _Count()
    logging.getLogger("vfuserver").addHandler(errors)
    tmp = Path(tempfile.mkdtemp())
    spec = DeviceSpec(name="net0", socket=str(tmp / "n.sock"),
                      netdev=parse_netdev(f"tap,ifname={IFNAME}"))
    ram_fd = os.memfd_create("guest-ram")
    os.ftruncate(ram_fd, RAM_BYTES)
    async with trio.open_nursery() as nursery:
        async with attached_net(spec, ram_fd, RAM_BYTES, nursery) as net:
            subprocess.run(["ip", "link", "del", IFNAME], check=True)
            await trio.sleep(0.2)
            completed = 0
            for seq in range(TRANSMITS):
                net.tx.add([bytes(HDR_LEN) + frame(seq)])
                await net.kick(TX_QUEUE)
                with trio.move_on_after(5):
                    while not (used := net.tx.get_used()):
                        await trio.sleep(0.002)
                    completed += len(used)
        nursery.cancel_scope.cancel()
    print(json.dumps({"completed": completed, "errors": errors.messages}))


@needs_tap
def test_a_deleted_tap_is_reported_once_not_per_transmit(netns: str) -> None:  # noqa: F811
    child = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import trio; from tests.server.test_found_in_review_tap_deleted import scenario; "
         "trio.run(scenario)"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert child.returncode == 0, child.stderr[-3000:]
    outcome = json.loads(child.stdout.splitlines()[-1])
    assert outcome["completed"] == TRANSMITS
    backend_errors = [m for m in outcome["errors"] if "receiving from the backend" in m]
    print(backend_errors[:3], len(backend_errors))
    assert len(backend_errors) <= 1, f"{len(backend_errors)} ERROR lines for {TRANSMITS} kicks"
