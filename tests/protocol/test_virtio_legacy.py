"""Legacy IO BAR0 layout: round trips, register lookup, BAR size, legacy queue placement."""

from __future__ import annotations

from typing import Any

import pytest
from construct import Construct, Struct
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.roundtrip import assert_round_trip
from vfuserver.protocol import virtio_legacy as vl
from vfuserver.protocol.virtio_legacy import Area, Register

# A virtio-net legacy driver after initialisation: guest features 0x00010020 (bit 5 MAC,
# bit 16 STATUS), queue 1 at 0x3f2f0000 with 256 entries, status ACK|DRIVER|DRIVER_OK.
ROUNDTRIP = [
    pytest.param(
        vl.LegacyCommonHeader,
        bytes.fromhex("20000179 20000100 f0f20300 0001 0100 0100 07 01"),
        {"host_features": 0x7901_0020, "guest_features": 0x0001_0020,
         "queue_pfn": 0x0003_F2F0, "queue_num": 256, "queue_sel": 1, "queue_notify": 1,
         "status": 7, "isr": 1},
        id="header-msix-off",
    ),
    pytest.param(
        vl.LegacyCommonHeaderMsix,
        bytes.fromhex("20000179 20000100 f0f20300 0001 0100 0100 07 00 0000 ffff"),
        {"host_features": 0x7901_0020, "guest_features": 0x0001_0020,
         "queue_pfn": 0x0003_F2F0, "queue_num": 256, "queue_sel": 1, "queue_notify": 1,
         "status": 7, "isr": 0, "msi_config_vector": 0, "msi_queue_vector": 0xFFFF},
        id="header-msix-on",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "data", "obj"), ROUNDTRIP)
def test_round_trip(fmt: Construct, data: bytes, obj: dict[str, Any]) -> None:
    assert_round_trip(fmt, data, obj)


def test_sizes_match_spec() -> None:
    """VIRTIO_PCI_CONFIG_OFF(false) = 20, VIRTIO_PCI_CONFIG_OFF(true) = 24."""
    assert vl.LegacyCommonHeader.sizeof() == vl.COMMON_HEADER_SIZE == 20
    assert vl.LegacyCommonHeaderMsix.sizeof() == vl.COMMON_HEADER_SIZE_MSIX == 24


def field_layout(fmt: Struct) -> dict[str, tuple[int, int]]:
    layout, offset = {}, 0
    for sub in fmt.subcons:
        layout[sub.name] = (offset, sub.sizeof())
        offset += sub.sizeof()
    return layout


def test_registers_match_struct() -> None:
    actual = {reg.name.lower(): (int(reg), reg.width) for reg in Register}
    assert actual == field_layout(vl.LegacyCommonHeaderMsix)


@pytest.mark.parametrize(
    ("register", "offset", "width"),
    [
        (Register.HOST_FEATURES, 0, 4), (Register.GUEST_FEATURES, 4, 4),
        (Register.QUEUE_PFN, 8, 4), (Register.QUEUE_NUM, 12, 2), (Register.QUEUE_SEL, 14, 2),
        (Register.QUEUE_NOTIFY, 16, 2), (Register.STATUS, 18, 1), (Register.ISR, 19, 1),
        (Register.MSI_CONFIG_VECTOR, 20, 2), (Register.MSI_QUEUE_VECTOR, 22, 2),
    ],
    ids=lambda value: value.name if isinstance(value, Register) else None,
)  # fmt: skip
def test_linux_register_macros(register: Register, offset: int, width: int) -> None:
    """include/uapi/linux/virtio_pci.h VIRTIO_PCI_* offsets; widths from the spec table."""
    assert (int(register), register.width) == (offset, width)


def test_register_properties() -> None:
    assert {reg for reg in Register if not reg.writable} == {
        Register.HOST_FEATURES,
        Register.QUEUE_NUM,
        Register.ISR,
    }
    assert {reg for reg in Register if reg.needs_msix} == {
        Register.MSI_CONFIG_VECTOR,
        Register.MSI_QUEUE_VECTOR,
    }


def test_config_offset() -> None:
    assert vl.config_offset(msix_enabled=False) == 20
    assert vl.config_offset(msix_enabled=True) == 24


@pytest.mark.parametrize(
    ("offset", "msix", "expected"),
    [
        pytest.param(0, False, Register.HOST_FEATURES, id="0"),
        pytest.param(3, False, Register.HOST_FEATURES, id="inside-host-features"),
        pytest.param(13, True, Register.QUEUE_NUM, id="inside-queue-num"),
        pytest.param(19, False, Register.ISR, id="isr"),
        pytest.param(20, False, None, id="20-is-device-config-without-msix"),
        pytest.param(20, True, Register.MSI_CONFIG_VECTOR, id="20-is-vector-with-msix"),
        pytest.param(23, True, Register.MSI_QUEUE_VECTOR, id="23-msix"),
        pytest.param(24, True, None, id="24-is-device-config-with-msix"),
        pytest.param(-1, True, None, id="negative"),
    ],
)
def test_register_at(offset: int, msix: bool, expected: Register | None) -> None:
    assert vl.register_at(offset, msix) == expected


@pytest.mark.parametrize(
    ("offset", "size", "msix", "expected"),
    [
        pytest.param(0, 4, False, Register.HOST_FEATURES, id="natural"),
        pytest.param(2, 2, False, Register.HOST_FEATURES, id="partial-inside-one-field"),
        pytest.param(16, 2, False, Register.QUEUE_NOTIFY, id="notify"),
        pytest.param(18, 1, False, Register.STATUS, id="status"),
        pytest.param(18, 2, False, None, id="status-and-isr-straddle"),
        pytest.param(14, 4, False, None, id="sel-and-notify-straddle"),
        pytest.param(20, 2, False, None, id="vector-offset-without-msix"),
        pytest.param(22, 2, True, Register.MSI_QUEUE_VECTOR, id="queue-vector"),
        pytest.param(22, 4, True, None, id="into-device-config"),
        pytest.param(8, 0, False, None, id="empty"),
    ],
)
def test_register_for_access(offset: int, size: int, msix: bool, expected: Register | None) -> None:
    assert vl.register_for_access(offset, size, msix) == expected


@pytest.mark.parametrize(
    ("offset", "msix", "expected"),
    [
        (0, False, vl.Location(Area.COMMON, 0)),
        (19, True, vl.Location(Area.COMMON, 19)),
        (20, False, vl.Location(Area.DEVICE, 0)),
        (20, True, vl.Location(Area.COMMON, 20)),
        (24, True, vl.Location(Area.DEVICE, 0)),
        (31, True, vl.Location(Area.DEVICE, 7)),
        (31, False, vl.Location(Area.DEVICE, 11)),
    ],
)
def test_locate(offset: int, msix: bool, expected: vl.Location) -> None:
    assert vl.locate(offset, msix) == expected


def test_locate_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        vl.locate(-1, False)


@given(st.integers(0, 255), st.booleans())
def test_locate_agrees_with_register_at(offset: int, msix: bool) -> None:
    area, relative = vl.locate(offset, msix)
    reg = vl.register_at(offset, msix)
    if area is Area.COMMON:
        assert reg is not None and reg <= relative < reg + reg.width
        assert msix or not reg.needs_msix
    else:
        assert reg is None
        assert relative == offset - vl.config_offset(msix)


@pytest.mark.parametrize(
    ("config_bytes", "size"),
    [
        pytest.param(8, 32, id="virtio-net-mac-and-status"),
        pytest.param(0, 32, id="no-config"),
        pytest.param(9, 64, id="one-past"),
        pytest.param(40, 64, id="exact-64"),
        pytest.param(41, 128, id="past-64"),
    ],
)
def test_bar0_size(config_bytes: int, size: int) -> None:
    assert vl.bar0_size(config_bytes) == size


def test_bar0_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        vl.bar0_size(-1)


@pytest.mark.parametrize(
    ("pfn", "num", "layout", "total"),
    [
        pytest.param(1, 256, vl.QueueLayout(0x1000, 0x2000, 0x3000), 12288, id="256"),
        pytest.param(0x3F2F0, 128, vl.QueueLayout(0x3F2F_0000, 0x3F2F_0800, 0x3F2F_1000), 8192,
                     id="128"),
        pytest.param(2, 1024, vl.QueueLayout(0x2000, 0x6000, 0x7000), 0x8000, id="1024"),
        pytest.param(0, 1, vl.QueueLayout(0, 16, 4096), 8192, id="1"),
    ],
)  # fmt: skip
def test_queue_layout(pfn: int, num: int, layout: vl.QueueLayout, total: int) -> None:
    """Spec legacy layout; used ring at the next 4096 boundary after avail's used_event."""
    assert vl.queue_layout(pfn, num) == layout
    assert vl.queue_bytes(num) == total


@pytest.mark.parametrize(
    ("pfn", "num"), [(-1, 256), (1 << 32, 256), (1, 0)], ids=["neg-pfn", "wide-pfn", "empty"]
)
def test_queue_layout_rejects(pfn: int, num: int) -> None:
    with pytest.raises(ValueError):
        vl.queue_layout(pfn, num)


@given(st.integers(0, 0xFFFF_FFFF), st.sampled_from([2**n for n in range(16)]))
def test_queue_layout_properties(pfn: int, num: int) -> None:
    desc, avail, used = vl.queue_layout(pfn, num)
    assert desc == pfn * vl.VRING_ALIGN
    assert avail == desc + 16 * num
    assert used % vl.VRING_ALIGN == 0
    assert avail + 6 + 2 * num <= used < avail + 6 + 2 * num + vl.VRING_ALIGN
    assert used + 6 + 8 * num <= desc + vl.queue_bytes(num)
