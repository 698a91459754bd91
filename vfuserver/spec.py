"""What the operator asks for, as data: the device definition and the values in it.

Pure (no trio, no C extension) so that a config file or a command line is parsed and
checked without loading the server: :mod:`vfuserver.config` turns the errors here into
:class:`~vfuserver.config.ConfigError`, the CLI into argparse's usage errors.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from vfuserver.netdev.options import NetdevSpec, NoneSpec

PROFILES = ("modern", "transitional")
"""How a device presents itself: as it is, or also with the legacy (transitional)
interface; see ``vfuserver run --help``."""
VIRTIO_NET = "virtio-net"
VIRTIO_BLK = "virtio-blk"
DEVICE_TYPES = (VIRTIO_NET, VIRTIO_BLK)
"""The device types, named as QEMU names its virtio devices (without ``-pci``)."""
SERIAL_BYTES = 20
"""A virtio-blk serial fits VIRTIO_BLK_ID_BYTES."""
MAX_QUEUES = 64
"""Request queues of one virtio-blk device (Linux uses at most one per vCPU)."""

ETH_ALEN = 6
QEMU_MAC_PREFIX = bytes.fromhex("525400")
"""QEMU's locally administered prefix (net/net.c qemu_macaddr_default_if_unset())."""
_HEX_BYTE = re.compile(r"[0-9A-Fa-f]{1,2}")


class SpecError(ValueError):
    """A value of a device definition that cannot be used; the message says why."""


class MacAddressError(SpecError):
    """Not a unicast MAC address written as six colon-separated hex bytes."""


class ProfileError(SpecError):
    """Not one of :data:`PROFILES`."""


class DeviceTypeError(SpecError):
    """Not one of :data:`DEVICE_TYPES`, or a setting the type does not take."""


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; a unicast address is required.

    Raises :class:`MacAddressError`.
    """
    parts = text.split(":")
    if len(parts) != ETH_ALEN or not all(_HEX_BYTE.fullmatch(part) for part in parts):
        raise MacAddressError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    return check_mac(bytes(int(part, 16) for part in parts))


def check_mac(mac: bytes) -> bytes:
    """``mac`` if it is 6 bytes of a unicast address, else :class:`MacAddressError`.

    The I/G bit (bit 0 of the first byte, IEEE 802) marks a group address, which a
    device cannot own.
    """
    if len(mac) != ETH_ALEN:
        raise MacAddressError(f"a MAC address is {ETH_ALEN} bytes, not {len(mac)}")
    if mac[0] & 1:
        raise MacAddressError(f"{format_mac(mac)} is a multicast address; a device needs "
                              "unicast")
    return mac


def format_mac(mac: bytes) -> str:
    """6 bytes -> '52:54:00:12:34:56' (lower-case, as ``ip link`` shows it)."""
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(key: str) -> bytes:
    """52:54:00 (QEMU's locally administered prefix) + 3 bytes of sha256(key).

    ``key`` is the device name (a ``[[device]]`` table, ``run --name``), or for ``run
    --socket`` without ``--name`` the socket's absolute path. Stable across restarts and
    distinct per key (with high probability), so devices defined without a MAC do not
    all share one address on a bridge.
    """
    return QEMU_MAC_PREFIX + hashlib.sha256(key.encode()).digest()[:3]


def check_profile(profile: str) -> str:
    """``profile`` if it is one of :data:`PROFILES`, else :class:`ProfileError`."""
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


def check_device_type(device_type: str) -> str:
    """``device_type`` if it is one of :data:`DEVICE_TYPES`, else :class:`DeviceTypeError`."""
    if device_type not in DEVICE_TYPES:
        raise DeviceTypeError(f"unknown device type {device_type!r}; choose one of "
                              f"{', '.join(DEVICE_TYPES)}")
    return device_type


def check_serial(serial: str) -> str:
    """A virtio-blk serial: printable ASCII, at most 20 characters (GET_ID's 20 bytes)."""
    if len(serial) > SERIAL_BYTES or not (serial.isascii() and serial.isprintable()):
        raise DeviceTypeError(f"serial {serial!r}: use at most {SERIAL_BYTES} printable "
                              "ASCII characters")
    return serial


def check_queues(queues: int) -> int:
    """A virtio-blk request queue count: 1..MAX_QUEUES (VIRTIO_BLK_F_MQ's num_queues)."""
    if isinstance(queues, bool) or not 1 <= queues <= MAX_QUEUES:
        raise DeviceTypeError(f"{queues!r} request queues: choose 1..{MAX_QUEUES}")
    return queues


def parse_queues(text: str) -> int:
    """``--queues`` as text: a decimal count checked by :func:`check_queues`."""
    if not text.isdecimal():
        raise DeviceTypeError(f"{text!r} is not a number of request queues")
    return check_queues(int(text))


@dataclass
class DeviceSpec:
    """One device: where it listens, how it presents itself, what is behind it.

    ``type`` is :data:`VIRTIO_NET` (the default: ``mac`` and ``netdev``; ``mac`` left
    empty becomes :func:`default_mac` of ``name``) or :data:`VIRTIO_BLK` (``image``, the
    raw disk image, required; ``readonly``, ``direct`` for O_DIRECT, ``serial``, ``queues``
    the request queues). Raises
    :class:`ProfileError`, :class:`MacAddressError` or :class:`DeviceTypeError`.
    """

    name: str
    socket: str
    profile: str = "modern"
    mac: bytes = b""
    netdev: NetdevSpec = field(default_factory=NoneSpec)
    type: str = VIRTIO_NET
    image: str = ""
    readonly: bool = False
    direct: bool = False
    serial: str = ""
    queues: int = 1

    def __post_init__(self) -> None:
        check_profile(self.profile)
        check_device_type(self.type)
        if self.type == VIRTIO_BLK:
            if not self.image:
                raise DeviceTypeError("a virtio-blk device needs a disk image (image, "
                                      "--image PATH)")
            if self.mac or not isinstance(self.netdev, NoneSpec):
                raise DeviceTypeError("mac and netdev are virtio-net settings, not "
                                      "virtio-blk ones")
            check_serial(self.serial)
            check_queues(self.queues)
            return
        if self.image or self.readonly or self.direct or self.serial or self.queues != 1:
            raise DeviceTypeError("image, readonly, direct, serial and queues are virtio-blk "
                                  "settings; add type virtio-blk (--device virtio-blk)")
        self.mac = check_mac(self.mac) if self.mac else default_mac(self.name)
