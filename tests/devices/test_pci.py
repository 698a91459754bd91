"""The emulated PCI config space: write masks, RW1C, BAR sizing, capability chain."""

from __future__ import annotations

import errno
import struct

import pytest

from vfuserver.devices.errors import GuestError
from vfuserver.devices.pci import Bar, BarKind, ConfigSpace, overlay_ranges
from vfuserver.protocol import pci as pcifmt


class Memory:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def make_config() -> ConfigSpace:
    config = ConfigSpace()
    config.set_header(vendor_id=0x1AF4, device_id=0x1041, revision_id=1, base_class=2,
                      subsystem_vendor_id=0x1AF4, subsystem_id=0x1100, interrupt_pin=1)
    config.add_bar(Bar(0, 32, BarKind.IO, Memory()))
    config.add_bar(Bar(1, 0x1000, BarKind.MEM32, Memory()))
    config.add_bar(Bar(4, 0x4000, BarKind.MEM64, Memory(), prefetchable=True))
    return config


def u32(config: ConfigSpace, offset: int) -> int:
    return int(struct.unpack("<I", config.read(offset, 4))[0])


def test_header_parses_back() -> None:
    header = pcifmt.Type0Header.parse(make_config().read(0, 64))
    assert (header.vendor_id, header.device_id, header.revision_id) == (0x1AF4, 0x1041, 1)
    assert (header.base_class, header.subclass, header.prog_if) == (2, 0, 0)
    assert (header.subsystem_vendor_id, header.subsystem_id) == (0x1AF4, 0x1100)
    assert header.interrupt_pin == 1


def test_read_only_registers_ignore_writes() -> None:
    config = make_config()
    config.write(0, b"\xff\xff\xff\xff")
    config.write(pcifmt.Offset.REVISION_ID, b"\x55")
    assert config.read(0, 4) == bytes.fromhex("f41a4110")
    assert config.read(pcifmt.Offset.REVISION_ID, 1) == b"\x01"


def test_command_register_keeps_only_implemented_bits() -> None:
    config = make_config()
    config.write(pcifmt.Offset.COMMAND, b"\xff\xff")
    assert config.command == 0x0547  # IO, MEM, MASTER, PARITY, SERR, INTX_DISABLE


def test_status_error_bits_are_write_one_to_clear() -> None:
    config = make_config()
    config.data[pcifmt.Offset.STATUS + 1] = 0xF9  # all error bits set
    config.write(pcifmt.Offset.STATUS, struct.pack("<H", pcifmt.Status.SIG_TARGET_ABORT))
    assert config.u16(pcifmt.Offset.STATUS) & pcifmt.Status.SIG_TARGET_ABORT == 0
    assert config.u16(pcifmt.Offset.STATUS) & pcifmt.Status.DETECTED_PARITY


@pytest.mark.parametrize(("index", "sized"), [
    pytest.param(0, 0xFFFFFFE1, id="io-32"),
    pytest.param(1, 0xFFFFF000, id="mem32-4k"),
    pytest.param(4, 0xFFFFC00C, id="mem64-16k-prefetch-low"),
    pytest.param(5, 0xFFFFFFFF, id="mem64-high-dword"),
    pytest.param(2, 0x00000000, id="unimplemented"),
])
def test_bar_sizing(index: int, sized: int) -> None:
    config = make_config()
    reg = pcifmt.Offset.BASE_ADDRESS_0 + 4 * index
    config.write(reg, b"\xff\xff\xff\xff")
    assert u32(config, reg) == sized


def test_bar_keeps_the_address_written_within_its_size() -> None:
    config = make_config()
    config.write(pcifmt.Offset.BASE_ADDRESS_0, struct.pack("<I", 0xC07F))
    assert u32(config, pcifmt.Offset.BASE_ADDRESS_0) == 0xC061  # (written & ~31) | IO


def test_capability_chain_and_status_bit() -> None:
    config = make_config()
    first = config.add_capability(pcifmt.CapabilityId.PM, b"\x03\x00\x00\x00\x00\x00")
    second = config.add_capability(pcifmt.CapabilityId.MSIX, bytes(10), wmask=b"\x00\xc0")
    assert config.u16(pcifmt.Offset.STATUS) & pcifmt.Status.CAP_LIST
    assert list(config.capabilities()) == [(first, pcifmt.CapabilityId.PM),
                                           (second, pcifmt.CapabilityId.MSIX)]
    assert first == 0x40 and second % 4 == 0
    config.write(second + 2, b"\xff\xff")
    assert config.u16(second + 2) == 0xC000


def test_write_hook_sees_old_and_new() -> None:
    config = make_config()
    seen: list[tuple[int, bytes, bytes]] = []
    cap = config.add_capability(pcifmt.CapabilityId.VENDOR, bytes(6), wmask=b"\x00\xff",
                                hook=lambda o, old, new: seen.append((o, old, new)))
    config.write(cap + 3, b"\x42")
    assert seen == [(cap + 3, b"\x00", b"\x42")]
    config.write(pcifmt.Offset.COMMAND, b"\x01\x00")
    assert len(seen) == 1


@pytest.mark.parametrize(("offset", "size"), [(-1, 1), (255, 2), (256, 1), (0, 0)])
def test_out_of_range_access_is_einval(offset: int, size: int) -> None:
    with pytest.raises(GuestError) as raised:
        make_config().read(offset, size)
    assert raised.value.errno == errno.EINVAL


def test_whole_space_read() -> None:
    assert len(make_config().read(0, 256)) == 256


@pytest.mark.parametrize(("offset", "size", "expected"), [
    pytest.param(0, 4, [(2, b"\x00\x10")], id="dword-over-device-id"),
    pytest.param(2, 1, [(0, b"\x00")], id="setpci-2.b"),
    pytest.param(3, 1, [(0, b"\x10")], id="setpci-3.b"),
    pytest.param(1, 2, [(1, b"\x00")], id="unaligned-word"),
    pytest.param(4, 4, [], id="no-overlap"),
    pytest.param(0, 64, [(2, b"\x00\x10"), (8, b"\x00")], id="whole-header"),
])
def test_overlay_ranges(offset: int, size: int, expected: list[tuple[int, bytes]]) -> None:
    fields: dict[int, bytes] = {pcifmt.Offset.DEVICE_ID: b"\x00\x10",
                                pcifmt.Offset.REVISION_ID: b"\x00"}
    assert list(overlay_ranges(offset, size, fields)) == expected
