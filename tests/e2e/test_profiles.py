"""A profile switched through the control plane between two boots of a real guest."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .rig import Guests, Servers

pytestmark = pytest.mark.e2e

VENDOR = 0x1AF4
MODERN_NET = 0x1041  # 0x1040 + virtio device type 1 (virtio 1.2 section 4.1.2.1)
TRANSITIONAL_NET = 0x1000  # virtio 1.2 section 4.1.2.3: transitional network card


def vfuserver_cli(exe: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=30,
                          check=False, stdin=subprocess.DEVNULL)


def set_profile(exe: Path, control: Path, device: str, profile: str) -> None:
    """`vfuserver profile set` right after the last VM exited: the server waits for the
    connection QEMU's exit closed to be detached (ServedDevice.detached)."""
    result = vfuserver_cli(exe, "profile", "set", device, profile, "--control", str(control))
    assert result.returncode == 0, f"profile set failed ({result.returncode}): {result.stderr}"


def test_profile_switch_between_two_boots_is_seen_by_the_guest(
        servers: Servers, guests: Guests, vfuserver_exe: Path, tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    server = servers.start("--control", str(control))
    listed = vfuserver_cli(vfuserver_exe, "profile", "list", "--control", str(control))
    assert listed.stdout == "net0 modern modern,transitional\n", listed.stderr

    first = guests.boot("lspci,virtio", sockets=[server.socket_path]).check_complete()
    modern = first.pci_function(VENDOR, MODERN_NET)
    assert modern.io_bars == []
    assert [f for f in first.pci_functions() if f.ids == (VENDOR, TRANSITIONAL_NET)] == []

    set_profile(vfuserver_exe, control, "net0", "transitional")
    listed = vfuserver_cli(vfuserver_exe, "profile", "list", "net0", "--control", str(control))
    assert listed.stdout == "net0 transitional modern,transitional\n"

    second = guests.boot("lspci,virtio", sockets=[server.socket_path]).check_complete()
    transitional = second.pci_function(VENDOR, TRANSITIONAL_NET)
    assert transitional.revision == 0x00
    assert (transitional.subvendor, transitional.subdevice) == (VENDOR, 0x0001)
    assert len(transitional.io_bars) == 1
    assert [f for f in second.pci_functions() if f.ids == (VENDOR, MODERN_NET)] == []
    device = second.virtio_device_on(transitional.bdf)
    assert (device.device_id, device.driver) == (1, "virtio_net")

    # the same server process served both boots
    assert server.process is not None and server.process.poll() is None
    assert server.stop() == 0
