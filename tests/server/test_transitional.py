"""The transitional presentation: config overlay, legacy BAR0 rules, the admin path.

Real objects joined by fake links: a real VirtioNet with guest RAM in a bytearray, the real
modern function, the real AdminOwner and the presentation; the test plays the guest driver
through BAR0 and config space exactly as QEMU forwards its accesses.
"""

from __future__ import annotations

import errno
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.devices.driver import DriverQueue, GuestRam, RecordingPeer
from vfuserver.client import Client, VfioUserError
from vfuserver.context import VfuContext
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.errors import GuestError
from vfuserver.devices.pci import ResetKind
from vfuserver.devices.virtio_net import VirtioNet
from vfuserver.devices.virtio_pci import MSIX_CONTROL_ENABLE, VirtioPciFunction
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol import virtio_admin as admin
from vfuserver.protocol.pci import ClassCode
from vfuserver.protocol.virtio import DeviceStatus, Feature
from vfuserver.protocol.virtio_legacy import Register
from vfuserver.protocol.virtio_net import NetFeature
from vfuserver.server import serve_device
from vfuserver.transitional import BAR0_SIZE, TransitionalFunction

MAC = bytes.fromhex("525400abcdef")


class Rig:
    def __init__(self, owner: AdminOwner | None = None) -> None:
        self.ram = GuestRam()
        self.peer = RecordingPeer()
        self.net = VirtioNet(self.ram.memory, None, self.peer, mac=MAC)  # type: ignore[arg-type]
        self.modern = VirtioPciFunction(self.net, name="t", class_code=ClassCode.NETWORK_ETHERNET)
        self.owner = owner or AdminOwner()
        self.fn = TransitionalFunction(self.modern, self.owner)
        self.config = self.fn.config_region()
        self.bar0 = self.fn.bar0

    def cfg_write(self, offset: int, value: int, size: int) -> None:
        self.config.write(offset, value.to_bytes(size, "little"))

    def cfg_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config.read(offset, size), "little")

    def enable_io(self) -> None:
        self.cfg_write(pcifmt.Offset.COMMAND, pcifmt.Command.IO | pcifmt.Command.MASTER, 2)

    def set_msix(self, enabled: bool) -> None:
        control = self.modern.msix_cap + 2
        value = self.cfg_read(control, 2)
        value = value | MSIX_CONTROL_ENABLE if enabled else value & ~MSIX_CONTROL_ENABLE
        self.cfg_write(control, value, 2)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.bar0.read(offset, size), "little")

    def write(self, offset: int, value: int, size: int) -> None:
        self.bar0.write(offset, value.to_bytes(size, "little"))


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- config space ------------------------------------------------------------------------


def test_identity_is_rewritten(rig: Rig) -> None:
    header = pcifmt.Type0Header.parse(rig.config.read(0, 64))
    assert (header.vendor_id, header.device_id, header.revision_id) == (0x1AF4, 0x1000, 0)
    assert (header.subsystem_vendor_id, header.subsystem_id) == (0x1AF4, 1)
    assert (header.base_class, header.subclass) == (2, 0)
    assert header.bars[0] == pcifmt.BAR_SPACE_IO
    assert header.bars[4] & 0xF == 0xC  # the modern BAR is untouched


@pytest.mark.parametrize(("offset", "size", "expected"), [
    pytest.param(2, 1, 0x00, id="setpci-2.b"),
    pytest.param(3, 1, 0x10, id="setpci-3.b"),
    pytest.param(2, 2, 0x1000, id="2.w"),
    pytest.param(0, 4, 0x10001AF4, id="0.l"),
    pytest.param(1, 2, 0x001A, id="unaligned-1.w"),
    pytest.param(8, 1, 0x00, id="revision"),
    pytest.param(8, 4, 0x02000000, id="revision-and-class"),
    pytest.param(0x2D, 2, 0x01_1A, id="subsystem-straddle"),
    pytest.param(0x2E, 1, 0x01, id="subsystem-id-low"),
    pytest.param(0x2F, 1, 0x00, id="subsystem-id-high"),
    pytest.param(0x11, 1, 0x00, id="bar0-byte1"),
])
def test_partial_and_unaligned_reads_see_the_overlay(rig: Rig, offset: int, size: int,
                                                     expected: int) -> None:
    assert rig.cfg_read(offset, size) == expected


def test_bar0_sizing_and_address(rig: Rig) -> None:
    bar0 = pcifmt.Offset.BASE_ADDRESS_0
    rig.cfg_write(bar0, 0xFFFFFFFF, 4)
    assert rig.cfg_read(bar0, 4) == (0xFFFFFFFF & ~(BAR0_SIZE - 1)) | 1 == 0xFFFFFFE1
    rig.cfg_write(bar0, 0xC05F, 4)
    assert rig.cfg_read(bar0, 4) == 0xC041
    rig.cfg_write(bar0 + 1, 0xD0, 1)  # byte-wise write of the BAR
    assert rig.cfg_read(bar0, 4) == 0xD041


def test_io_decode_is_shadowed_and_cleared_on_reset(rig: Rig) -> None:
    assert rig.cfg_read(pcifmt.Offset.COMMAND, 2) & pcifmt.Command.IO == 0
    rig.enable_io()
    assert rig.cfg_read(pcifmt.Offset.COMMAND, 2) & pcifmt.Command.IO
    assert rig.read(Register.STATUS, 1) == 0
    rig.fn.reset(ResetKind.FLR)
    assert rig.cfg_read(pcifmt.Offset.COMMAND, 2) & pcifmt.Command.IO == 0
    with pytest.raises(GuestError) as raised:
        rig.read(Register.STATUS, 1)
    assert raised.value.errno == errno.EIO


def test_io_decode_off_is_eio_for_every_access(rig: Rig) -> None:
    for offset, size in [(0, 4), (16, 2), (18, 1), (24, 1)]:
        with pytest.raises(GuestError) as raised:
            rig.read(offset, size)
        assert raised.value.errno == errno.EIO
        with pytest.raises(GuestError) as raised:
            rig.write(offset, 0, size)
        assert raised.value.errno == errno.EIO
    assert rig.fn.stats.refused["io-decode-off"] == 8
    assert rig.owner.stats.commands[admin.Opcode.LEGACY_COMMON_CFG_READ] == 0


# -- BAR0 registers ----------------------------------------------------------------------


def legacy_driver_start(rig: Rig) -> int:
    """What Linux's legacy virtio_pci probe does up to the features."""
    rig.enable_io()
    rig.write(Register.STATUS, 0, 1)
    rig.write(Register.STATUS, DeviceStatus.ACKNOWLEDGE, 1)
    rig.write(Register.STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER, 1)
    return rig.read(Register.HOST_FEATURES, 4)


def test_features_are_the_low_word_without_version_1(rig: Rig) -> None:
    features = legacy_driver_start(rig)
    assert features & (1 << NetFeature.MAC) and features & (1 << NetFeature.MRG_RXBUF)
    assert features & Feature.ANY_LAYOUT.mask  # a transitional device offers ANY_LAYOUT
    assert rig.net.legacy
    rig.write(Register.GUEST_FEATURES, features, 4)
    assert rig.read(Register.GUEST_FEATURES, 4) == features
    assert rig.net.has_feature(NetFeature.MRG_RXBUF)
    assert not rig.net.has_feature(Feature.VERSION_1)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("reg", list(Register)[:8], ids=lambda r: r.name)
def test_every_common_register_at_every_width(rig: Rig, reg: Register, width: int) -> None:
    legacy_driver_start(rig)
    if reg == Register.QUEUE_NOTIFY:
        if width != 2:
            with pytest.raises(GuestError):
                rig.read(reg, width)
        else:
            assert rig.read(reg, 2) == 0
        return
    if width > reg.width:
        # wider than the register: it straddles into the next; the owner refuses it
        with pytest.raises(GuestError) as raised:
            rig.read(reg, width)
        assert raised.value.errno == errno.EINVAL
        return
    value = rig.read(reg, width)
    whole = {Register.HOST_FEATURES: rig.net.get_device_features(0),
             Register.STATUS: DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER,
             Register.QUEUE_NUM: 256}.get(reg, 0)
    assert value == whole & ((1 << (8 * width)) - 1)


@pytest.mark.parametrize(("msix", "config_at"), [(False, 20), (True, 24)])
def test_device_config_follows_msix(rig: Rig, msix: bool, config_at: int) -> None:
    rig.set_msix(msix)
    legacy_driver_start(rig)
    assert bytes(rig.bar0.read(config_at, 4)) + bytes(rig.bar0.read(config_at + 4, 2)) == MAC
    assert rig.read(config_at + 6, 2) == 1  # status: LINK_UP
    for offset in range(6):  # byte-wise
        assert rig.read(config_at + offset, 1) == MAC[offset]
    if msix:
        rig.write(Register.MSI_CONFIG_VECTOR, 1, 2)
        assert rig.read(Register.MSI_CONFIG_VECTOR, 2) == 1
        rig.write(Register.MSI_CONFIG_VECTOR, 0x7FFF, 2)  # no such vector: refused
        assert rig.read(Register.MSI_CONFIG_VECTOR, 2) == 0xFFFF
        rig.write(Register.QUEUE_SEL, 1, 2)
        rig.write(Register.MSI_QUEUE_VECTOR, 2, 2)
        assert rig.net.queues[1].msix_vector == 2
    else:
        # offsets 20..23 are device config: the MAC, writable by a legacy driver
        rig.write(20, 0x02, 1)
        assert rig.net.mac[0] == 0x02


def test_bad_widths_and_offsets(rig: Rig) -> None:
    legacy_driver_start(rig)
    for offset, size in [(16, 1), (16, 4)]:
        with pytest.raises(GuestError) as raised:
            rig.write(offset, 0, size)
        assert raised.value.errno == errno.EINVAL
    with pytest.raises(GuestError):
        rig.write(Register.HOST_FEATURES, 0, 4)  # read-only
    with pytest.raises(GuestError):
        rig.read(2, 4)  # straddles HOST_FEATURES and GUEST_FEATURES
    with pytest.raises(GuestError):
        rig.read(20, 4)  # device config has 12 bytes at 20: 20+4 ok ...
        rig.read(30, 4)  # ... 10+4 beyond it
    refused = rig.owner.stats.statuses[(admin.Opcode.LEGACY_COMMON_CFG_READ, admin.Status.EINVAL)]
    assert refused >= 1


def test_status_zero_resets_and_isr_reads_clear(rig: Rig) -> None:
    legacy_driver_start(rig)
    rig.modern.transport.isr = 3
    assert rig.read(Register.ISR, 1) == 3
    assert rig.read(Register.ISR, 1) == 0
    rig.write(Register.QUEUE_SEL, 0, 2)
    rig.write(Register.QUEUE_PFN, (rig.ram.base >> 12) + 1, 4)
    assert rig.net.queues[0].enabled
    rig.write(Register.STATUS, 0, 1)
    assert rig.read(Register.STATUS, 1) == 0 and not rig.net.queues[0].enabled


def test_each_access_is_one_admin_command_and_notify_is_not(rig: Rig) -> None:
    legacy_driver_start(rig)
    before = dict(rig.owner.stats.commands)
    rig.read(Register.STATUS, 1)
    rig.write(Register.QUEUE_SEL, 1, 2)
    rig.write(Register.QUEUE_NOTIFY, 1, 2)
    after = rig.owner.stats.commands
    assert after[admin.Opcode.LEGACY_COMMON_CFG_READ] - before.get(
        admin.Opcode.LEGACY_COMMON_CFG_READ, 0) == 1
    assert after[admin.Opcode.LEGACY_COMMON_CFG_WRITE] - before.get(
        admin.Opcode.LEGACY_COMMON_CFG_WRITE, 0) == 1
    assert rig.fn.stats.fast_notifies == 1


def test_legacy_driver_transmits_through_pfn_rings(rig: Rig) -> None:
    """A legacy driver end to end: PFN rings, 10-byte header, kick through the fast path."""
    features = legacy_driver_start(rig)
    rig.write(Register.GUEST_FEATURES, features & ~(1 << NetFeature.MRG_RXBUF), 4)
    rig.write(Register.QUEUE_SEL, 1, 2)
    assert rig.read(Register.QUEUE_NUM, 2) == 256
    txq = DriverQueue(rig.ram, rig.net.queues[1], contiguous=True)
    rig.write(Register.QUEUE_PFN, 0, 4)  # PFN 0 deactivates ...
    assert not rig.net.queues[1].enabled
    rig.write(Register.QUEUE_PFN, txq.desc >> 12, 4)  # ... and the PFN places the ring again
    assert rig.read(Register.QUEUE_PFN, 4) == txq.desc >> 12
    rig.write(Register.STATUS, 0x7, 1)  # ACK | DRIVER | DRIVER_OK
    frame = b"\xff" * 6 + MAC + b"\x08\x06" + bytes(46)
    txq.add([bytes(10) + frame], [])
    rig.write(Register.QUEUE_NOTIFY, 1, 2)
    assert rig.peer.sent == [frame]
    assert [u.head for u in txq.get_used()] == [0]


def test_two_members_of_one_owner() -> None:
    owner = AdminOwner()
    first, second = Rig(owner), Rig(owner)
    assert (first.fn.member_id, second.fn.member_id) == (1, 2)
    first.enable_io()
    second.enable_io()
    first.write(Register.QUEUE_SEL, 2, 2)
    assert (first.read(Register.QUEUE_SEL, 2), second.read(Register.QUEUE_SEL, 2)) == (2, 0)
    first.fn.close()
    assert list(owner.members) == [2]


# -- through the real libvfio-user ---------------------------------------------------------


async def test_over_vfio_user(tmp_path: Path) -> None:
    rig = Rig()
    context = VfuContext(str(tmp_path / "t.sock"), rig.fn)

    def session() -> tuple[Any, bytes, int]:
        with Client(context.socket_path) as client:
            info = client.region_info(vu.PciRegion.BAR0)
            with pytest.raises(VfioUserError) as raised:
                client.read(vu.PciRegion.BAR0, Register.STATUS, 1)
            assert raised.value.errno == errno.EIO
            client.write(vu.PciRegion.CONFIG, pcifmt.Offset.COMMAND, b"\x01\x00")
            client.write(vu.PciRegion.BAR0, Register.STATUS, b"\x01")
            with pytest.raises(VfioUserError) as raised:
                client.read(vu.PciRegion.BAR0, 30, 4)  # beyond the 32-byte BAR
            assert raised.value.errno == errno.EINVAL
            return info, client.read(vu.PciRegion.BAR0, 20, 6), client.read(
                vu.PciRegion.CONFIG, 2, 1)[0]

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_device, context)
            info, mac, device_id_low = await trio.to_thread.run_sync(session)
            nursery.cancel_scope.cancel()
    finally:
        context.close()
    assert info.size == BAR0_SIZE == 32
    assert info.flags == vu.RegionFlags.READ | vu.RegionFlags.WRITE  # IO region: no MMAP
    assert mac == MAC and device_id_low == 0x00


@pytest.mark.skipif(shutil.which("lspci") is None, reason="lspci (pciutils) is not installed")
def test_lspci_decodes_the_transitional_config_space(rig: Rig, tmp_path: Path) -> None:
    """An external oracle: pciutils reads our config space dump as a legacy virtio NIC."""
    rig.cfg_write(pcifmt.Offset.BASE_ADDRESS_0, 0xC040, 4)
    rig.enable_io()
    dump = rig.config.read(0, 256)
    lines = ["00:04.0 Ethernet controller: dump"] + [
        f"{row:02x}: " + " ".join(f"{b:02x}" for b in dump[row : row + 16])
        for row in range(0, 256, 16)]
    path = tmp_path / "config.txt"
    path.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["lspci", "-F", str(path), "-vv", "-nn"], check=True,
                         capture_output=True, text=True).stdout
    assert "[1af4:1000]" in out and "(rev" not in out.split("\n")[0].replace("(rev 00)", "")
    assert "Subsystem: Red Hat, Inc." in out and "[1af4:0001]" in out
    assert "Region 0: I/O ports at c040" in out  # (sizes are not in a dump)
    assert "Control: I/O+" in out
    assert "MSI-X: Enable- Count=4" in out
    assert "Vendor Specific Information: VirtIO: CommonCfg" in out
    assert struct.unpack_from("<H", dump, 2)[0] == 0x1000
