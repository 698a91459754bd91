"""Drive a tap backend from inside a test's network namespace; print the outcome as JSON.

Run by tests/server/test_netdev.py as ``ip netns exec NS python -m
tests.server.netdev_tap_probe MODE NETDEV`` from the top of the repository, so the tap
lives (and dies) in that namespace and the test process never changes namespace. Modes:

* ``arp``: send an ARP request for 10.0.2.1 from a made-up MAC with send(), wait for the
  kernel's reply to come back through run()/deliver, print it.
* ``create``: open the backend, report whether ``ip link`` sees the tap while it is open
  and after close().
* ``busy``: open the backend twice; print the second open's error.
* ``open``: open the backend once; print the error, if any.
* ``offloads``: serve a device on the tap (the real ServedDevice), drive its model as a
  driver would (feature negotiation, VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, reset) and after
  each step read the tap's offload features back with ``ethtool -k``.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from tests.devices.driver import DriverQueue, GuestRam, driver_ok, negotiate_modern
from vfuserver.device import ServedNetDevice, open_device
from vfuserver.devices.virtio_net import CTRL_QUEUE, VirtioNet
from vfuserver.netdev.backend import NetOffloads
from vfuserver.netdev.errors import NetdevHostError
from vfuserver.netdev.open import open_netdev
from vfuserver.netdev.options import parse_netdev
from vfuserver.netdev.tap import TapBackend
from vfuserver.protocol.virtio import Feature
from vfuserver.protocol.virtio_net import OFFLOADS_STRUCT, CtrlClass, CtrlGuestOffloads, NetFeature
from vfuserver.spec import DeviceSpec

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"


def arp_request() -> bytes:
    ethernet = b"\xff" * 6 + GUEST_MAC + b"\x08\x06"
    arp = (bytes.fromhex("0001 0800 06 04 0001") + GUEST_MAC + socket.inet_aton(GUEST_IP)
           + bytes(6) + socket.inet_aton(HOST_IP))
    return (ethernet + arp).ljust(60, b"\0")


def is_arp_reply(frame: bytes) -> bool:
    return frame[:6] == GUEST_MAC and frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"


async def arp(netdev: str) -> dict[str, Any]:
    backend = await open_netdev(parse_netdev(netdev))
    header_len = 12 if backend.vnet_hdr else 0
    replies: list[bytes] = []

    def deliver(frame: bytes) -> bool:
        if is_arp_reply(frame[header_len:]):
            replies.append(frame)
        return True  # everything else the kernel sends (IPv6 ND, MLD) is accepted and ignored

    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run, deliver)
            # The header virtio 5.1.6.2 asks of a driver sending a plain frame: all zero.
            while not replies:
                backend.send(bytes(header_len) + arp_request())
                with trio.move_on_after(0.5):
                    while not replies:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    backend.close()
    return {"vnet_hdr": backend.vnet_hdr, "replies": [reply.hex() for reply in replies],
            "stats": dataclasses.asdict(backend.stats)}


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


async def create(netdev: str) -> dict[str, Any]:
    backend = await open_netdev(parse_netdev(netdev))
    if not isinstance(backend, TapBackend):
        raise SystemExit(f"{netdev} is not a tap")
    name = backend.ifname
    while_open = link_exists(name)
    backend.close()
    backend.close()  # idempotent
    return {"ifname": name, "while_open": while_open, "after_close": link_exists(name)}


async def open_twice(netdev: str, times: int) -> dict[str, Any]:
    opened = []
    try:
        for _ in range(times):
            opened.append(await open_netdev(parse_netdev(netdev)))
    except NetdevHostError as exc:
        return {"opened": len(opened), "errno": exc.errno, "message": exc.strerror}
    finally:
        for backend in opened:
            backend.close()
    return {"opened": len(opened)}


TAP_OFFLOAD_FEATURES = ("tx-checksum-ip-generic", "tx-tcp-segmentation",
                        "tx-tcp-ecn-segmentation", "tx-tcp6-segmentation")
"""What the kernel's tun set_offload() turns TUN_F_CSUM, TSO4, TSO_ECN and TSO6 into
(NETIF_F_HW_CSUM, NETIF_F_TSO, NETIF_F_TSO_ECN, NETIF_F_TSO6), as ethtool names them."""


def tap_offloads(ifname: str) -> list[str]:
    """The offload features ``ethtool -k`` shows on for ``ifname``."""
    shown = subprocess.run(["ethtool", "-k", ifname], check=True, capture_output=True,
                           text=True).stdout
    state = dict(line.strip().split(": ", 1) for line in shown.splitlines() if ": " in line)
    return [name for name in TAP_OFFLOAD_FEATURES if state[name].startswith("on")]


def set_guest_offloads(ctrl: DriverQueue, net: VirtioNet, offloads: int) -> int:
    """virtnet_set_guest_offloads(): one control command; the device's ack."""
    ctrl.add([bytes([CtrlClass.GUEST_OFFLOADS, CtrlGuestOffloads.SET]),
              OFFLOADS_STRUCT.pack(offloads)], [1])
    net.notify(CTRL_QUEUE)
    [used] = ctrl.get_used()
    return used.data[0]


async def offloads(netdev: str) -> dict[str, Any]:
    csum, tso4, tso6, ecn = (feature.mask for feature in (
        NetFeature.GUEST_CSUM, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
        NetFeature.GUEST_ECN))
    driver = (Feature.VERSION_1.mask | NetFeature.CTRL_VQ.mask
              | NetFeature.CTRL_GUEST_OFFLOADS.mask)
    steps: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        device = await open_device(DeviceSpec(name="net0", socket=str(Path(directory) / "s"),
                                              netdev=parse_netdev(netdev)))
        try:
            if not isinstance(device, ServedNetDevice) or not isinstance(device.backend,
                                                                         TapBackend):
                raise SystemExit(f"{netdev} is not a tap")
            ifname, net = device.backend.ifname, device.net
            ram = GuestRam()
            device.memory.add(ram.base, ram.backing, writable=True)
            steps["opened"] = tap_offloads(ifname)
            negotiate_modern(net, driver | csum | tso4 | tso6 | ecn)
            steps["negotiated csum,tso4,tso6,ecn"] = tap_offloads(ifname)
            ctrl = DriverQueue(ram, net.queues[CTRL_QUEUE])
            driver_ok(net)
            for name, bits in (("csum,tso4", csum | tso4), ("tso4", tso4),
                               ("csum,tso6,ecn", csum | tso6 | ecn), ("none", 0)):
                steps[f"ack {name}"] = set_guest_offloads(ctrl, net, bits)
                steps[f"set {name}"] = tap_offloads(ifname)
            net.set_status(0)  # a reset, then a driver that takes checksums only
            negotiate_modern(net, driver | csum)
            steps["negotiated csum"] = tap_offloads(ifname)
            net.set_status(0)
            steps["reset"] = tap_offloads(ifname)
        finally:
            device.close()
    # A persistent tap keeps its offloads when closed: the next user starts with none.
    earlier = TapBackend.open(ifname)
    earlier.set_offload(NetOffloads(csum=True, tso4=True))
    steps["earlier user"] = tap_offloads(ifname)
    earlier.close()
    TapBackend.open(ifname).close()
    steps["reopened"] = tap_offloads(ifname)
    return steps


def main() -> None:
    mode, netdev = sys.argv[1:3]
    if mode == "arp":
        result = trio.run(arp, netdev)
    elif mode == "create":
        result = trio.run(create, netdev)
    elif mode == "offloads":
        result = trio.run(offloads, netdev)
    else:
        result = trio.run(open_twice, netdev, 2 if mode == "busy" else 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
