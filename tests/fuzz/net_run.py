"""Fuzz target 7: the whole data run of virtio-net in C against the same run in Python.

The ``rings`` target's inputs and operations (tests/fuzz/rings.py), run twice on real
TapBackends over socket pairs (tests/server/net_path_rig.py), as the serving thread runs
them (vfuserver/netpath.py NetRun): a kick is recorded as the fast path records it and a
data run follows, a frame from the host is followed by a run, and the transmit operation
is the timer's run. On one side every run is NetRun.run in Python (after the kicks, as
VfuContext._on_data); on the other it goes to C first (netpath.c vfuserver_net_run) over
the state NetRun.hand_over gave it, with what C hands back finished in Python, and the
model takes the state back (NetRun.take_back) after every run. After every operation
both must have the same guest RAM, queue state, counters, frames on the host side,
interrupted queues and run flags; any difference is a finding. Bit 2 of the first byte
gives the tap a vnet header.
"""

from __future__ import annotations

import logging
import socket

from tests.fuzz.harness import ByteReader, Finding
from tests.fuzz.rings import RingsTarget
from tests.server.net_path_rig import (
    attach,
    data_run,
    deliver_to,
    guard_count,
    host_frames,
    host_sends,
    snapshot,
    socket_tap,
)
from vfuserver.binding import ffi
from vfuserver.devices.virtio_net import NetPeer
from vfuserver.netdev.tap import TapBackend
from vfuserver.netpath import NetRun

VNET_HDR = 4
"""Flag bit of the first byte: the tap carries a virtio-net header."""

_LOG = logging.getLogger("fuzz.net-run")


class _Side(RingsTarget):
    def __init__(self, native: bool, vnet_hdr: bool) -> None:
        self.native = native
        self.vnet_hdr = vnet_hdr
        self.tap: TapBackend | None = None
        self.host: socket.socket | None = None
        self.net_run: NetRun | None = None
        self.pending = ffi.new("uint64_t *")
        self.snapshots: list[dict[str, object]] = []

    def make_peer(self) -> NetPeer:
        guard_count(self.ram)
        self.tap, self.host = socket_tap(self.vnet_hdr)
        return self.tap

    def ready(self) -> None:
        assert self.tap is not None
        run = self.net_run = NetRun(self.dev, self.tap, deliver_to(self.dev, self.tap), _LOG,
                                    attach(self.dev, self.tap), rx_owned=True)
        self.dev.on_tx_pending = lambda: setattr(run, "tx_due", True)
        self.dev.on_rx_buffers = lambda: None  # the run receives next

    def data_run(self) -> int:
        """serve.c vfuserver_run_data between two looks of the model (device lock)."""
        assert self.net_run is not None
        if self.native:
            self.net_run.hand_over()  # the lock released
        flags = data_run(self.net_run, self.dev, self.pending, native=self.native)
        self.net_run.take_back()  # the lock taken to look
        return flags

    def kick(self, index: int) -> None:
        self.pending[0] |= 1 << index
        self.flags = self.data_run()

    def receive(self, frame: bytes) -> None:
        assert self.tap is not None and self.host is not None
        host_sends(self.tap, self.host, frame)
        self.flags = self.data_run()

    def transmit(self) -> None:
        self.flags = self.data_run()

    def step(self, reader: ByteReader) -> None:
        self.flags = -1
        super().step(reader)
        assert self.tap is not None and self.host is not None and self.net_run is not None
        state = snapshot(self.ram, self.dev, self.tap)
        state["host"] = host_frames(self.host)
        state["run"] = (self.flags, self.net_run.tx_due, self.net_run.tx_lingering)
        self.snapshots.append(state)

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
        if self.host is not None:
            self.host.close()


class NetRunTarget:
    """Runs an input on both sides and compares them after every operation."""

    def __call__(self, data: bytes) -> None:
        vnet_hdr = bool(data[:1] and data[0] & VNET_HDR)
        ref, native = _Side(False, vnet_hdr), _Side(True, vnet_hdr)
        try:
            ref(data)
            native(data)
            for index, (a, b) in enumerate(zip(ref.snapshots, native.snapshots, strict=True)):
                for key in a:
                    if a[key] != b[key]:
                        raise Finding(f"operation {index}: {key} differs between runs in "
                                      "Python and runs in C")
        finally:
            ref.close()
            native.close()

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        seeds = RingsTarget.seeds()
        seeds.update({f"{name}-vnet": bytes([data[0] | VNET_HDR]) + data[1:]
                      for name, data in RingsTarget.seeds().items()})
        return seeds
