"""The modern virtio PCI transport: common cfg, notify, ISR/INTx, MSI-X routing, PCI_CFG."""

from __future__ import annotations

import struct

import pytest

from tests.devices.driver import DriverQueue, GuestRam, RecordingPeer
from vfuserver.devices.errors import GuestError
from vfuserver.devices.pci import ResetKind
from vfuserver.devices.virtio_net import VirtioNet
from vfuserver.devices.virtio_pci import MSIX_CONTROL_ENABLE, Layout, VirtioPciFunction
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol.pci import ClassCode
from vfuserver.protocol.virtio import DeviceStatus, Feature
from vfuserver.protocol.virtio_pci import CfgType, CommonCfgRegister

MAC = bytes.fromhex("525400000001")
R = CommonCfgRegister


class Irqs:
    def __init__(self) -> None:
        self.vectors: list[int] = []

    def trigger(self, vector: int) -> None:
        self.vectors.append(vector)


class Rig:
    def __init__(self) -> None:
        self.ram = GuestRam()
        self.peer = RecordingPeer()
        self.net = VirtioNet(self.ram.memory, None, self.peer, mac=MAC)  # type: ignore[arg-type]
        self.fn = VirtioPciFunction(self.net, name="t", class_code=ClassCode.NETWORK_ETHERNET)
        self.irqs = Irqs()
        self.fn.attach_interrupts(self.irqs)
        self.bar = self.fn.modern_bar
        self.config = self.fn.config_region()

    def common_write(self, reg: CommonCfgRegister, value: int) -> None:
        self.bar.write(Layout.COMMON + reg, value.to_bytes(reg.width, "little"))

    def common_read(self, reg: CommonCfgRegister) -> int:
        return int.from_bytes(self.bar.read(Layout.COMMON + reg, reg.width), "little")

    def negotiate(self) -> None:
        self.common_write(R.DEVICE_STATUS, 0)
        self.common_write(R.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        self.common_write(R.DEVICE_FEATURE_SELECT, 1)
        high = self.common_read(R.DEVICE_FEATURE)
        self.common_write(R.DRIVER_FEATURE_SELECT, 1)
        self.common_write(R.DRIVER_FEATURE, high)
        self.common_write(R.DEVICE_STATUS, 0xB)  # + FEATURES_OK

    def set_msix(self, enabled: bool) -> None:
        control = self.fn.msix_cap + 2
        value = MSIX_CONTROL_ENABLE if enabled else 0
        self.config.write(control, value.to_bytes(2, "little"))


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_capabilities_point_into_the_modern_bar(rig: Rig) -> None:
    found = {}
    for offset, cap_id in rig.fn.config.capabilities():
        if cap_id == pcifmt.CapabilityId.VENDOR:
            cfg_type, bar = rig.fn.config.data[offset + 3], rig.fn.config.data[offset + 4]
            start, length = struct.unpack_from("<II", rig.fn.config.data, offset + 8)
            found[CfgType(cfg_type)] = (bar, start, length)
    assert found[CfgType.COMMON] == (4, Layout.COMMON, 0x1000)
    assert found[CfgType.NOTIFY] == (4, Layout.NOTIFY, 0x1000)
    assert found[CfgType.ISR][1] == Layout.ISR and found[CfgType.DEVICE][1] == Layout.DEVICE
    assert CfgType.PCI in found


def test_feature_words_and_version_1(rig: Rig) -> None:
    rig.common_write(R.DEVICE_FEATURE_SELECT, 1)
    assert rig.common_read(R.DEVICE_FEATURE) & 1  # VERSION_1 is bit 32
    rig.common_write(R.DEVICE_FEATURE_SELECT, 7)
    assert rig.common_read(R.DEVICE_FEATURE) == 0
    rig.negotiate()
    assert rig.common_read(R.DEVICE_STATUS) & DeviceStatus.FEATURES_OK
    assert rig.net.has_feature(Feature.VERSION_1) and not rig.net.legacy


def test_queue_programming_and_64_bit_halves(rig: Rig) -> None:
    assert rig.common_read(R.NUM_QUEUES) == 3
    rig.common_write(R.QUEUE_SELECT, 1)
    assert rig.common_read(R.QUEUE_SIZE) == 256 and rig.common_read(R.QUEUE_NOTIFY_OFF) == 1
    rig.bar.write(Layout.COMMON + R.QUEUE_DESC_LO, struct.pack("<Q", 0x1_2345_6000))
    assert rig.common_read(R.QUEUE_DESC_LO) == 0x2345_6000
    assert rig.common_read(R.QUEUE_DESC_HI) == 1
    assert rig.net.queues[1].desc_addr == 0x1_2345_6000
    rig.common_write(R.QUEUE_SELECT, 9)  # no such queue: reads as absent
    assert rig.common_read(R.QUEUE_SIZE) == 0 and rig.common_read(R.QUEUE_MSIX_VECTOR) == 0xFFFF


def test_bad_queue_size_sets_needs_reset(rig: Rig) -> None:
    rig.negotiate()
    rig.set_msix(True)
    rig.common_write(R.CONFIG_MSIX_VECTOR, 0)
    rig.common_write(R.DEVICE_STATUS, 0xF)  # DRIVER_OK: config interrupts are delivered
    rig.common_write(R.QUEUE_SELECT, 2)
    rig.common_write(R.QUEUE_SIZE, 3)  # not a power of two
    assert rig.common_read(R.DEVICE_STATUS) & DeviceStatus.NEEDS_RESET
    assert rig.irqs.vectors == [0]  # the config interrupt
    rig.common_write(R.DEVICE_STATUS, 0)
    assert rig.common_read(R.DEVICE_STATUS) == 0


def test_layout_writes_to_an_enabled_queue_are_refused(rig: Rig) -> None:
    rig.common_write(R.QUEUE_SELECT, 0)
    rig.common_write(R.QUEUE_ENABLE, 1)
    with pytest.raises(GuestError):
        rig.common_write(R.QUEUE_SIZE, 128)


@pytest.mark.parametrize(("offset", "size"), [(1, 1), (0, 2), (20, 2), (60, 4), (64, 4)])
def test_misaligned_or_partial_common_accesses_are_refused(rig: Rig, offset: int,
                                                           size: int) -> None:
    with pytest.raises(GuestError):
        rig.bar.read(Layout.COMMON + offset, size)


def test_vectors_beyond_the_table_read_back_as_no_vector(rig: Rig) -> None:
    rig.common_write(R.CONFIG_MSIX_VECTOR, 3)
    assert rig.common_read(R.CONFIG_MSIX_VECTOR) == 3
    rig.common_write(R.CONFIG_MSIX_VECTOR, 4)  # 4 vectors: 0..3
    assert rig.common_read(R.CONFIG_MSIX_VECTOR) == 0xFFFF


def test_intx_sets_isr_and_isr_read_clears(rig: Rig) -> None:
    rig.negotiate()
    rig.common_write(R.DEVICE_STATUS, 0xF)
    rig.net.set_link(False)  # a config change
    assert rig.irqs.vectors == [0]  # INTx is index 0 while MSI-X is off
    assert rig.bar.read(Layout.ISR, 1) == b"\x02"
    assert rig.bar.read(Layout.ISR, 1) == b"\x00"
    rig.config.write(pcifmt.Offset.COMMAND, struct.pack("<H", pcifmt.Command.INTX_DISABLE))
    rig.net.set_link(True)
    assert rig.irqs.vectors == [0]  # INTx disabled in the command register
    assert rig.bar.read(Layout.ISR, 1) == b"\x02"


def test_msix_routes_queue_interrupts_to_their_vector(rig: Rig) -> None:
    rig.negotiate()
    rig.set_msix(True)
    rig.common_write(R.QUEUE_SELECT, 1)
    rig.common_write(R.QUEUE_MSIX_VECTOR, 2)
    txq = DriverQueue(rig.ram, rig.net.queues[1])
    rig.common_write(R.DEVICE_STATUS, 0xF)
    txq.add([bytes(12) + bytes(60)], [])
    rig.bar.write(Layout.NOTIFY + 4, b"\x01\x00")  # queue 1's notify address and index
    assert len(rig.peer.sent) == 1
    assert rig.irqs.vectors == [2]
    assert rig.bar.read(Layout.ISR, 1) == b"\x00"  # MSI-X: the ISR is not used


def test_notify_names_the_queue_by_its_value(rig: Rig) -> None:
    """LEGACY_NOTIFY_INFO's single address: the value is the queue index."""
    rig.negotiate()
    txq = DriverQueue(rig.ram, rig.net.queues[1])
    rig.common_write(R.DEVICE_STATUS, 0xF)
    txq.add([bytes(12) + bytes(60)], [])
    rig.bar.write(Layout.NOTIFY, b"\x01\x00")
    assert len(rig.peer.sent) == 1
    with pytest.raises(GuestError):
        rig.bar.write(Layout.NOTIFY, b"\x01")


def test_pci_cfg_window_reads_and_writes_the_bar(rig: Rig) -> None:
    cap = next(o for o, cid in rig.fn.config.capabilities()
               if cid == pcifmt.CapabilityId.VENDOR and rig.fn.config.data[o + 3] == CfgType.PCI)
    # window: BAR4, common cfg queue_select (offset 22), 2 bytes
    rig.config.write(cap + 4, b"\x04")
    rig.config.write(cap + 8, struct.pack("<II", Layout.COMMON + R.QUEUE_SELECT, 2))
    rig.config.write(cap + 16, b"\x02\x00")
    assert rig.common_read(R.QUEUE_SELECT) == 2
    rig.common_write(R.QUEUE_SELECT, 1)
    assert rig.config.read(cap + 16, 2) == b"\x01\x00"


def test_reset_restores_power_on_config(rig: Rig) -> None:
    rig.config.write(pcifmt.Offset.COMMAND, b"\x07\x00")
    rig.set_msix(True)
    rig.negotiate()
    rig.fn.reset(ResetKind.FLR)
    assert rig.fn.config.command == 0
    assert not rig.fn.transport.msix_enabled()
    assert rig.common_read(R.DEVICE_STATUS) == 0
