"""virtio-blk under a real QEMU: Linux's virtio_blk through the modern and the legacy driver,
data checked on the host image, durability across a SIGKILL of the server, and SeaBIOS
booting from a disk vfuserver serves."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .rig import (
    LAUNCHER,
    GuestRun,
    Guests,
    NetNamespace,
    RigError,
    Servers,
    Tools,
    VfuServer,
    boot_guest,
)

pytestmark = pytest.mark.e2e

MIB = 1 << 20
VIRTIO_VENDOR = 0x1AF4
VIRTIO_BLK_MODERN = 0x1042
VIRTIO_BLK_TRANSITIONAL = 0x1001
VIRTIO_ID_BLOCK = 2
BOOT_MARKER = b"VFU-MBR-BOOTED"


def image_of(path: Path, size: int) -> Path:
    with open(path, "wb") as image:
        image.truncate(size)  # sparse: reads as zeros
    return path


def disk_server(servers: Servers, image: Path, *args: str, name: str = "disk0") -> VfuServer:
    return servers.start("--device", "virtio-blk", "--image", str(image), *args, name=name)


def host_sha256(image: Path, length: int) -> str:
    with open(image, "rb") as disk:
        return hashlib.sha256(disk.read(length)).hexdigest()


def test_modern_driver_direct_io_lands_in_the_image(servers: Servers, guests: Guests,
                                                    tmp_path: Path) -> None:
    image = image_of(tmp_path / "disk.img", 96 * MIB)
    server = disk_server(servers, image, "--serial", "vfu-e2e")
    run = guests.boot("lspci,virtio,disk-write:mib=64,disk-read:mib=64",
                      sockets=[server.socket_path], timeout=120)
    report = run.check_passed()
    function = report.pci_function(VIRTIO_VENDOR, VIRTIO_BLK_MODERN)
    assert (function.revision, function.class_code) == (1, 0x010000)  # mass storage, SCSI
    [device] = report.virtio_devices()
    assert (device.device_id, device.driver, device.version_1) == (
        VIRTIO_ID_BLOCK, "virtio_blk", True)
    written, read = report.step("disk-write"), report.step("disk-read")
    assert written.int_field("bytes") == read.int_field("bytes") == 64 * MIB
    assert written.fields["sha256"] == read.fields["sha256"] == host_sha256(image, 64 * MIB)


def test_legacy_driver_on_the_transitional_disk(servers: Servers, guests: Guests,
                                                tmp_path: Path) -> None:
    image = image_of(tmp_path / "disk.img", 16 * MIB)
    server = disk_server(servers, image, "--profile", "transitional")
    run = guests.boot("lspci,virtio,disk-write:mib=4,disk-read:mib=4",
                      append="virtio_pci.force_legacy=1",
                      sockets=[server.socket_path])
    report = run.check_passed()
    function = report.pci_function(VIRTIO_VENDOR, VIRTIO_BLK_TRANSITIONAL)
    assert (function.revision, function.subvendor, function.subdevice) == (0, 0x1AF4, 2)
    assert [(bar.name, bar.size) for bar in function.io_bars] == [("bar0", 128)]
    [device] = report.virtio_devices()
    assert (device.driver, device.version_1) == ("virtio_blk", False)
    assert report.step("disk-write").fields["sha256"] == report.step(
        "disk-read").fields["sha256"] == host_sha256(image, 4 * MIB)
    assert server.stop() == 0
    # the legacy registers were reached through the admin path (QUEUE_PFN writes) and the
    # register image (reads once the mode is settled): the final counters
    assert '"access:write:QUEUE_PFN"' in server.log
    assert '"fast:legacy-read:HOST_FEATURES"' in server.log


def test_synced_data_survives_sigkill_and_a_second_boot_reads_it(
        servers: Servers, e2e_tools: Tools, netns: NetNamespace, tmp_path: Path) -> None:
    image = image_of(tmp_path / "disk.img", 16 * MIB)
    first = disk_server(servers, image, name="disk-a")
    console, pidfile = tmp_path / "console-sync.log", tmp_path / "qemu.pid"
    runs: list[GuestRun] = []
    # buffered writes, then sync (FLUSH); the guest then idles while the server is killed
    boot = threading.Thread(target=lambda: runs.append(boot_guest(
        e2e_tools, console, "disk-write:mib=8:buffered,sleep:30", ns=netns,
        sockets=[first.socket_path], timeout=90, qemu_args=["-pidfile", str(pidfile)])))
    boot.start()
    try:
        deadline = time.monotonic() + 80
        while not console.exists() or b"name=disk-write status=" not in console.read_bytes():
            assert time.monotonic() < deadline, "the guest never finished its synced write"
            time.sleep(0.1)
        assert first.process is not None
        first.process.send_signal(signal.SIGKILL)
        assert first.stop() == -signal.SIGKILL
    finally:
        # the guest has nothing left to say: stop QEMU rather than wait for its watchdog
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        boot.join()
    synced = runs[0].report.step("disk-write")
    assert synced.passed, runs[0].describe()
    assert host_sha256(image, 8 * MIB) == synced.fields["sha256"]

    second = disk_server(servers, image, name="disk-b")
    run = boot_guest(e2e_tools, tmp_path / "console-read.log", "disk-read:mib=8", ns=netns,
                     sockets=[second.socket_path])
    assert run.check_passed().step("disk-read").fields["sha256"] == synced.fields["sha256"]


def mbr_stub(path: Path) -> Path:
    """A boot sector that prints BOOT_MARKER on COM1 and halts (hand-assembled 8086):
    cli; xor ax,ax; mov ds,ax; mov si,msg; mov dx,0x3f8;
    l: lodsb; test al,al; jz d; out dx,al; jmp l;  d: hlt; jmp d;  msg: db ..., 0"""
    code = bytes.fromhex("fa31c08ed8be167cbaf803ac84c07403eeebf8f4ebfd")
    sector = (code + BOOT_MARKER + b"\r\n\0").ljust(510, b"\0") + b"\x55\xaa"
    with open(path, "wb") as image:
        image.write(sector)
        image.truncate(MIB)
    return path


@pytest.mark.parametrize("profile", ["modern", "transitional"])
def test_seabios_boots_from_the_served_disk(servers: Servers, e2e_tools: Tools,
                                            tmp_path: Path, profile: str) -> None:
    image = mbr_stub(tmp_path / "boot.img")
    server = disk_server(servers, image, "--readonly", "--profile", profile)
    console = tmp_path / f"bios-{profile}.log"
    # no -kernel: the firmware looks for a boot disk and finds the vfio-user one
    cmd = [sys.executable, str(LAUNCHER), "--qemu", str(e2e_tools.qemu),
           "--socket", str(server.socket_path)]
    with open(console, "wb") as out:
        qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 40
            while BOOT_MARKER not in console.read_bytes():
                if qemu.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            qemu.kill()
            qemu.wait()
    text = console.read_bytes()
    assert b"Booting from Hard Disk" in text and BOOT_MARKER in text, text[-2000:]


def test_qemu_and_vfuserver_refuse_each_others_image(servers: Servers, e2e_tools: Tools,
                                                     tmp_path: Path) -> None:
    # QEMU's image locking (block/file-posix.c): the same bytes, the same rules, so an
    # operator who gives one image to a QEMU and to vfuserver is stopped either way round.
    image = image_of(tmp_path / "disk.img", MIB)
    qemu = [str(e2e_tools.qemu), "-machine", "q35,accel=tcg", "-display", "none", "-S",
            "-nodefaults", "-drive", f"file={image},format=raw,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0"]
    server = disk_server(servers, image, "--readonly")
    refused = subprocess.run(qemu, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and 'Failed to get "write" lock' in refused.stderr
    server.stop()

    pidfile = tmp_path / "qemu.pid"  # -daemonize: its parent exits once the disk is open
    subprocess.run([*qemu, "-daemonize", "-pidfile", str(pidfile)], check=True, timeout=60)
    pid = int(pidfile.read_text())
    try:
        for extra in ((), ("--readonly",)):
            with pytest.raises(RigError, match=r"disk image .* is in use: .* write permission"):
                disk_server(servers, image, *extra, name=f"disk{len(extra)}")
    finally:
        os.kill(pid, signal.SIGKILL)
