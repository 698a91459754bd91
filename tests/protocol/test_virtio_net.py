"""virtio-net formats: one round-trip table, sizes against the spec, hot-path structs."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from construct import Container, ListContainer, SizeofError
from hypothesis import given
from hypothesis import strategies as st

from vfuserver.protocol import virtio_net as net
from vfuserver.protocol.virtio_net import (
    CtrlGuestOffloadsSet,
    CtrlHdr,
    CtrlMacAddr,
    CtrlMacTableSet,
    CtrlMqPairs,
    CtrlRxOnOff,
    CtrlVlanId,
    NetConfig,
    NetFeature,
    NetHdr,
    NetHdrLegacy,
)

MAC = bytes.fromhex("525400123456")
MCAST = bytes.fromhex("01005e000001")

ROUND_TRIP = [
    pytest.param(
        NetConfig,
        MAC + bytes.fromhex("0100" "0100" "dc05" "10270000" "01" "28" "8000" "3f000000" "00000000"),
        Container(mac=MAC, status=1, max_virtqueue_pairs=1, mtu=1500, speed=10000, duplex=1,
                  rss_max_key_size=40, rss_max_indirection_table_length=128,
                  supported_hash_types=0x3F, supported_tunnel_types=0),
        id="config",
    ),
    pytest.param(
        NetHdrLegacy,
        bytes.fromhex("01" "01" "3600" "a805" "2200" "1000"),
        Container(flags=net.HdrFlag.NEEDS_CSUM, gso_type=net.GsoType.TCPV4, hdr_len=54,
                  gso_size=1448, csum_start=34, csum_offset=16),
        id="hdr-legacy-tso4",
    ),
    pytest.param(
        NetHdr,
        bytes.fromhex("00" "00" "0000" "0000" "0000" "0000" "0300"),
        Container(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0,
                  num_buffers=3),
        id="hdr-v1-mergeable",
    ),
    pytest.param(
        NetHdr,
        bytes.fromhex("01" "84" "4a00" "a005" "3600" "1000" "0000"),
        Container(flags=1, gso_type=net.GsoType.TCPV6 | net.GSO_ECN, hdr_len=74,
                  gso_size=1440, csum_start=54, csum_offset=16, num_buffers=0),
        id="hdr-v1-tso6-ecn",
    ),
    pytest.param(CtrlHdr, bytes.fromhex("0001"),
                 Container(ctrl_class=net.CtrlClass.RX, command=net.CtrlRx.ALLMULTI),
                 id="ctrl-hdr-rx-allmulti"),
    pytest.param(CtrlRxOnOff, b"\x01", Container(on=1), id="ctrl-rx-on"),
    pytest.param(
        CtrlMacTableSet,
        bytes.fromhex("01000000") + MAC + bytes.fromhex("02000000") + MCAST + net.BROADCAST_MAC,
        Container(unicast=Container(entries=1, macs=ListContainer([MAC])),
                  multicast=Container(entries=2, macs=ListContainer([MCAST, net.BROADCAST_MAC]))),
        id="ctrl-mac-table",
    ),
    pytest.param(
        CtrlMacTableSet,
        bytes(8),
        Container(unicast=Container(entries=0, macs=ListContainer()),
                  multicast=Container(entries=0, macs=ListContainer())),
        id="ctrl-mac-table-empty",
    ),
    pytest.param(CtrlMacAddr, MAC, Container(mac=MAC), id="ctrl-mac-addr"),
    pytest.param(CtrlVlanId, bytes.fromhex("e803"), Container(vid=1000), id="ctrl-vlan"),
    pytest.param(CtrlMqPairs, bytes.fromhex("0400"), Container(virtqueue_pairs=4), id="ctrl-mq"),
    pytest.param(
        CtrlGuestOffloadsSet,
        bytes.fromhex("8201000000000000"),
        Container(offloads=NetFeature.GUEST_CSUM.mask | NetFeature.GUEST_TSO4.mask
                  | NetFeature.GUEST_TSO6.mask),
        id="ctrl-guest-offloads",
    ),
]


@pytest.mark.parametrize(("fmt", "raw", "obj"), ROUND_TRIP)
def test_round_trip(fmt: Any, raw: bytes, obj: Any) -> None:
    assert fmt.parse(raw) == obj
    assert fmt.build(obj) == raw
    try:
        size = fmt.sizeof()
    except SizeofError:  # variable-size formats (the MAC table) have no static size
        size = len(raw)
    assert size == len(raw)


def test_sizes_match_spec() -> None:
    assert NetHdrLegacy.sizeof() == net.HDR_LEN_LEGACY == net.HDR_LEGACY_STRUCT.size == 10
    assert NetHdr.sizeof() == net.HDR_LEN == net.HDR_STRUCT.size == 12
    assert NetConfig.sizeof() == net.CONFIG_SIZE
    assert CtrlHdr.sizeof() == net.CTRL_HDR_SIZE == 2
    assert net.CONFIG_HEAD_STRUCT.size == net.CONFIG_SIZE_MTU == 12
    # the legacy Linux variant driver exposes offsetofend(virtio_net_config, status) = 8
    assert net.CONFIG_SIZE_LEGACY == 8


def test_config_offsets() -> None:
    raw = NetConfig.build(
        dict(mac=bytes(range(6)), status=0x0102, max_virtqueue_pairs=0x0304, mtu=0x0506,
             speed=0x0708090A, duplex=0x0B, rss_max_key_size=0x0C,
             rss_max_indirection_table_length=0x0D0E, supported_hash_types=0x0F101112,
             supported_tunnel_types=0x13141516)
    )
    off = net.ConfigOffset
    assert raw[off.MAC : off.MAC + 6] == bytes(range(6))
    assert raw[off.STATUS : off.STATUS + 2] == bytes.fromhex("0201")
    assert raw[off.MAX_VIRTQUEUE_PAIRS : off.MAX_VIRTQUEUE_PAIRS + 2] == bytes.fromhex("0403")
    assert raw[off.MTU : off.MTU + 2] == bytes.fromhex("0605")
    assert raw[off.SPEED : off.SPEED + 4] == bytes.fromhex("0a090807")
    assert raw[off.DUPLEX] == 0x0B
    assert raw[off.RSS_MAX_KEY_SIZE] == 0x0C
    assert raw[off.SUPPORTED_HASH_TYPES : off.SUPPORTED_HASH_TYPES + 4] == bytes.fromhex(
        "1211100f"
    )
    assert raw[off.SUPPORTED_TUNNEL_TYPES :] == bytes.fromhex("16151413")


@given(mac=st.binary(min_size=6, max_size=6), status=st.integers(0, 0xFFFF),
       pairs=st.integers(0, 0xFFFF), mtu=st.integers(0, 0xFFFF))
def test_config_head_struct_matches_construct(mac: bytes, status: int, pairs: int,
                                              mtu: int) -> None:
    raw = NetConfig.build(dict(mac=mac, status=status, max_virtqueue_pairs=pairs, mtu=mtu,
                               speed=0, duplex=0, rss_max_key_size=0,
                               rss_max_indirection_table_length=0, supported_hash_types=0,
                               supported_tunnel_types=0))
    assert net.CONFIG_HEAD_STRUCT.pack(mac, status, pairs, mtu) == raw[: net.CONFIG_SIZE_MTU]


@given(fields=st.tuples(st.integers(0, 255), st.integers(0, 255),
                        *[st.integers(0, 0xFFFF)] * 5))
def test_header_structs_match_construct(fields: tuple[int, ...]) -> None:
    names = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset",
             "num_buffers")
    raw = NetHdr.build(dict(zip(names, fields, strict=True)))
    assert net.HDR_STRUCT.pack(*fields) == raw
    assert net.HDR_LEGACY_STRUCT.pack(*fields[:6]) == raw[: net.HDR_LEN_LEGACY]
    assert net.NUM_BUFFERS_STRUCT.unpack_from(raw, net.NUM_BUFFERS_OFFSET) == (fields[6],)


@pytest.mark.parametrize(
    ("version_1", "mrg_rxbuf", "length"),
    [(False, False, 10), (False, True, 12), (True, False, 12), (True, True, 12)],
)
def test_header_length(version_1: bool, mrg_rxbuf: bool, length: int) -> None:
    assert net.header_length(version_1=version_1, mrg_rxbuf=mrg_rxbuf) == length


@pytest.mark.parametrize(
    ("feature", "bit"),
    [
        ("CSUM", 0), ("GUEST_CSUM", 1), ("CTRL_GUEST_OFFLOADS", 2), ("MTU", 3), ("MAC", 5),
        ("GUEST_TSO4", 7), ("GUEST_TSO6", 8), ("GUEST_ECN", 9), ("GUEST_UFO", 10),
        ("HOST_TSO4", 11), ("HOST_TSO6", 12), ("HOST_ECN", 13), ("HOST_UFO", 14),
        ("MRG_RXBUF", 15), ("STATUS", 16), ("CTRL_VQ", 17), ("CTRL_RX", 18),
        ("CTRL_VLAN", 19), ("CTRL_RX_EXTRA", 20), ("GUEST_ANNOUNCE", 21), ("MQ", 22),
        ("CTRL_MAC_ADDR", 23), ("SPEED_DUPLEX", 63),
    ],
)
def test_feature_bits_match_spec(feature: str, bit: int) -> None:
    assert NetFeature[feature] == bit
    assert NetFeature[feature].mask == 1 << bit


@pytest.mark.parametrize(
    ("features", "missing"),
    [
        pytest.param(NetFeature.GUEST_CSUM.mask | NetFeature.GUEST_TSO4.mask, [], id="ok"),
        pytest.param(NetFeature.GUEST_TSO4.mask, [NetFeature.GUEST_TSO4], id="tso-no-csum"),
        pytest.param(NetFeature.GUEST_CSUM.mask | NetFeature.GUEST_ECN.mask,
                     [NetFeature.GUEST_ECN], id="ecn-no-tso"),
        pytest.param(NetFeature.CTRL_RX.mask | NetFeature.CTRL_VLAN.mask,
                     [NetFeature.CTRL_RX, NetFeature.CTRL_VLAN], id="ctrl-no-vq"),
        pytest.param(NetFeature.CTRL_VQ.mask | NetFeature.CTRL_RX.mask, [], id="ctrl-ok"),
    ],
)
def test_missing_requirements(features: int, missing: list[NetFeature]) -> None:
    assert [f for f, _ in net.missing_requirements(features)] == missing


def test_parse_mac_table_set_agrees_with_construct() -> None:
    raw = bytes.fromhex("02000000") + MAC + MAC[::-1] + bytes.fromhex("01000000") + MCAST
    parsed = CtrlMacTableSet.parse(raw)
    assert net.parse_mac_table_set(raw) == (parsed.unicast.macs, parsed.multicast.macs)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes.fromhex("01000000") + MAC, id="no-multicast-table"),
        pytest.param(bytes.fromhex("ffffffff") + MAC, id="huge-count"),
        pytest.param(bytes.fromhex("02000000") + MAC + bytes(4), id="short-entry"),
    ],
)
def test_parse_mac_table_set_rejects_malformed(raw: bytes) -> None:
    assert net.parse_mac_table_set(raw) is None


def test_vlan_id() -> None:
    untagged = MAC + MAC + b"\x08\x00" + bytes(46)
    tagged = MAC + MAC + b"\x81\x00" + (0x2000 | 100).to_bytes(2, "big") + b"\x08\x00"
    assert net.vlan_id(untagged) is None
    assert net.vlan_id(tagged + bytes(46)) == 100
    assert net.vlan_id(tagged[:16]) is None


# -- partial checksums: checked with the receiver's rule, not with our own sum ---------------


def _ones_sum_be(data: bytes) -> int:
    """RFC 1071 reference: big-endian 16-bit words, odd byte padded, carries folded."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _ipv4_l4_packet(proto: int, l4: bytes, csum_field: int) -> tuple[bytearray, bytes, int]:
    """Ethernet + IPv4 + L4 with the pseudo-header sum in the checksum field, as a guest
    with NEEDS_CSUM hands it over; returns (frame, pseudo header, csum_offset)."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    pseudo = src + dst + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    ip = bytes.fromhex("4500") + (20 + len(l4)).to_bytes(2, "big") + bytes(4) + bytes(
        [64, proto]) + bytes(2) + src + dst
    frame = bytearray(MAC + MAC + b"\x08\x00" + ip + l4)
    start = 14 + 20
    frame[start + csum_field : start + csum_field + 2] = _ones_sum_be(pseudo).to_bytes(2, "big")
    return frame, pseudo, csum_field


@pytest.mark.parametrize(
    ("proto", "l4", "csum_field"),
    [
        pytest.param(17, bytes.fromhex("04d2162e0015" "0000") + b"hello virtio!", 6,
                     id="udp-odd-length"),
        pytest.param(6, bytes.fromhex("04d2162e" "00000001" "00000000" "5018ffff" "0000" "0000")
                     + b"payload!", 16, id="tcp-even-length"),
    ],
)
def test_complete_checksum_verifies_at_receiver(proto: int, l4: bytes, csum_field: int) -> None:
    frame, pseudo, csum_offset = _ipv4_l4_packet(proto, l4, csum_field)
    assert net.complete_checksum(frame, 34, csum_offset)
    segment = bytes(frame[34:])
    # RFC 768/793 receiver check: the sum over pseudo header + segment is all ones
    assert _ones_sum_be(pseudo + segment) == 0xFFFF


def test_complete_checksum_refuses_offsets_outside_frame() -> None:
    frame = bytearray(40)
    assert not net.complete_checksum(frame, 40, 0)
    assert not net.complete_checksum(frame, 30, 9)
    assert frame == bytearray(40)
