"""Our device talking to a VM that uses QEMU's own virtio-net, over QEMU's socket netdevs.

vfuserver's ``stream`` and ``dgram`` backends speak QEMU's ``-netdev stream`` (4-byte
big-endian length prefix) and ``-netdev dgram`` framing, so the two VMs below exchange
frames with no host network involved at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .rig import GuestRun, NetNamespace, Servers, Tools, boot_guest

pytestmark = pytest.mark.e2e

OURS, THEIRS = "10.0.2.15", "10.0.2.16"


PING_DONE = b"name=ping status="
"""What a guest's console shows once its flood ping has ended (the step's report line)."""

BOOT_TIMEOUT = 180
"""Seconds for each VM (the guest's watchdog fires 10 s earlier): both boot at once under
TCG, and the one up first waits up to 60 s for the other, then both ping."""


def plan(me: str, peer: str) -> str:
    return ",".join([
        "wait-if:eth0",
        f"ip:{me}/24",
        f"wait-ping:{peer}:timeout=60",  # until the other VM is up
        f"ping:{peer}:count=200:flood",
        "sleep:150",  # keep answering the other VM's pings; the host stops both VMs
    ])


def ping_reported(console: Path) -> bool:
    """Whether the console holds the ping step's whole report line."""
    text = console.read_bytes() if console.exists() else b""
    at = text.find(PING_DONE)
    return at >= 0 and b"\n" in text[at:]


def wait_until_both_pinged(consoles: list[Path], boots: list[threading.Thread]) -> None:
    """Until every console shows its ping step's result (or a VM has ended early: its
    report says why), at most BOOT_TIMEOUT s."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not all(ping_reported(path) for path in consoles):
        if not all(boot.is_alive() for boot in boots):
            return
        assert time.monotonic() < deadline, "the VMs did not both finish their pings"
        time.sleep(0.2)


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_vfuserver_vm_and_qemu_virtio_net_vm(servers: Servers, e2e_tools: Tools,
                                              netns: NetNamespace, tmp_path: Path,
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
        names = ("ours", "theirs")
        consoles = {name: tmp_path / f"console-{name}.log" for name in names}
        pidfiles = {name: tmp_path / f"qemu-{name}.pid" for name in names}
        runs: dict[str, GuestRun] = {}

        def boot(name: str, me: str, peer: str, sockets: list[Path],
                 qemu_args: list[str]) -> None:
            runs[name] = boot_guest(
                e2e_tools, consoles[name], plan(me, peer), ns=netns, sockets=sockets,
                timeout=BOOT_TIMEOUT, qemu_args=[*qemu_args, "-pidfile", str(pidfiles[name])])

        boots = [
            threading.Thread(target=boot, args=("ours", OURS, THEIRS, [server.socket_path], [])),
            threading.Thread(target=boot, args=(
                "theirs", THEIRS, OURS, [],
                ["-netdev", qemu_netdev,
                 "-device", "virtio-net-pci,netdev=peer,mac=52:54:00:00:00:16"])),
        ]
        for thread in boots:
            thread.start()
        try:
            wait_until_both_pinged(list(consoles.values()), boots)
        finally:
            # both pings have ended (each VM answered the other's meanwhile): stop the VMs
            # rather than wait out their sleep
            for pidfile in pidfiles.values():
                with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)
            for thread in boots:
                thread.join()
            for run in runs.values():
                print(run.describe())

    for name in names:
        report = runs[name].check_clean()  # cut short in its sleep, on purpose
        flood = report.step("ping")
        assert (flood.int_field("transmitted"), flood.int_field("received")) == (200, 200), name
