"""Virtio network device formats (virtio 1.x §5.1, device-types/net/description.tex;
Linux uapi virtio_net.h).

Feature bits, the device configuration layout, the per-packet header in its legacy
10-byte and modern 12-byte forms, and the control virtqueue commands. Legacy guests use
guest-native endianness, i.e. little-endian on every guest this project serves, so one set
of little-endian definitions covers both.

The hot path (one header per packet) uses the precomputed :class:`struct.Struct` objects;
tests check them against the construct definitions.
"""

from __future__ import annotations

import enum
import struct

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct, this

from vfuserver.protocol.virtio import FeatureBit

ETH_ALEN = 6
ETH_HLEN = 14
"""Ethernet header: destination, source, ethertype."""
VLAN_HLEN = 4
"""An 802.1Q tag in front of the ethertype."""
ETH_P_8021Q = 0x8100
MAX_VLAN = 4096
"""VLAN ids are 12 bits; the VLAN filter has one bit per id."""
BROADCAST_MAC = b"\xff" * ETH_ALEN

MTU_MIN = 68
MTU_MAX = 65535
"""The device MUST set ``mtu`` between 68 and 65535 if it offers VIRTIO_NET_F_MTU."""
MAX_GSO_FRAME = 65589
"""Largest incoming frame with guest TSO/UFO: 14 (Ethernet) + 40 (IPv6) + 65535 (payload),
from "Setting Up Receive Buffers"."""


class NetFeature(FeatureBit):
    """Network device feature bit numbers (VIRTIO_NET_F_*)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GSO = 6
    """Legacy only: "any GSO type", superseded by the per-type bits."""
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    DEVICE_STATS = 50
    HASH_TUNNEL = 51
    VQ_NOTF_COAL = 52
    NOTF_COAL = 53
    GUEST_USO4 = 54
    GUEST_USO6 = 55
    HOST_USO = 56
    HASH_REPORT = 57
    GUEST_HDRLEN = 59
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63


FEATURE_REQUIRES: dict[NetFeature, tuple[NetFeature, ...]] = {
    NetFeature.GUEST_TSO4: (NetFeature.GUEST_CSUM,),
    NetFeature.GUEST_TSO6: (NetFeature.GUEST_CSUM,),
    NetFeature.GUEST_ECN: (NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6),
    NetFeature.GUEST_UFO: (NetFeature.GUEST_CSUM,),
    NetFeature.GUEST_USO4: (NetFeature.GUEST_CSUM,),
    NetFeature.GUEST_USO6: (NetFeature.GUEST_CSUM,),
    NetFeature.HOST_TSO4: (NetFeature.CSUM,),
    NetFeature.HOST_TSO6: (NetFeature.CSUM,),
    NetFeature.HOST_ECN: (NetFeature.HOST_TSO4, NetFeature.HOST_TSO6),
    NetFeature.HOST_UFO: (NetFeature.CSUM,),
    NetFeature.HOST_USO: (NetFeature.CSUM,),
    NetFeature.CTRL_RX: (NetFeature.CTRL_VQ,),
    NetFeature.CTRL_VLAN: (NetFeature.CTRL_VQ,),
    NetFeature.GUEST_ANNOUNCE: (NetFeature.CTRL_VQ,),
    NetFeature.MQ: (NetFeature.CTRL_VQ,),
    NetFeature.CTRL_MAC_ADDR: (NetFeature.CTRL_VQ,),
    NetFeature.NOTF_COAL: (NetFeature.CTRL_VQ,),
    NetFeature.RSS: (NetFeature.CTRL_VQ,),
    NetFeature.VQ_NOTF_COAL: (NetFeature.CTRL_VQ,),
    NetFeature.RSC_EXT: (NetFeature.HOST_TSO4, NetFeature.HOST_TSO6),
}
"""§5.1.3.1 "Feature bit requirements": a feature needs at least one of these."""


def missing_requirements(features: int) -> list[tuple[NetFeature, tuple[NetFeature, ...]]]:
    """The features in ``features`` whose requirement (any one of a tuple) is absent."""
    return [
        (feature, needs)
        for feature, needs in FEATURE_REQUIRES.items()
        if features & feature.mask and not any(features & need.mask for need in needs)
    ]


GUEST_OFFLOAD_FEATURES = (
    NetFeature.GUEST_CSUM.mask
    | NetFeature.GUEST_TSO4.mask
    | NetFeature.GUEST_TSO6.mask
    | NetFeature.GUEST_ECN.mask
    | NetFeature.GUEST_UFO.mask
    | NetFeature.GUEST_USO4.mask
    | NetFeature.GUEST_USO6.mask
)
"""Features VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may switch on and off (§5.1.6.5.6.1)."""


# --------------------------------------------------------------------------------------
# Device configuration (§5.1.4)


class NetStatus(enum.IntFlag):
    """virtio_net_config.status bits (VIRTIO_NET_S_*)."""

    LINK_UP = 1
    ANNOUNCE = 2


SPEED_UNKNOWN = 0xFFFF_FFFF
DUPLEX_HALF = 0x00
DUPLEX_FULL = 0x01
DUPLEX_UNKNOWN = 0xFF


class ConfigOffset(enum.IntEnum):
    """Byte offsets in struct virtio_net_config."""

    MAC = 0
    STATUS = 6
    MAX_VIRTQUEUE_PAIRS = 8
    MTU = 10
    SPEED = 12
    DUPLEX = 16
    RSS_MAX_KEY_SIZE = 17
    RSS_MAX_INDIRECTION_TABLE_LENGTH = 18
    SUPPORTED_HASH_TYPES = 20
    SUPPORTED_TUNNEL_TYPES = 24


NetConfig = Struct(
    "mac" / Bytes(ETH_ALEN) * "valid if VIRTIO_NET_F_MAC; driver-writable in legacy mode",
    "status" / Int16ul * "NetStatus bits; exists if VIRTIO_NET_F_STATUS",
    "max_virtqueue_pairs" / Int16ul * "exists if VIRTIO_NET_F_MQ or VIRTIO_NET_F_RSS",
    "mtu" / Int16ul * "exists if VIRTIO_NET_F_MTU",
    "speed" / Int32ul * "Mbit/s or SPEED_UNKNOWN; exists if VIRTIO_NET_F_SPEED_DUPLEX",
    "duplex" / Int8ul * "DUPLEX_*; exists if VIRTIO_NET_F_SPEED_DUPLEX",
    "rss_max_key_size" / Int8ul * "exists if VIRTIO_NET_F_RSS or VIRTIO_NET_F_HASH_REPORT",
    "rss_max_indirection_table_length" / Int16ul * "exists if VIRTIO_NET_F_RSS",
    "supported_hash_types" / Int32ul * "exists if VIRTIO_NET_F_RSS or HASH_REPORT",
    "supported_tunnel_types" / Int32ul * "exists if VIRTIO_NET_F_HASH_TUNNEL",
)
"""struct virtio_net_config, every field (28 bytes)."""

CONFIG_SIZE = 28
CONFIG_SIZE_MTU = ConfigOffset.MTU + 2
"""offsetofend(struct virtio_net_config, mtu): enough for mac, status, pairs and mtu."""
CONFIG_SIZE_LEGACY = ConfigOffset.STATUS + 2
"""offsetofend(struct virtio_net_config, status): what a legacy driver reads."""

CONFIG_HEAD_STRUCT = struct.Struct("<6sHHH")
"""mac, status, max_virtqueue_pairs, mtu: the first CONFIG_SIZE_MTU bytes."""


# --------------------------------------------------------------------------------------
# Packet header (§5.1.6)


class HdrFlag(enum.IntFlag):
    """virtio_net_hdr.flags (VIRTIO_NET_HDR_F_*)."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(enum.IntEnum):
    """virtio_net_hdr.gso_type without the ECN bit (VIRTIO_NET_HDR_GSO_*)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


GSO_ECN = 0x80
"""VIRTIO_NET_HDR_GSO_ECN, or-ed into gso_type."""

HDR_LEN_LEGACY = 10
"""struct virtio_net_hdr: legacy drivers without VIRTIO_NET_F_MRG_RXBUF."""
HDR_LEN = 12
"""struct virtio_net_hdr_v1 / virtio_net_hdr_mrg_rxbuf: modern, or legacy with MRG_RXBUF."""
NUM_BUFFERS_OFFSET = 10


def header_length(*, version_1: bool, mrg_rxbuf: bool) -> int:
    """Size of the per-packet header for the negotiated features (§5.1.6 legacy note)."""
    return HDR_LEN if version_1 or mrg_rxbuf else HDR_LEN_LEGACY


NetHdrLegacy = Struct(
    "flags" / Int8ul * "HdrFlag bits",
    "gso_type" / Int8ul * "GsoType, possibly or-ed with GSO_ECN",
    "hdr_len" / Int16ul * "length of the headers to replicate for each segment (a hint)",
    "gso_size" / Int16ul * "MSS of each segment",
    "csum_start" / Int16ul * "where checksumming starts (NEEDS_CSUM)",
    "csum_offset" / Int16ul * "where, after csum_start, the checksum is stored (NEEDS_CSUM)",
)
"""struct virtio_net_hdr (10 bytes)."""

NetHdr = Struct(
    "flags" / Int8ul * "HdrFlag bits",
    "gso_type" / Int8ul * "GsoType, possibly or-ed with GSO_ECN",
    "hdr_len" / Int16ul * "length of the headers to replicate for each segment (a hint)",
    "gso_size" / Int16ul * "MSS of each segment",
    "csum_start" / Int16ul * "where checksumming starts (NEEDS_CSUM)",
    "csum_offset" / Int16ul * "where, after csum_start, the checksum is stored (NEEDS_CSUM)",
    "num_buffers" / Int16ul * "rx: buffers the packet spans (1 without MRG_RXBUF); tx: 0",
)
"""struct virtio_net_hdr_v1 (12 bytes): modern, and legacy with VIRTIO_NET_F_MRG_RXBUF."""

HDR_LEGACY_STRUCT = struct.Struct("<BBHHHH")
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""
HDR_STRUCT = struct.Struct("<BBHHHHH")
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers."""
NUM_BUFFERS_STRUCT = struct.Struct("<H")


# --------------------------------------------------------------------------------------
# Control virtqueue (§5.1.6.5)


class CtrlClass(enum.IntEnum):
    """virtio_net_ctrl_hdr.class (VIRTIO_NET_CTRL_*)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5
    NOTF_COAL = 6
    STATS = 8


class CtrlAck(enum.IntEnum):
    """virtio_net_ctrl_ack (VIRTIO_NET_OK / VIRTIO_NET_ERR)."""

    OK = 0
    ERR = 1


class CtrlRx(enum.IntEnum):
    """VIRTIO_NET_CTRL_RX_* commands; 2..5 need VIRTIO_NET_F_CTRL_RX_EXTRA."""

    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class CtrlMac(enum.IntEnum):
    """VIRTIO_NET_CTRL_MAC_* commands."""

    TABLE_SET = 0
    ADDR_SET = 1


class CtrlVlan(enum.IntEnum):
    """VIRTIO_NET_CTRL_VLAN_* commands."""

    ADD = 0
    DEL = 1


class CtrlAnnounce(enum.IntEnum):
    """VIRTIO_NET_CTRL_ANNOUNCE_* commands."""

    ACK = 0


class CtrlMq(enum.IntEnum):
    """VIRTIO_NET_CTRL_MQ_* commands."""

    VQ_PAIRS_SET = 0
    RSS_CONFIG = 1
    HASH_CONFIG = 2


VQ_PAIRS_MIN = 1
VQ_PAIRS_MAX = 0x8000


class CtrlGuestOffloads(enum.IntEnum):
    """VIRTIO_NET_CTRL_GUEST_OFFLOADS_* commands."""

    SET = 0


CTRL_HDR_SIZE = 2
CTRL_ACK_SIZE = 1

CtrlHdr = Struct(
    "ctrl_class" / Int8ul * "CtrlClass (the C field is named 'class')",
    "command" / Int8ul * "command within the class",
)
"""struct virtio_net_ctrl_hdr; the command data follows, the 1-byte ack is device-written."""

CtrlRxOnOff = Struct("on" / Int8ul * "0 = off, anything else = on")
"""Data of every VIRTIO_NET_CTRL_RX command."""

MacTable = Struct(
    "entries" / Int32ul * "number of MAC addresses that follow",
    "macs" / Array(this.entries, Bytes(ETH_ALEN)),
)
"""struct virtio_net_ctrl_mac."""

CtrlMacTableSet = Struct(
    "unicast" / MacTable,
    "multicast" / MacTable,
)
"""Data of VIRTIO_NET_CTRL_MAC_TABLE_SET: the unicast table, then the multicast table."""

CtrlMacAddr = Struct("mac" / Bytes(ETH_ALEN))
"""Data of VIRTIO_NET_CTRL_MAC_ADDR_SET."""

CtrlVlanId = Struct("vid" / Int16ul * "VLAN id, < MAX_VLAN")
"""Data of VIRTIO_NET_CTRL_VLAN_ADD / _DEL."""

CtrlMqPairs = Struct("virtqueue_pairs" / Int16ul * "VQ_PAIRS_MIN..max_virtqueue_pairs")
"""Data of VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (struct virtio_net_ctrl_mq)."""

CtrlGuestOffloadsSet = Struct("offloads" / Int64ul * "GUEST_OFFLOAD_FEATURES bits to enable")
"""Data of VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET."""

MAC_TABLE_ENTRIES_STRUCT = struct.Struct("<I")
VLAN_ID_STRUCT = struct.Struct("<H")
OFFLOADS_STRUCT = struct.Struct("<Q")


def parse_mac_table_set(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """Unicast and multicast address lists of a TABLE_SET command, or None if malformed.

    Hand-rolled rather than :data:`CtrlMacTableSet` so that a huge guest-supplied entry
    count is rejected by one comparison instead of a parse loop.
    """
    tables: list[list[bytes]] = []
    pos = 0
    for _ in range(2):
        if len(data) - pos < MAC_TABLE_ENTRIES_STRUCT.size:
            return None
        (entries,) = MAC_TABLE_ENTRIES_STRUCT.unpack_from(data, pos)
        pos += MAC_TABLE_ENTRIES_STRUCT.size
        end = pos + entries * ETH_ALEN
        if end > len(data):
            return None
        tables.append([data[i : i + ETH_ALEN] for i in range(pos, end, ETH_ALEN)])
        pos = end
    return tables[0], tables[1]


# --------------------------------------------------------------------------------------
# Partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM)


_NATIVE_LITTLE = struct.pack("=H", 1) == b"\x01\x00"


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> bool:
    """Do what a device (or driver) does for NEEDS_CSUM: store the ones' complement of the
    ones' complement sum of ``frame[csum_start:]`` at ``csum_start + csum_offset``.

    The field already holds the pseudo-header sum, so this completes the checksum (§5.1.6.2).
    Returns False, leaving ``frame`` alone, if the offsets do not fit the frame.
    The sum is taken over native-endian 16-bit words and stored native-endian: RFC 1071's
    byte-order independence makes that equal to the big-endian computation.
    """
    where = csum_start + csum_offset
    if csum_start >= len(frame) or where + 2 > len(frame):
        return False
    data = memoryview(frame)[csum_start:]
    even = len(data) & ~1
    total = sum(data[:even].cast("H"))
    if even != len(data):
        # an odd tail byte counts as if followed by a zero byte
        total += data[-1] if _NATIVE_LITTLE else data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("=H", frame, where, ~total & 0xFFFF)
    return True


def vlan_id(frame: bytes | bytearray | memoryview) -> int | None:
    """The 802.1Q VLAN id of an Ethernet frame, or None if it carries no tag."""
    view = memoryview(frame)
    if len(view) < ETH_HLEN + VLAN_HLEN or bytes(view[12:14]) != b"\x81\x00":
        return None
    return int.from_bytes(view[14:16], "big") & 0xFFF
