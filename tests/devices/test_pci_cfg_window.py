"""The virtio PCI_CFG capability window: a config access never fails because of it.

QEMU virtio_read_config / virtio_write_config: before a config read that overlaps
pci_cfg_data the window (cap.bar, cap.offset aligned down to cap.length, cap.length of
1, 2 or 4) is read into pci_cfg_data; a window that points nowhere leaves it as it was
(virtio_address_space_read returns without touching it) and the config read goes on; a
config write always lands, and the window write it triggers is dropped if it points
nowhere. Here the BAR is the one cap.bar names (§4.1.4.9; QEMU ignores cap.bar and
always uses its modern BAR), and a window access the region refuses (a GuestError: ISR
read of 2 bytes, device config beyond its length, a common cfg access over two fields)
is dropped in the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from tests.devices.driver import GuestRam, RecordingPeer
from tests.devices.legacy_driver import MAC
from tests.devices.legacy_driver import Rig as LegacyRig
from vfuserver.devices.pci import Region
from vfuserver.devices.virtio_net import VirtioNet
from vfuserver.devices.virtio_pci import (
    MODERN_BAR,
    MSIX_BAR,
    PCI_CFG_DATA,
    Layout,
    VirtioPciFunction,
)
from vfuserver.protocol.pci import CONFIG_SPACE_SIZE, ClassCode
from vfuserver.protocol.virtio_pci import CommonCfgRegister as R

OLD = b"\xa5\x5a\xc3\x3c"
"""What pci_cfg_data holds before the window is read (written through a valid window
of length 0, which nothing reads: QEMU only acts on lengths 1, 2 and 4)."""


def modern() -> tuple[VirtioPciFunction, Region]:
    net = VirtioNet(GuestRam().memory, None, RecordingPeer(), mac=MAC)  # type: ignore[arg-type]
    fn = VirtioPciFunction(net, name="t", class_code=ClassCode.NETWORK_ETHERNET)
    return fn, fn.config_region()


def transitional() -> tuple[VirtioPciFunction, Region]:
    rig = LegacyRig()
    return rig.modern, rig.config


def program(config: Region, cap: int, bar: int, offset: int, length: int) -> None:
    config.write(cap + 4, bytes([bar]))
    config.write(cap + 8, struct.pack("<II", offset, length))


WINDOWS = [
    pytest.param(9, 0, 4, None, id="no-such-bar"),
    pytest.param(MODERN_BAR, 0, 3, None, id="length-3"),
    pytest.param(MODERN_BAR, 0, 0xFFFF_FFFF, None, id="length-huge"),
    pytest.param(MODERN_BAR, Layout.SIZE, 4, None, id="beyond-the-bar"),
    pytest.param(MODERN_BAR, Layout.SIZE - 2, 4, bytes(4), id="straddling-end-aligned-down"),
    pytest.param(MODERN_BAR, 0xFFFF_FFFC, 4, None, id="offset-wraps"),
    pytest.param(MODERN_BAR, Layout.ISR, 2, None, id="isr-2-bytes-refused"),
    pytest.param(MODERN_BAR, Layout.DEVICE + 0x800, 4, None, id="device-config-beyond"),
    pytest.param(MODERN_BAR, Layout.COMMON + R.QUEUE_SELECT, 4, None, id="common-over-two"),
    pytest.param(MODERN_BAR, Layout.DEVICE, 4, MAC[:4], id="device-config-mac"),
    pytest.param(MODERN_BAR, Layout.DEVICE + 5, 4, MAC[4:6] + b"\x01\x00",
                 id="misaligned-offset-aligned-down"),
    pytest.param(MSIX_BAR, 0, 4, bytes(4), id="msix-table"),
]


@pytest.mark.parametrize("make", [modern, transitional])
@pytest.mark.parametrize(("bar", "offset", "length", "window"), WINDOWS)
def test_whole_config_read_with_any_window(make: Callable[[], tuple[VirtioPciFunction, Region]],
                                           bar: int, offset: int, length: int,
                                           window: bytes | None) -> None:
    fn, config = make()
    cap = fn.pci_cfg_cap
    program(config, cap, MODERN_BAR, 0, 0)
    config.write(cap + PCI_CFG_DATA, OLD)
    program(config, cap, bar, offset, length)
    whole = config.read(0, CONFIG_SPACE_SIZE)
    assert len(whole) == CONFIG_SPACE_SIZE
    data = whole[cap + PCI_CFG_DATA : cap + PCI_CFG_DATA + 4]
    if window is None:
        assert data == OLD  # unchanged, as virtio_address_space_read leaves it
    else:
        assert data == window + OLD[len(window):]
    # every other byte is what a read that does not touch the window returns
    assert whole[: cap + PCI_CFG_DATA] == config.read(0, cap + PCI_CFG_DATA)
    end = cap + PCI_CFG_DATA + 4
    assert whole[end:] == config.read(end, CONFIG_SPACE_SIZE - end)


@pytest.mark.parametrize(("offset", "length"), [
    pytest.param(Layout.ISR, 1, id="isr-read-only"),
    pytest.param(Layout.COMMON + R.QUEUE_SELECT, 4, id="common-over-two"),
    pytest.param(Layout.DEVICE + 0x800, 4, id="device-config-beyond"),
    pytest.param(Layout.SIZE, 4, id="beyond-the-bar"),
])
def test_config_write_lands_whatever_the_window(offset: int, length: int) -> None:
    """virtio_write_config: pci_default_write_config first, then the window write, whose
    failure nobody sees."""
    fn, config = modern()
    cap = fn.pci_cfg_cap
    program(config, cap, MODERN_BAR, offset, length)
    config.write(cap + PCI_CFG_DATA, OLD)
    assert bytes(fn.config.data[cap + PCI_CFG_DATA : cap + PCI_CFG_DATA + 4]) == OLD


def test_window_write_reaches_the_bar_at_the_aligned_offset() -> None:
    fn, config = modern()
    cap = fn.pci_cfg_cap
    program(config, cap, MODERN_BAR, Layout.COMMON + R.QUEUE_SELECT + 1, 2)
    config.write(cap + PCI_CFG_DATA, b"\x02\x00")
    assert fn.transport.queue_select == 2
