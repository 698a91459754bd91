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

from tests.fuzz.net_path import NetPathTarget, _Side, vnet_header
from tests.server.net_path_rig import attach, data_run, deliver_to, host_sends
from vfuserver.binding import ffi
from vfuserver.netpath import NetRun

_LOG = logging.getLogger("fuzz.net-run")


class _RunSide(_Side):
    def __init__(self, native: bool, vnet_hdr: bool) -> None:
        super().__init__(native, vnet_hdr)
        self.net_run: NetRun | None = None
        self.pending = ffi.new("uint64_t *")
        self.flags = -1

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
        host_sends(self.tap, self.host, frame, vnet_header(frame))
        self.flags = self.data_run()

    def transmit(self) -> None:
        self.flags = self.data_run()

    def state(self) -> dict[str, object]:
        assert self.net_run is not None
        state = super().state()
        state["run"] = (self.flags, self.net_run.tx_due, self.net_run.tx_lingering)
        self.flags = -1
        return state


class NetRunTarget(NetPathTarget):
    """Runs an input on both sides and compares them after every operation."""

    SIDE = _RunSide
    COMPARED = "runs in Python and runs in C"
