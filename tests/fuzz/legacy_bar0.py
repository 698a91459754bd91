"""Fuzz target 4: the legacy IO BAR0 of a transitional function, and its config space.

Each input is a sequence of operations on one transitional virtio-net (tests/fuzz/rig.py):
BAR0 accesses of any offset and width (every one an admin command to the owner, or the
notify fast path), config-space accesses (the IO decode bit, BAR0, MSI-X enable), writes
into guest RAM (so kicks find rings), frames from the peer, the transmit bottom half,
function resets. Defined errors: GuestError from an access; everything else is a finding,
as is an admin command that fails unexpectedly or an interrupt on a vector that is not.
"""

from __future__ import annotations

from functools import partial

from tests.devices.driver import RAM_BASE
from tests.fuzz.harness import ByteReader
from tests.fuzz.rig import FuzzRig, RigOperations, encode_access, region_access
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import virtio_ring as ring
from vfuserver.protocol.virtio import DeviceStatus
from vfuserver.protocol.virtio_legacy import Register


class LegacyBar0Target(RigOperations):
    """Operation codes (first byte of each operation, modulo 8); RAM, RECEIVE, TRANSMIT
    and RESET are :meth:`FuzzRig.guest_step`'s."""

    RAM, RECEIVE, TRANSMIT, RESET, BAR0, CONFIG, IO_ON, BAR0_AGAIN = range(8)

    def step(self, reader: ByteReader) -> None:
        rig = self.rig.rig
        op = reader.u8() % 8
        if op in (self.BAR0, self.BAR0_AGAIN):
            region_access(reader, rig.bar0, rig.fn.bar0_size)
        elif op == self.CONFIG:
            region_access(reader, rig.config, rig.fn.config.size)
        elif op == self.IO_ON:
            rig.enable_io()
        else:
            self.rig.guest_step(op, reader)

    # -- seeds ------------------------------------------------------------------------

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        """What a Linux legacy virtio-pci driver does, and a few edges."""
        bar0, config = partial(encode_access, cls.BAR0), partial(encode_access, cls.CONFIG)

        io_on = config(pcifmt.Offset.COMMAND, 2, pcifmt.Command.IO | pcifmt.Command.MASTER)
        ack = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
        probe = (io_on + bar0(Register.STATUS, 1, 0) + bar0(Register.STATUS, 1, 1)
                 + bar0(Register.STATUS, 1, ack) + bar0(Register.HOST_FEATURES, 4)
                 + bar0(Register.GUEST_FEATURES, 4, 0x20))
        queues = b""
        for index in range(3):
            pfn = (RAM_BASE >> 12) + 4 * index
            queues += (bar0(Register.QUEUE_SEL, 2, index) + bar0(Register.QUEUE_NUM, 2)
                       + bar0(Register.QUEUE_PFN, 4, pfn))
        ok = bar0(Register.STATUS, 1, ack | DeviceStatus.DRIVER_OK)
        # one transmit chain on queue 1: descriptor 0 -> 64 bytes at RAM + 0xF000
        tx_ring = 4 * 4096
        desc = (RAM_BASE + 0xF000).to_bytes(8, "little") + (64).to_bytes(4, "little") + bytes(4)
        avail_at = ring.contiguous_layout(RAM_BASE + tx_ring, 256).avail - RAM_BASE
        ram_desc = bytes([cls.RAM]) + tx_ring.to_bytes(2, "little") + bytes([len(desc)]) + desc
        ram_avail = (bytes([cls.RAM]) + avail_at.to_bytes(2, "little") + b"\x06"
                     + bytes([0, 0, 1, 0, 0, 0]))
        kick = bar0(Register.QUEUE_NOTIFY, 2, 1)
        msix_on = config(rig_msix_control(), 2, 0x8000)
        return {
            "probe": probe,
            "bring-up": probe + queues + ok,
            "transmit": probe + queues + ok + ram_desc + ram_avail + kick,
            "receive": probe + queues + ok + bytes([cls.RECEIVE, 20]) + bytes(20),
            "msix-device-config": io_on + msix_on + bar0(20, 2, 0) + bar0(24, 4) + bar0(30, 2),
            "io-off": bar0(Register.STATUS, 1, 1),
            "wide": io_on + bar0(0, 32) + bar0(3, 8, 0x1122334455667788),
            "reset": probe + queues + bytes([cls.RESET, 2]) + bar0(Register.STATUS, 1),
        }


def rig_msix_control() -> int:
    """Config-space offset of the MSI-X message control register of the rig's function."""
    control: int = FuzzRig().rig.modern.msix_cap + 2
    return control
