"""Round trips and register tables for vfuserver.protocol.virtio_pci (virtio spec §4.1)."""

from __future__ import annotations

from typing import Any

import pytest
from construct import Construct, Struct
from hypothesis import given
from hypothesis import strategies as st

from tests.protocol.roundtrip import assert_round_trip
from vfuserver.protocol import virtio_pci as vp
from vfuserver.protocol.virtio import DeviceType
from vfuserver.protocol.virtio_pci import CfgType, CommonCfgRegister

# One table feeds parse, build and sizeof. Layout of the capability examples follows QEMU's
# virtio-net-pci: structures in BAR4, common @0, ISR @0x1000, notify @0x3000 with
# notify_off_multiplier 4, then a PCI cfg access capability.
ROUNDTRIP = [
    pytest.param(
        vp.VirtioPciCap,
        bytes.fromhex("09 50 10 01 04 00 0000 00000000 00100000"),
        {"cap_vndr": 9, "cap_next": 0x50, "cap_len": 16, "cfg_type": CfgType.COMMON,
         "bar": 4, "id": 0, "offset": 0, "length": 0x1000},
        id="cap-common",
    ),
    pytest.param(
        vp.VirtioPciCap,
        bytes.fromhex("09 60 10 03 04 00 0000 00100000 00100000"),
        {"cap_vndr": 9, "cap_next": 0x60, "cap_len": 16, "cfg_type": CfgType.ISR,
         "bar": 4, "id": 0, "offset": 0x1000, "length": 0x1000},
        id="cap-isr",
    ),
    pytest.param(
        vp.VirtioPciCap,
        bytes.fromhex("09 00 10 06 02 07 0000 78563412 f0debc0a"),
        {"cap_vndr": 9, "cap_next": 0, "cap_len": 16, "cfg_type": 6,
         "bar": 2, "id": 7, "offset": 0x12345678, "length": 0x0ABCDEF0},
        id="cap-reserved-cfg-type-stays-int",
    ),
    pytest.param(
        vp.VirtioPciNotifyCap,
        bytes.fromhex("09 84 14 02 04 00 0000 00300000 00100000 04000000"),
        {"cap": {"cap_vndr": 9, "cap_next": 0x84, "cap_len": 20, "cfg_type": CfgType.NOTIFY,
                 "bar": 4, "id": 0, "offset": 0x3000, "length": 0x1000},
         "notify_off_multiplier": 4},
        id="notify-cap",
    ),
    pytest.param(
        vp.VirtioPciCfgCap,
        bytes.fromhex("09 00 14 05 04 00 0000 14000000 02000000 efbeadde"),
        {"cap": {"cap_vndr": 9, "cap_next": 0, "cap_len": 20, "cfg_type": CfgType.PCI,
                 "bar": 4, "id": 0, "offset": 0x14, "length": 2},
         "pci_cfg_data": b"\xef\xbe\xad\xde"},
        id="pci-cfg-cap",
    ),
    pytest.param(
        vp.VirtioPciCap64,
        bytes.fromhex("09 00 18 08 02 01 0000 00000080 00000040 01000000 02000000"),
        {"cap": {"cap_vndr": 9, "cap_next": 0, "cap_len": 24,
                 "cfg_type": CfgType.SHARED_MEMORY, "bar": 2, "id": 1,
                 "offset": 0x8000_0000, "length": 0x4000_0000},
         "offset_hi": 1, "length_hi": 2},
        id="cap64-shared-memory",
    ),
    pytest.param(
        vp.VirtioPciVendorData,
        bytes.fromhex("09 00 08 09 f4 1a"),
        {"cap_vndr": 9, "cap_next": 0, "cap_len": 8, "cfg_type": CfgType.VENDOR,
         "vendor_id": 0x1AF4},
        id="vendor-data",
    ),
    pytest.param(
        vp.CommonCfg,
        bytes.fromhex(
            "01000000"  # device_feature_select = 1
            "01000000"  # device_feature: VIRTIO_F_VERSION_1 (bit 32)
            "00000000"  # driver_feature_select
            "20000100"  # driver_feature: bits 5 and 16
            "0000"  # config_msix_vector
            "0300"  # num_queues
            "0f"  # device_status: ACK|DRIVER|DRIVER_OK|FEATURES_OK
            "02"  # config_generation
            "0100"  # queue_select
            "0001"  # queue_size = 256
            "0200"  # queue_msix_vector
            "0100"  # queue_enable
            "0100"  # queue_notify_off
            "0060341201000000"  # queue_desc = 0x1_1234_6000
            "0070341201000000"  # queue_driver
            "0080341201000000"  # queue_device
            "0100"  # queue_notify_data
            "0000"  # queue_reset
            "0300"  # admin_queue_index
            "0100"  # admin_queue_num
        ),
        {"device_feature_select": 1, "device_feature": 1, "driver_feature_select": 0,
         "driver_feature": 0x10020, "config_msix_vector": 0, "num_queues": 3,
         "device_status": 0x0F, "config_generation": 2, "queue_select": 1,
         "queue_size": 256, "queue_msix_vector": 2, "queue_enable": 1, "queue_notify_off": 1,
         "queue_desc": 0x1_1234_6000, "queue_driver": 0x1_1234_7000,
         "queue_device": 0x1_1234_8000, "queue_notify_data": 1, "queue_reset": 0,
         "admin_queue_index": 3, "admin_queue_num": 1},
        id="common-cfg",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "data", "obj"), ROUNDTRIP)
def test_round_trip(fmt: Construct, data: bytes, obj: dict[str, Any]) -> None:
    assert_round_trip(fmt, data, obj)


@pytest.mark.parametrize(
    ("fmt", "constant", "spec_size"),
    [
        pytest.param(vp.VirtioPciCap, vp.CAP_SIZE, 16, id="virtio_pci_cap"),
        pytest.param(vp.VirtioPciNotifyCap, vp.NOTIFY_CAP_SIZE, 20, id="virtio_pci_notify_cap"),
        pytest.param(vp.VirtioPciCfgCap, vp.PCI_CFG_CAP_SIZE, 20, id="virtio_pci_cfg_cap"),
        pytest.param(vp.VirtioPciCap64, vp.CAP64_SIZE, 24, id="virtio_pci_cap64"),
        pytest.param(vp.VirtioPciVendorData, vp.VENDOR_DATA_CAP_SIZE, 6, id="virtio_pci_vndr_data"),
        pytest.param(vp.CommonCfg, vp.COMMON_CFG_SIZE, 64, id="virtio_pci_modern_common_cfg"),
    ],
)
def test_sizes_match_spec(fmt: Construct, constant: int, spec_size: int) -> None:
    assert fmt.sizeof() == constant == spec_size


def test_cap_vndr_is_checked() -> None:
    from construct import ConstError

    with pytest.raises(ConstError):
        vp.VirtioPciCap.parse(bytes.fromhex("11 00 10 01 04 00 0000 00000000 00100000"))


def field_layout(fmt: Struct) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of each named field of a flat Struct."""
    layout, offset = {}, 0
    for sub in fmt.subcons:
        size = sub.sizeof()
        if sub.name is not None:
            layout[sub.name] = (offset, size)
        offset += size
    return layout


def test_cap_offsets_match_struct() -> None:
    layout = field_layout(vp.VirtioPciCap)
    for name in ("cap_next", "cap_len", "cfg_type", "bar", "id", "offset", "length"):
        member = vp.CapOffset[name.removeprefix("cap_").upper()]
        assert layout[name][0] == member
    assert layout["cap_vndr"][0] == vp.CapOffset.VNDR
    assert vp.CapOffset.TAIL == vp.CAP_SIZE


def test_common_cfg_registers_match_struct() -> None:
    """Every CommonCfg field has registers of the right offset and width, and vice versa."""
    expected: dict[str, tuple[int, int]] = {}
    for name, (offset, size) in field_layout(vp.CommonCfg).items():
        if size == 8:
            expected[f"{name.upper()}_LO"] = (offset, 4)
            expected[f"{name.upper()}_HI"] = (offset + 4, 4)
        else:
            expected[name.upper()] = (offset, size)
    actual = {reg.name: (int(reg), reg.width) for reg in CommonCfgRegister}
    assert actual == expected


def test_linux_common_cfg_macros() -> None:
    """Offsets from include/uapi/linux/virtio_pci.h VIRTIO_PCI_COMMON_*."""
    linux = {
        "DFSELECT": 0, "DF": 4, "GFSELECT": 8, "GF": 12, "MSIX": 16, "NUMQ": 18,
        "STATUS": 20, "CFGGENERATION": 21, "Q_SELECT": 22, "Q_SIZE": 24, "Q_MSIX": 26,
        "Q_ENABLE": 28, "Q_NOFF": 30, "Q_DESCLO": 32, "Q_DESCHI": 36, "Q_AVAILLO": 40,
        "Q_AVAILHI": 44, "Q_USEDLO": 48, "Q_USEDHI": 52, "Q_NDATA": 56, "Q_RESET": 58,
        "ADM_Q_IDX": 60, "ADM_Q_NUM": 62,
    }  # fmt: skip
    assert sorted(linux.values()) == sorted(int(reg) for reg in CommonCfgRegister)


@pytest.mark.parametrize(
    ("offset", "size", "expected"),
    [
        pytest.param(0, 4, (CommonCfgRegister.DEVICE_FEATURE_SELECT,), id="dword"),
        pytest.param(20, 1, (CommonCfgRegister.DEVICE_STATUS,), id="status-byte"),
        pytest.param(21, 1, (CommonCfgRegister.CONFIG_GENERATION,), id="generation"),
        pytest.param(22, 2, (CommonCfgRegister.QUEUE_SELECT,), id="word"),
        pytest.param(62, 2, (CommonCfgRegister.ADMIN_QUEUE_NUM,), id="last"),
        pytest.param(36, 4, (CommonCfgRegister.QUEUE_DESC_HI,), id="qword-high-half"),
        pytest.param(
            40, 8,
            (CommonCfgRegister.QUEUE_DRIVER_LO, CommonCfgRegister.QUEUE_DRIVER_HI),
            id="qword-whole",
        ),
        pytest.param(20, 2, (), id="status-too-wide"),
        pytest.param(0, 2, (), id="dword-partial"),
        pytest.param(2, 2, (), id="not-a-register-start"),
        pytest.param(36, 8, (), id="qword-misaligned"),
        pytest.param(0, 8, (), id="two-dwords-not-a-qword"),
        pytest.param(64, 2, (), id="past-the-end"),
        pytest.param(-2, 2, (), id="negative"),
    ],
)  # fmt: skip
def test_common_cfg_access(offset: int, size: int, expected: tuple[CommonCfgRegister, ...]) -> None:
    assert vp.common_cfg_access(offset, size) == expected


def test_read_only_registers() -> None:
    """The fields §4.1.4.3 marks "read-only for driver"."""
    read_only = {reg for reg in CommonCfgRegister if not reg.writable}
    assert read_only == {
        CommonCfgRegister.DEVICE_FEATURE,
        CommonCfgRegister.NUM_QUEUES,
        CommonCfgRegister.CONFIG_GENERATION,
        CommonCfgRegister.QUEUE_NOTIFY_OFF,
        CommonCfgRegister.QUEUE_NOTIFY_DATA,
        CommonCfgRegister.ADMIN_QUEUE_INDEX,
        CommonCfgRegister.ADMIN_QUEUE_NUM,
    }


@given(st.integers(-4, 70), st.sampled_from([1, 2, 4, 8]))
def test_common_cfg_access_stays_inside(offset: int, size: int) -> None:
    regs = vp.common_cfg_access(offset, size)
    if regs:
        assert int(regs[0]) == offset
        assert sum(reg.width for reg in regs) == size
        assert offset + size <= vp.COMMON_CFG_SIZE


def test_common_cfg_base_size_is_queue_device_end() -> None:
    offset, size = field_layout(vp.CommonCfg)["queue_device"]
    assert offset + size == vp.COMMON_CFG_BASE_SIZE == 56


@pytest.mark.parametrize(
    ("member", "value"),
    [
        (vp.CfgType.COMMON, 1), (vp.CfgType.NOTIFY, 2), (vp.CfgType.ISR, 3),
        (vp.CfgType.DEVICE, 4), (vp.CfgType.PCI, 5), (vp.CfgType.SHARED_MEMORY, 8),
        (vp.CfgType.VENDOR, 9),
        (vp.IsrStatus.QUEUE, 1), (vp.IsrStatus.CONFIG, 2),
        (vp.TransitionalDeviceId.NET, 0x1000), (vp.TransitionalDeviceId.BLOCK, 0x1001),
        (vp.TransitionalDeviceId.NINEP, 0x1009),
    ],
    ids=str,
)  # fmt: skip
def test_constants_match_spec(member: int, value: int) -> None:
    assert member == value


def test_identity() -> None:
    assert vp.VENDOR_ID == 0x1AF4
    assert vp.modern_device_id(DeviceType.NET) == 0x1041
    assert vp.modern_device_id(DeviceType.BLOCK) == 0x1042
    assert vp.MSI_NO_VECTOR == 0xFFFF
    with pytest.raises(ValueError, match="out of range"):
        vp.modern_device_id(0x10000)


@pytest.mark.parametrize(
    ("device_type", "transitional_id", "class_code"),
    [(DeviceType.NET, 0x1000, 0x0200), (DeviceType.BLOCK, 0x1001, 0x0100)],
)
def test_pci_id_info_as_qemu(device_type: int, transitional_id: int, class_code: int) -> None:
    """QEMU virtio_pci_id_info[]: PCI_DEVICE_ID_VIRTIO_NET/BLOCK, PCI_CLASS_NETWORK_ETHERNET
    and PCI_CLASS_STORAGE_SCSI."""
    assert vp.pci_id_info(device_type) == (transitional_id, class_code)


def test_pci_id_info_refuses_unserved_types() -> None:
    with pytest.raises(ValueError, match="no PCI identity for virtio device type 18"):
        vp.pci_id_info(DeviceType.INPUT)
    with pytest.raises(ValueError, match="type 0"):
        vp.pci_id_info(0)


def test_notify_offset() -> None:
    assert vp.notify_offset(0x3000, 2, 4) == 0x3008
    assert vp.notify_offset(0, 5, 0) == 0  # multiplier 0: all queues share one address
