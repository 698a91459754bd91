"""Fuzz target 5: the modern virtio BAR (BAR4: common cfg, ISR, device cfg, notify), the
MSI-X BAR and the config space of a modern virtio-net function.

Each input is a sequence of operations on one function (tests/fuzz/rig.py, the modern
function behind the transitional rig): accesses of any offset and width to BAR4, BAR1 and
config space (the PCI_CFG window reaches BAR4 from there), writes into guest RAM (so the
queues a driver programs find rings), frames from the peer, the transmit bottom half,
function resets. Defined errors: GuestError from an access; everything else is a finding,
as is an interrupt on a vector the function does not have.
"""

from __future__ import annotations

from functools import partial

from tests.devices.driver import RAM_BASE
from tests.fuzz.harness import ByteReader
from tests.fuzz.rig import RigOperations, encode_access, region_access
from vfuserver.devices.virtio_pci import MSIX_BAR_SIZE, Layout
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol.virtio import DeviceStatus
from vfuserver.protocol.virtio_pci import CommonCfgRegister as Common


class ModernBarTarget(RigOperations):
    """Operation codes (first byte of each operation, modulo 8); RAM, RECEIVE, TRANSMIT
    and RESET are :meth:`FuzzRig.guest_step`'s."""

    RAM, RECEIVE, TRANSMIT, RESET, BAR4, MSIX_BAR, CONFIG, BAR4_AGAIN = range(8)

    def __init__(self) -> None:
        super().__init__()
        self.config = self.rig.rig.modern.config_region()

    def step(self, reader: ByteReader) -> None:
        modern = self.rig.rig.modern
        op = reader.u8() % 8
        if op in (self.BAR4, self.BAR4_AGAIN):
            region_access(reader, modern.modern_bar, Layout.SIZE)
        elif op == self.MSIX_BAR:
            region_access(reader, modern.config.bars[1].region, MSIX_BAR_SIZE)
        elif op == self.CONFIG:
            region_access(reader, self.config, modern.config.size)
        else:
            self.rig.guest_step(op, reader)

    # -- seeds ------------------------------------------------------------------------

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        """What Linux virtio_pci_modern does, and a few edges."""
        bar4, config = partial(encode_access, cls.BAR4), partial(encode_access, cls.CONFIG)

        ack = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
        features_ok = ack | DeviceStatus.FEATURES_OK
        probe = (config(pcifmt.Offset.COMMAND, 2, pcifmt.Command.MEMORY | pcifmt.Command.MASTER)
                 + bar4(Common.DEVICE_STATUS, 1, 0) + bar4(Common.DEVICE_STATUS, 1, ack)
                 + bar4(Common.DEVICE_FEATURE_SELECT, 4, 1) + bar4(Common.DEVICE_FEATURE, 4)
                 + bar4(Common.DRIVER_FEATURE_SELECT, 4, 1) + bar4(Common.DRIVER_FEATURE, 4, 1)
                 + bar4(Common.DEVICE_STATUS, 1, features_ok) + bar4(Common.DEVICE_STATUS, 1))
        queues = b""
        for index in range(3):
            base = RAM_BASE + 0x4000 * index
            queues += (bar4(Common.QUEUE_SELECT, 2, index) + bar4(Common.QUEUE_SIZE, 2, 16)
                       + bar4(Common.QUEUE_DESC_LO, 4, base)
                       + bar4(Common.QUEUE_DRIVER_LO, 4, base + 0x1000)
                       + bar4(Common.QUEUE_DEVICE_LO, 4, base + 0x2000)
                       + bar4(Common.QUEUE_ENABLE, 2, 1))
        ok = bar4(Common.DEVICE_STATUS, 1, features_ok | DeviceStatus.DRIVER_OK)
        # transmit queue 1: descriptor 0 -> 64 device-readable bytes at RAM + 0xF000
        desc = (RAM_BASE + 0xF000).to_bytes(8, "little") + (64).to_bytes(4, "little") + bytes(4)
        ram_desc = bytes([cls.RAM]) + (0x4000).to_bytes(2, "little") + bytes([16]) + desc
        ram_avail = (bytes([cls.RAM]) + (0x5000).to_bytes(2, "little") + b"\x06"
                     + bytes([0, 0, 1, 0, 0, 0]))
        kick = bar4(Layout.NOTIFY, 2, 1)
        return {
            "probe": probe,
            "bring-up": probe + queues + ok,
            "transmit": probe + queues + ok + ram_desc + ram_avail + kick,
            "device-config": bar4(Layout.DEVICE, 4) + bar4(Layout.DEVICE + 6, 2)
            + bar4(Layout.DEVICE, 1, 0xFF),
            "isr": bar4(Layout.ISR, 1) + bar4(Layout.ISR, 4) + bar4(Layout.ISR, 1, 1),
            "config-space": config(0, 4) + config(0x34, 1) + config(0x40, 8) + config(0, 4, 0),
            "msix-table": encode_access(cls.MSIX_BAR, 0, 8, 0xFEE00000)
            + encode_access(cls.MSIX_BAR, 0x800, 8),
        }
