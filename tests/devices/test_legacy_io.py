"""The transitional presentation (devices/legacy_io.py): config overlay and its shadow,
legacy BAR0 rules, the admin path, the counters.

A real VirtioNet, the real modern function and AdminOwner, driven through BAR0 and config
space by :class:`tests.devices.legacy_driver.Rig` as QEMU forwards a guest's accesses.
"""

from __future__ import annotations

import errno
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.devices.driver import DriverQueue
from tests.devices.legacy_driver import MAC, Rig
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.errors import GuestError
from vfuserver.devices.legacy_io import LegacyIoShadow
from vfuserver.devices.pci import ResetKind
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import virtio_admin as admin
from vfuserver.protocol.virtio import DeviceStatus, Feature
from vfuserver.protocol.virtio_legacy import BAD_FEATURE, Register
from vfuserver.protocol.virtio_net import NetFeature

BAR0_SIZE = 32
"""Linux virtio-vfio-pci's legacy BAR for a net function: 24 + offsetofend(struct
virtio_net_config, status) = 32."""


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


def test_the_presentation_is_a_device_model_without_trio_or_cffi() -> None:
    """It belongs with the synchronous models: importing it loads nothing of the serving
    layer (STYLE.md layers; the kernel's legacy_io.c is a device driver file too)."""
    probe = ("import sys, vfuserver.devices.legacy_io; print('\\n'.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                            text=True).stdout.split()
    assert "vfuserver.devices.legacy_io" in loaded
    wrong = [name for name in loaded if name.split(".")[0] in ("trio", "cffi", "_cffi_backend")
             or (name.startswith("vfuserver.")
                 and not name.startswith(("vfuserver.devices", "vfuserver.protocol")))]
    assert wrong == []


@pytest.mark.parametrize(("writes", "pci_cmd", "pci_base_addr_0"), [
    pytest.param([(0x04, b"\x07\x01")], 0x0107, 0, id="command"),
    pytest.param([(0x04, b"\x01\x00"), (0x05, b"\x04")], 0x0401, 0, id="command-high-byte"),
    pytest.param([(0x04, b"\x01\x00\xff\xff")], 0x0001, 0, id="command-and-status"),
    pytest.param([(0x03, b"\x00\x05")], 0x0005, 0, id="straddling-into-command"),
    pytest.param([(0x10, b"\x41\xc0\x00\x00")], 0, 0xC041, id="bar0"),
    pytest.param([(0x10, b"\x40\xc0\x00\x00"), (0x11, b"\xd0")], 0, 0xD040,
                 id="bar0-byte-wise"),
    pytest.param([(0x0E, b"\x00\x00\x40\xc0")], 0, 0xC040, id="straddling-into-bar0"),
    pytest.param([(0x13, b"\x12\x34\x56\x78")], 0, 0x1200_0000, id="bar0-top-byte"),
    pytest.param([(0x14, b"\xff\xff\xff\xff"), (0x00, b"\xff\xff")], 0, 0,
                 id="elsewhere"),
])
def test_shadow_takes_the_bytes_a_config_write_overlaps(
        writes: list[tuple[int, bytes]], pci_cmd: int, pci_base_addr_0: int) -> None:
    """virtiovf_pci_write_config: each shadowed field takes the part of a write that
    overlaps it, whatever the write's width and alignment."""
    shadow = LegacyIoShadow(BAR0_SIZE)
    for offset, data in writes:
        shadow.write_config(offset, data)
    assert (shadow.pci_cmd, shadow.pci_base_addr_0) == (pci_cmd, pci_base_addr_0)
    assert shadow.io_enabled == bool(pci_cmd & pcifmt.Command.IO)


def test_config_and_bar0_share_one_shadow(rig: Rig) -> None:
    """IO decode written through config space (a dword write of command and status, as
    setpci COMMAND.l would) switches BAR0 on and off."""
    rig.cfg_write(pcifmt.Offset.COMMAND, pcifmt.Command.IO, 4)
    assert rig.read(Register.STATUS, 1) == 0
    rig.cfg_write(pcifmt.Offset.COMMAND, pcifmt.Command.MASTER, 1)
    with pytest.raises(GuestError) as raised:
        rig.read(Register.STATUS, 1)
    assert raised.value.errno == errno.EIO
    assert rig.cfg_read(pcifmt.Offset.COMMAND, 2) & pcifmt.Command.IO == 0


# -- BAR0 registers ----------------------------------------------------------------------


def test_features_are_the_low_word_without_version_1(rig: Rig) -> None:
    features = rig.legacy_driver_start()
    assert features & (1 << NetFeature.MAC) and features & (1 << NetFeature.MRG_RXBUF)
    assert features & Feature.ANY_LAYOUT.mask  # a transitional device offers ANY_LAYOUT
    assert rig.net.legacy
    features &= ~(1 << BAD_FEATURE)  # Linux's vring_transport_features drops bit 30
    rig.write(Register.GUEST_FEATURES, features, 4)
    assert rig.read(Register.GUEST_FEATURES, 4) == features
    assert rig.net.has_feature(NetFeature.MRG_RXBUF)
    assert not rig.net.has_feature(Feature.VERSION_1)


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("reg", list(Register)[:8], ids=lambda r: r.name)
def test_every_common_register_at_every_width(rig: Rig, reg: Register, width: int) -> None:
    rig.legacy_driver_start()
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
    whole = {Register.HOST_FEATURES: rig.net.get_device_features(0) | 1 << BAD_FEATURE,
             Register.STATUS: DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER,
             Register.QUEUE_NUM: 256}.get(reg, 0)
    assert value == whole & ((1 << (8 * width)) - 1)


@pytest.mark.parametrize(("msix", "config_at"), [(False, 20), (True, 24)])
def test_device_config_follows_msix(rig: Rig, msix: bool, config_at: int) -> None:
    rig.set_msix(msix)
    rig.legacy_driver_start()
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
    rig.legacy_driver_start()
    for offset, size in [(16, 1), (16, 4)]:
        with pytest.raises(GuestError) as raised:
            rig.write(offset, 0, size)
        assert raised.value.errno == errno.EINVAL
    with pytest.raises(GuestError):
        rig.read(2, 4)  # straddles HOST_FEATURES and GUEST_FEATURES
    assert rig.read(20, 4) == int.from_bytes(MAC[:4], "little")  # device config at 20 ...
    with pytest.raises(GuestError) as raised:
        rig.read(30, 4)  # ... has 12 bytes: 10 + 4 is beyond it
    assert raised.value.errno == errno.EINVAL
    statuses = rig.owner.stats.statuses
    assert statuses[(admin.Opcode.LEGACY_COMMON_CFG_READ, admin.Status.EINVAL)] == 1
    assert statuses[(admin.Opcode.LEGACY_DEV_CFG_READ, admin.Status.EINVAL)] == 1


def test_status_zero_resets_and_isr_reads_clear(rig: Rig) -> None:
    rig.legacy_driver_start()
    rig.modern.transport.isr = 3
    assert rig.read(Register.ISR, 1) == 3
    assert rig.read(Register.ISR, 1) == 0
    rig.write(Register.QUEUE_SEL, 0, 2)
    rig.write(Register.QUEUE_PFN, (rig.ram.base >> 12) + 1, 4)
    assert rig.net.queues[0].enabled
    rig.write(Register.STATUS, 0, 1)
    assert rig.read(Register.STATUS, 1) == 0 and not rig.net.queues[0].enabled


def test_each_access_is_one_admin_command_and_notify_is_not(rig: Rig) -> None:
    rig.legacy_driver_start()
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
    features = rig.legacy_driver_start()
    rig.write(Register.GUEST_FEATURES, features & ~(1 << NetFeature.MRG_RXBUF), 4)
    rig.write(Register.QUEUE_SEL, 1, 2)
    assert rig.read(Register.QUEUE_NUM, 2) == 256
    txq = DriverQueue(rig.ram, rig.net.queues[1], contiguous=True)
    rig.write(Register.QUEUE_PFN, txq.desc >> 12, 4)
    assert rig.read(Register.QUEUE_PFN, 4) == txq.desc >> 12
    rig.write(Register.STATUS, 0x7, 1)  # ACK | DRIVER | DRIVER_OK
    frame = b"\xff" * 6 + MAC + b"\x08\x06" + bytes(46)
    txq.add([bytes(10) + frame], [])
    rig.write(Register.QUEUE_NOTIFY, 1, 2)
    assert rig.peer.sent == [frame]
    assert [u.head for u in txq.get_used()] == [0]


def test_an_offset_beyond_the_bar_still_gets_the_owners_answer(rig: Rig) -> None:
    """libvfio-user keeps accesses inside the region; were one to come, the device
    config offset it names is refused by the owner (EINVAL), not by an IndexError."""
    rig.legacy_driver_start()
    with pytest.raises(GuestError) as raised:
        rig.read(BAR0_SIZE + 4, 1)
    assert raised.value.errno == errno.EINVAL
    assert rig.fn.stats.accesses["read:device-config"] == 1


def test_counters_name_opcodes_and_statuses_as_the_spec_does(rig: Rig) -> None:
    """What the server logs when a device stops and query-stats returns."""
    rig.legacy_driver_start()
    with pytest.raises(GuestError):
        rig.read(2, 4)  # straddles two registers: the owner answers EINVAL
    counters = rig.fn.counters()
    assert counters["legacy"]["access:read:HOST_FEATURES"] == 1
    assert counters["legacy"]["access:read:common"] == 1  # offset 2 starts no register
    assert counters["legacy"]["access:write:STATUS"] == 3
    adm = counters["admin"]
    assert adm["opcode:LIST_QUERY"] == adm["status:LIST_QUERY:OK"] == 1  # the set-up
    assert adm["opcode:LEGACY_NOTIFY_INFO"] == adm["status:LEGACY_NOTIFY_INFO:OK"] == 1
    assert adm["opcode:LEGACY_COMMON_CFG_WRITE"] == adm[
        "status:LEGACY_COMMON_CFG_WRITE:OK"] == 3
    assert adm["opcode:LEGACY_COMMON_CFG_READ"] == 2
    assert adm["status:LEGACY_COMMON_CFG_READ:OK"] == 1
    assert adm["status:LEGACY_COMMON_CFG_READ:EINVAL"] == 1
    assert not [key for key in adm if any(part.isdigit() for part in key.split(":"))]


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
