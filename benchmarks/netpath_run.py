"""The cost of one data-path run of virtio-net in-process: the model alone, the C
per-frame path (vfuserver/netpath.py NetPath) and the whole run in C (NetRun over
netpath.c vfuserver_net_run, as the serving thread calls it), on the same rig as
tests/server/test_netpath.py (a real TapBackend over a socket pair, guest RAM in a
bytearray; no libvfio-user, no serving thread, no device lock).

    python -m benchmarks.netpath_run [--runs 3000]

Prints microseconds per run, best of five repetitions: a run that finds nothing (the
transmit timer's run when the guest has queued nothing, and a receive that finds the tap
empty) and a run with one 98-byte frame each way (a ping's echo request and its answer).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

from tests.devices.driver import GuestRam, RecordingInterrupts
from tests.devices.test_virtio_net import MAC, OTHER, driven_net
from tests.server.net_path_rig import (
    attach,
    deliver_to,
    host_frames,
    host_sends,
    receive_now,
    socket_tap,
)
from vfuserver.binding import ffi, lib
from vfuserver.devices.virtio_net import TX_QUEUE
from vfuserver.netpath import NetPath, NetRun
from vfuserver.protocol import virtio_net as net

FRAME_PAYLOAD = 84  # + 14-byte Ethernet header: a 98-byte ping frame


def _frame(dest: bytes, fill: bytes) -> bytes:
    return dest + OTHER + b"\x08\x00" + fill * FRAME_PAYLOAD


MODES = (("model", "the model alone"), ("frames", "the C per-frame path"),
         ("run", "the whole run in C"))


def measure(mode: str, runs: int) -> tuple[float, float]:
    """(µs per empty run, µs per run with one frame each way); ``mode`` one of MODES."""
    ram = GuestRam()
    tap, host = socket_tap(vnet_hdr=True)
    dev, rx, tx, _ = driven_net(ram, RecordingInterrupts(), tap, legacy=False, want=None,
                                mtu=1500)
    dev.on_tx_pending = lambda: None  # the server's bottom half: run_tx is called below
    path: NetPath | None = attach(dev, tap) if mode != "model" else None
    header = bytes(net.HDR_LEN)
    net_run = NetRun(dev, tap, deliver_to(dev, tap), logging.getLogger("bench"), path,
                     rx_owned=True) if mode == "run" else None
    pending = ffi.new("uint64_t *")

    def run() -> None:
        if net_run is None:
            dev.run_tx(linger=True)
            receive_now(dev, tap, path)
            return
        pending[0] = 1 << TX_QUEUE  # the transmit step runs every time, as run_tx above
        if lib.vfuserver_net_run(net_run.native, pending) < 0:
            raise RuntimeError("the run in C handed the run to Python")

    if net_run is not None:
        dev.on_tx_pending = lambda: setattr(net_run, "tx_due", True)
        if not net_run.hand_over():
            raise RuntimeError("the model did not hand the run over")

    try:
        start = time.perf_counter()
        for _ in range(runs):
            run()
        empty = (time.perf_counter() - start) / runs
        busy = 0.0
        for _ in range(runs):
            tx.add([header + _frame(OTHER, b"x")])
            rx.add([], [1536])
            host_sends(tap, host, _frame(MAC, b"y"))
            start = time.perf_counter()
            run()
            busy += time.perf_counter() - start
            tx.get_used()
            rx.get_used()
            host_frames(host)
        return empty * 1e6, busy / runs * 1e6
    finally:
        if net_run is not None:
            net_run.take_back()
        tap.close()
        host.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3000)
    args = parser.parse_args(argv)
    for mode, label in MODES:
        results = [measure(mode, args.runs) for _ in range(5)]
        empty = min(r[0] for r in results)
        busy = min(r[1] for r in results)
        print(f"{label:22}: empty run {empty:5.1f} µs, run with one frame each way "
              f"{busy:5.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
