"""PM, MSI-X and PCI Express capability formats (vfuserver.protocol.pci_caps)."""

from __future__ import annotations

from typing import Any

import pytest
from construct import ConstError, Construct, Struct
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.roundtrip import assert_round_trip
from vfuserver.protocol import pci_caps as pc
from vfuserver.protocol.pci_caps import ExpressPortType, MsixControl, PmCapabilities, PmControl

EXPRESS_V2_ENDPOINT = {
    "cap_id": 0x10, "next": 0, "flags": 0x0002,
    "devcap": pc.ExpressDevCap.RBER | pc.ExpressDevCap.FLR, "devctl": 0x2810, "devsta": 0,
    "lnkcap": 0x0000_0011, "lnkctl": 0, "lnksta": 0x0011,
    "sltcap": 0, "sltctl": 0, "sltsta": 0, "rtctl": 0, "rtcap": 0, "rtsta": 0,
    "devcap2": 0, "devctl2": 0, "devsta2": 0, "lnkcap2": 0x0000_0002, "lnkctl2": 0x0001,
    "lnksta2": 0, "sltcap2": 0, "sltctl2": 0, "sltsta2": 0,
}  # fmt: skip

# One table feeds parse, build and sizeof.
ROUNDTRIP = [
    pytest.param(
        pc.PmCapability, bytes.fromhex("01 48 0300 0800 00 00"),
        {"cap_id": 1, "next": 0x48, "pmc": pc.PMC_VERSION_1_2,
         "pmcsr": PmControl.NO_SOFT_RESET, "pmcsr_bse": 0, "data": 0},
        id="pm-v1.2-d0-no-soft-reset",
    ),
    pytest.param(
        pc.PmCapability, bytes.fromhex("01 00 03fe 0381 00 00"),
        {"cap_id": 1, "next": 0,
         "pmc": 3 | PmCapabilities.D1 | PmCapabilities.D2 | PmCapabilities.PME_D0
                | PmCapabilities.PME_D1 | PmCapabilities.PME_D2 | PmCapabilities.PME_D3HOT
                | PmCapabilities.PME_D3COLD,
         "pmcsr": pc.PowerState.D3HOT | PmControl.PME_ENABLE | PmControl.PME_STATUS,
         "pmcsr_bse": 0, "data": 0},
        id="pm-d3hot-pme",
    ),
    pytest.param(
        pc.MsixCapability, bytes.fromhex("11 84 0200 01000000 01080000"),
        {"cap_id": 0x11, "next": 0x84, "message_control": 2, "table": 0x0000_0001,
         "pba": 0x0000_0801},
        id="msix-qemu-virtio-net-3-vectors-bar1",
    ),
    pytest.param(
        pc.MsixCapability, bytes.fromhex("11 00 ffc7 00200000 00300000"),
        {"cap_id": 0x11, "next": 0,
         "message_control": MsixControl.ENABLE | MsixControl.FUNCTION_MASK | 0x7FF,
         "table": 0x2000, "pba": 0x3000},
        id="msix-2048-enabled-masked-bar0",
    ),
    pytest.param(
        pc.MsixTableEntry, bytes.fromhex("0000e0fe 00000000 21400000 01000000"),
        {"msg_addr_lo": 0xFEE0_0000, "msg_addr_hi": 0, "msg_data": 0x4021,
         "vector_control": pc.MSIX_ENTRY_CTRL_MASKED},
        id="msix-entry-x86-masked",
    ),
    pytest.param(
        pc.ExpressCapability,
        bytes.fromhex(
            "10 00 0200"  # id, next, flags: v2 endpoint
            "00800010"  # devcap: RBER | FLR
            "1028 0000"  # devctl: relaxed ordering, 512B read req, no-snoop; devsta
            "11000000"  # lnkcap: 2.5 GT/s x1
            "0000 1100"  # lnkctl, lnksta: 2.5 GT/s x1
            "00000000 0000 0000"  # slot
            "0000 0000 00000000"  # root
            "00000000 0000 0000"  # devcap2, devctl2, devsta2
            "02000000 0100 0000"  # lnkcap2: 2.5 GT/s supported; lnkctl2: target 2.5
            "00000000 0000 0000"  # slot 2
        ),
        EXPRESS_V2_ENDPOINT,
        id="express-v2-endpoint",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "data", "obj"), ROUNDTRIP)
def test_round_trip(fmt: Construct, data: bytes, obj: dict[str, Any]) -> None:
    assert_round_trip(fmt, data, obj)


@pytest.mark.parametrize(
    ("fmt", "constant", "spec_size"),
    [
        pytest.param(pc.PmCapability, pc.PM_CAP_SIZE, 8, id="PCI_PM_SIZEOF"),
        pytest.param(pc.MsixCapability, pc.MSIX_CAP_SIZE, 12, id="PCI_CAP_MSIX_SIZEOF"),
        pytest.param(pc.MsixTableEntry, pc.MSIX_ENTRY_SIZE, 16, id="PCI_MSIX_ENTRY_SIZE"),
        pytest.param(pc.ExpressCapability, pc.EXPRESS_CAP_SIZE, 60, id="pcie-cap-v2"),
    ],
)
def test_sizes_match_spec(fmt: Construct, constant: int, spec_size: int) -> None:
    assert fmt.sizeof() == constant == spec_size


def test_cap_id_is_checked() -> None:
    with pytest.raises(ConstError):
        pc.MsixCapability.parse(bytes.fromhex("05 00 0200 01000000 01080000"))


def field_offsets(fmt: Struct) -> dict[str, int]:
    offsets, offset = {}, 0
    for sub in fmt.subcons:
        offsets[sub.name] = offset
        offset += sub.sizeof()
    return offsets


def test_pm_offsets_match_struct() -> None:
    offsets = field_offsets(pc.PmCapability)
    assert {m.name.lower(): int(m) for m in pc.PmOffset} == {
        name: offsets[name] for name in ("pmc", "pmcsr", "pmcsr_bse", "data")
    }


def test_msix_offsets_match_struct() -> None:
    offsets = field_offsets(pc.MsixCapability)
    assert offsets["message_control"] == pc.MsixOffset.MESSAGE_CONTROL
    assert offsets["table"] == pc.MsixOffset.TABLE
    assert offsets["pba"] == pc.MsixOffset.PBA
    entry = field_offsets(pc.MsixTableEntry)
    assert [int(m) for m in pc.MsixEntryOffset] == list(entry.values())


def test_express_offsets_match_struct() -> None:
    """ExpressOffset follows Linux pci_regs.h PCI_EXP_*; the Struct must agree."""
    offsets = field_offsets(pc.ExpressCapability)
    assert {m.name.lower(): int(m) for m in pc.ExpressOffset} == {
        name: offset for name, offset in offsets.items() if name not in ("cap_id", "next")
    }


def test_express_sizes() -> None:
    """pci_regs.h: V1 endpoints end at 0x14; V2 endpoints with a link at 0x34 (after LNKSTA2,
    not the 0x32 an older header had), without a link at 0x2c."""
    assert pc.EXPRESS_ENDPOINT_SIZE_V1 == pc.ExpressOffset.SLTCAP
    assert pc.EXPRESS_ENDPOINT_SIZE_V2 == int(pc.ExpressOffset.LNKSTA2) + 2 == 0x34
    assert pc.EXPRESS_RC_ENDPOINT_SIZE_V2 == int(pc.ExpressOffset.LNKCAP2) == 0x2C


@pytest.mark.parametrize(
    ("member", "value"),
    [
        (PmCapabilities.PME_CLOCK, 0x0008), (PmCapabilities.DSI, 0x0020),
        (PmCapabilities.D1, 0x0200), (PmCapabilities.D2, 0x0400),
        (PmCapabilities.PME_D0, 0x0800), (PmCapabilities.PME_D3COLD, 0x8000),
        (PmControl.NO_SOFT_RESET, 0x0008), (PmControl.PME_ENABLE, 0x0100),
        (PmControl.PME_STATUS, 0x8000),
        (MsixControl.FUNCTION_MASK, 0x4000), (MsixControl.ENABLE, 0x8000),
        (ExpressPortType.ENDPOINT, 0), (ExpressPortType.RC_END, 9),
        (pc.ExpressDevCap.FLR, 1 << 28), (pc.ExpressDevCtl.BCR_FLR, 0x8000),
    ],
    ids=str,
)  # fmt: skip
def test_pci_regs_h_values(member: int, value: int) -> None:
    assert member == value


def test_msix_helpers() -> None:
    assert pc.msix_table_size(0x0002) == 3
    assert pc.msix_table_size(0xC7FF) == 2048
    assert pc.msix_message_control(3) == 0x0002
    assert pc.msix_message_control(3, enable=True, mask=True) == 0xC002
    assert pc.decode_offset_bir(0x0801) == pc.OffsetBir(0x800, 1)
    assert pc.encode_offset_bir(0x2000, 4) == 0x2004
    assert [pc.msix_pba_bytes(n) for n in (1, 3, 64, 65, 2048)] == [8, 8, 8, 16, 256]
    assert pc.msix_table_bytes(3) == 48


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: pc.msix_message_control(0), "table size", id="size-0"),
        pytest.param(lambda: pc.msix_message_control(2049), "table size", id="size-2049"),
        pytest.param(lambda: pc.encode_offset_bir(0x804, 1), "QWORD", id="unaligned"),
        pytest.param(lambda: pc.encode_offset_bir(1 << 32, 1), "QWORD", id="too-wide"),
        pytest.param(lambda: pc.encode_offset_bir(0, 6), "BAR indicator", id="bir-6"),
        pytest.param(lambda: pc.express_flags(version=16), "version", id="version"),
        pytest.param(lambda: pc.express_flags(irq=32), "interrupt", id="irq"),
    ],
)
def test_helpers_reject(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@given(st.integers(0, 0x1FFF_FFFF).map(lambda q: q * 8), st.integers(0, 5))
def test_offset_bir_round_trip(offset: int, bir: int) -> None:
    assert pc.decode_offset_bir(pc.encode_offset_bir(offset, bir)) == (offset, bir)


@given(st.integers(1, 2048), st.booleans(), st.booleans())
def test_message_control_round_trip(size: int, enable: bool, mask: bool) -> None:
    control = pc.msix_message_control(size, enable=enable, mask=mask)
    assert pc.msix_table_size(control) == size
    assert bool(control & MsixControl.ENABLE) is enable
    assert bool(control & MsixControl.FUNCTION_MASK) is mask
    assert control & 0x3800 == 0  # reserved bits stay clear


def test_express_flags() -> None:
    assert pc.express_flags() == 0x0002
    assert pc.express_flags(ExpressPortType.RC_END) == 0x0092
    assert pc.express_flags(irq=3) == 0x0602
    flags = pc.express_flags(ExpressPortType.LEGACY_ENDPOINT, version=1)
    assert flags & pc.EXPRESS_FLAGS_VERSION_MASK == 1
    assert (flags & pc.EXPRESS_FLAGS_TYPE_MASK) >> 4 == ExpressPortType.LEGACY_ENDPOINT
