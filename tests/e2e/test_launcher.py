"""contrib/qemu/vfuserver-qemu --print: the QEMU command lines it promises (no QEMU run)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from .rig import LAUNCHER

COMMON = ["-accel", "tcg", "-smp", "1", "-m", "512M"]
SHARED_RAM = ["-object", "memory-backend-memfd,id=mem,size=512M,share=on",
              "-machine", "q35,memory-backend=mem"]
HEADLESS = ["-nographic", "-vga", "none", "-nic", "none", "-no-reboot", "-serial", "mon:stdio"]


def printed(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(LAUNCHER), "--print", "--qemu", "/opt/q", *args],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return shlex.split(out)


def test_sockets_become_vfio_user_devices() -> None:
    assert printed("--socket", "/tmp/a.sock", "--socket", "/tmp/b c.sock") == [
        "/opt/q", *COMMON, *SHARED_RAM, *HEADLESS,
        "-device", '{"driver":"vfio-user-pci","socket":{"path":"/tmp/a.sock","type":"unix"}}',
        "-device", '{"driver":"vfio-user-pci","socket":{"path":"/tmp/b c.sock","type":"unix"}}',
    ]


def test_private_ram_kernel_builtin_nets_and_extra_args() -> None:
    assert printed("--no-shared-memory", "--kernel", "k", "--initrd", "i", "--append", "a b",
                   "--builtin-net", "tap0,legacy", "--builtin-net", "tap1", "--mac",
                   "52:54:00:00:00:ff", "--serial", "file:/tmp/s", "--",
                   "-trace", "vfio_user_*", "--socket") == [
        "/opt/q", *COMMON, "-machine", "q35",
        "-nographic", "-vga", "none", "-nic", "none", "-no-reboot", "-serial", "file:/tmp/s",
        "-kernel", "k", "-initrd", "i", "-append", "a b",
        "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:ff,disable-modern=on",
        "-netdev", "tap,id=net1,ifname=tap1,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=net1,mac=52:54:00:00:00:00",
        "-trace", "vfio_user_*", "--socket",
    ]


@pytest.mark.parametrize("args", [
    pytest.param(["--builtin-net", "tap0,fast"], id="unknown-net-mode"),
    pytest.param(["--initrd", "i"], id="initrd-without-kernel"),
])
def test_rejects_bad_arguments(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--print", "--qemu", "/opt/q", *args],
                          capture_output=True, text=True, check=False, timeout=30)
    assert proc.returncode == 2, proc.stderr
