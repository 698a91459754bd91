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


@dataclass
class DeviceSpec:
    """One device: where it listens, how it presents itself, where its frames go.

    ``mac`` left empty becomes :func:`default_mac` of ``name``. Raises
    :class:`ProfileError` or :class:`MacAddressError`.
    """

    name: str
    socket: str
    profile: str = "modern"
    mac: bytes = b""
    netdev: NetdevSpec = field(default_factory=NoneSpec)

    def __post_init__(self) -> None:
        check_profile(self.profile)
        self.mac = check_mac(self.mac) if self.mac else default_mac(self.name)
