"""What an operator asks for, and the device objects built from it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vfuserver.context import VfuContext

PROFILES = ("modern", "transitional")
DEFAULT_MAC = bytes.fromhex("525400123456")


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; a unicast address is required."""
    parts = text.split(":")
    try:
        if len(parts) != 6:
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a MAC address like 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address; a device needs unicast")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass
class DeviceSpec:
    """One device: where it listens and how it presents itself."""

    name: str
    socket: str
    profile: str = "modern"
    mac: bytes | None = None

    @property
    def mac_text(self) -> str:
        return format_mac(self.mac or DEFAULT_MAC)


def build_context(spec: DeviceSpec) -> VfuContext:
    """The device model, its PCI presentation and the libvfio-user context serving it."""
    from vfuserver.devices.memory import GuestMemory
    from vfuserver.devices.virtio_net import VirtioNet
    from vfuserver.devices.virtio_pci import VirtioPciFunction
    from vfuserver.protocol.pci import ClassCode

    if spec.profile not in PROFILES:
        raise ValueError(f"unknown profile {spec.profile!r}; choose one of {', '.join(PROFILES)}")
    memory = GuestMemory()
    device = VirtioNet(memory, None, None, mac=spec.mac or DEFAULT_MAC)  # type: ignore[arg-type]
    function = VirtioPciFunction(device, name=spec.name, class_code=ClassCode.NETWORK_ETHERNET)
    return VfuContext(spec.socket, function, memory=memory)
