"""Our device talking to a VM that uses QEMU's own virtio-net, over QEMU's socket netdevs.

vfuserver's ``stream`` and ``dgram`` backends speak QEMU's ``-netdev stream`` (4-byte
big-endian length prefix) and ``-netdev dgram`` framing, so the two VMs below exchange
frames with no host network involved at all.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

from .rig import GuestRun, Guests, Servers

pytestmark = pytest.mark.e2e

OURS, THEIRS = "10.0.2.15", "10.0.2.16"


def plan(me: str, peer: str) -> str:
    return ",".join([
        "wait-if:eth0",
        f"ip:{me}/24",
        f"wait-ping:{peer}:timeout=60",  # until the other VM is up
        f"ping:{peer}:count=200:flood",
        "sleep:3",  # keep answering the other VM's pings
    ])


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_vfuserver_vm_and_qemu_virtio_net_vm(servers: Servers, guests: Guests,
                                              kind: str) -> None:
    with tempfile.TemporaryDirectory(prefix="vfu-peer-") as tmp:
        ours, theirs = Path(tmp) / "ours.sock", Path(tmp) / "theirs.sock"
        if kind == "stream":
            netdev = f"stream,server=on,addr.type=unix,addr.path={ours}"
            qemu_netdev = f"stream,id=peer,server=off,addr.type=unix,addr.path={ours}"
        else:
            netdev = (f"dgram,local.type=unix,local.path={ours},"
                      f"remote.type=unix,remote.path={theirs}")
            qemu_netdev = (f"dgram,id=peer,local.type=unix,local.path={theirs},"
                           f"remote.type=unix,remote.path={ours}")
        server = servers.start("--netdev", netdev)
        runs: dict[str, GuestRun] = {}

        def boot_theirs() -> None:
            runs["theirs"] = guests.boot(
                plan(THEIRS, OURS), timeout=120,
                qemu_args=["-netdev", qemu_netdev,
                           "-device", "virtio-net-pci,netdev=peer,mac=52:54:00:00:00:16"])

        other = threading.Thread(target=boot_theirs)
        other.start()
        try:
            runs["ours"] = guests.boot(plan(OURS, THEIRS), sockets=[server.socket_path],
                                       timeout=120)
        finally:
            other.join()

    for name in ("ours", "theirs"):
        report = runs[name].check_passed()
        flood = report.step("ping")
        assert (flood.int_field("transmitted"), flood.int_field("received")) == (200, 200), name
