"""Drive a tap backend from inside a test's network namespace; print the outcome as JSON.

Run by tests/server/test_netdev.py as ``ip netns exec NS python netdev_tap_probe.py MODE
NETDEV``, so the tap lives (and dies) in that namespace and the test process never
changes namespace. Modes:

* ``arp``: send an ARP request for 10.0.2.1 from a made-up MAC with send(), wait for the
  kernel's reply to come back through run()/deliver, print it.
* ``create``: open the backend, report whether ``ip link`` sees the tap while it is open
  and after close().
* ``busy``: open the backend twice; print the second open's error.
* ``open``: open the backend once; print the error, if any.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from typing import Any

import trio

from vfuserver.netdev.errors import NetdevHostError
from vfuserver.netdev.open import open_netdev
from vfuserver.netdev.options import parse_netdev
from vfuserver.netdev.tap import TapBackend

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


def main() -> None:
    mode, netdev = sys.argv[1:3]
    if mode == "arp":
        result = trio.run(arp, netdev)
    elif mode == "create":
        result = trio.run(create, netdev)
    else:
        result = trio.run(open_twice, netdev, 2 if mode == "busy" else 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
