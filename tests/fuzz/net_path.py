"""Fuzz target 6: the C data path of virtio-net against the model, differentially.

The ``rings`` target's inputs and operations (tests/fuzz/rings.py), run twice: on a model
alone and on a model with the C data path (vfuserver/netpath.py, csrc/netpath.c), each on
a real TapBackend over a socket pair (tests/server/net_path_rig.py); receives come from
the tap, the transmit bottom half lingers and coalesces as the server's does. After every
operation both must have the same guest RAM, queue state, counters, frames on the host
side and interrupted queues; any difference is a finding. Bit 2 of the first byte gives
the tap a vnet header, whose GSO type and checksum flag come from the frame
(:func:`vnet_header`).
"""

from __future__ import annotations

import socket

from tests.fuzz.harness import Finding
from tests.fuzz.rings import RingsTarget
from tests.server.net_path_rig import (
    attach,
    guard_count,
    host_frames,
    host_sends,
    receive_now,
    snapshot,
    socket_tap,
)
from vfuserver.devices.virtio_net import NetPeer
from vfuserver.netdev.tap import TapBackend
from vfuserver.netpath import NetPath
from vfuserver.protocol import virtio_net as net

VNET_HDR = 4
"""Flag bit of the first byte: the tap carries a virtio-net header."""

_GSO_TYPES = (0, 0, 0, 1, 1 | net.GSO_ECN, 4, 3, 5, 2, net.GSO_ECN)
"""gso_type of a frame from the tap, by its 7th byte: mostly none, each type the spec
defines, with ECN, one it does not and the ECN bit alone."""


def vnet_header(frame: bytes) -> bytes:
    """The header the host's stack gives ``frame`` (a tap with a vnet header), from the
    frame's 7th byte (its first after the destination MAC: the input's): a GSO type of
    :data:`_GSO_TYPES`, and NEEDS_CSUM from bit 7 (csum_start 14, csum_offset 16)."""
    sel = frame[6] if len(frame) > 6 else 0
    gso = _GSO_TYPES[sel % len(_GSO_TYPES)]
    flags = sel >> 7
    return net.HDR_STRUCT.pack(flags, gso, 54 if gso else 0, 1448 if gso else 0,
                               14 if flags else 0, 16 if flags else 0, 0)


class _Side(RingsTarget):
    def __init__(self, native: bool, vnet_hdr: bool) -> None:
        self.native = native
        self.vnet_hdr = vnet_hdr
        self.path: NetPath | None = None
        self.tap: TapBackend | None = None
        self.host: socket.socket | None = None
        self.snapshots: list[dict[str, object]] = []

    def make_peer(self) -> NetPeer:
        guard_count(self.ram)
        self.tap, self.host = socket_tap(self.vnet_hdr)
        return self.tap

    def ready(self) -> None:
        assert self.tap is not None
        if self.native:
            self.path = attach(self.dev, self.tap)

    def receive(self, frame: bytes) -> None:
        assert self.tap is not None and self.host is not None
        host_sends(self.tap, self.host, frame, vnet_header(frame))
        receive_now(self.dev, self.tap, self.path)

    def transmit(self) -> None:
        self.dev.run_tx(linger=True)

    def state(self) -> dict[str, object]:
        """What both sides must agree on after an operation."""
        assert self.tap is not None and self.host is not None
        state = snapshot(self.ram, self.dev, self.tap)
        state["host"] = host_frames(self.host)
        return state

    def step(self, reader):  # type: ignore[no-untyped-def]
        super().step(reader)
        self.snapshots.append(self.state())

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
        if self.host is not None:
            self.host.close()


class NetPathTarget:
    """Runs an input on both paths and compares them after every operation."""

    SIDE: type[_Side] = _Side
    COMPARED = "the model and the C data path"

    def __call__(self, data: bytes) -> None:
        vnet_hdr = bool(data[:1] and data[0] & VNET_HDR)
        ref, native = self.SIDE(False, vnet_hdr), self.SIDE(True, vnet_hdr)
        try:
            ref(data)
            native(data)
            for index, (a, b) in enumerate(zip(ref.snapshots, native.snapshots, strict=True)):
                for key in a:
                    if a[key] != b[key]:
                        raise Finding(f"operation {index}: {key} differs between "
                                      f"{self.COMPARED}")
        finally:
            ref.close()
            native.close()

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        seeds = RingsTarget.seeds()
        seeds.update({f"{name}-vnet": bytes([data[0] | VNET_HDR]) + data[1:]
                      for name, data in RingsTarget.seeds().items()})
        return seeds
