"""A legacy virtio driver's view of a transitional function: BAR0 and config space.

Real objects joined by fake links: a real device model (VirtioNet in :class:`Rig`) with
guest RAM in a bytearray, the real modern function, the real AdminOwner and the
presentation; the rig plays the guest driver through BAR0 and config space exactly as
QEMU forwards its accesses.
"""

from __future__ import annotations

from tests.devices.driver import GuestRam, RecordingPeer
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.legacy_io import TransitionalFunction
from vfuserver.devices.virtio import VirtioDevice
from vfuserver.devices.virtio_net import VirtioNet
from vfuserver.devices.virtio_pci import MSIX_CONTROL_ENABLE, VirtioPciFunction
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol.pci import ClassCode
from vfuserver.protocol.virtio import DeviceStatus
from vfuserver.protocol.virtio_legacy import Register

MAC = bytes.fromhex("525400abcdef")


class LegacyRig:
    """The transitional presentation of ``device`` (whose memory is ``ram``)."""

    def __init__(self, ram: GuestRam, device: VirtioDevice, owner: AdminOwner | None = None,
                 *, class_code: int | None = None) -> None:
        self.ram = ram
        self.modern = VirtioPciFunction(device, name="t", class_code=class_code)
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

    def legacy_driver_start(self) -> int:
        """What Linux's legacy virtio_pci probe does up to the features."""
        self.enable_io()
        self.write(Register.STATUS, 0, 1)
        self.write(Register.STATUS, DeviceStatus.ACKNOWLEDGE, 1)
        self.write(Register.STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER, 1)
        return self.read(Register.HOST_FEATURES, 4)


class Rig(LegacyRig):
    """A transitional virtio-net."""

    def __init__(self, owner: AdminOwner | None = None, ram: GuestRam | None = None) -> None:
        ram = ram or GuestRam()
        self.peer = RecordingPeer()
        self.net = VirtioNet(ram.memory, None, self.peer, mac=MAC)  # type: ignore[arg-type]
        super().__init__(ram, self.net, owner, class_code=ClassCode.NETWORK_ETHERNET)
