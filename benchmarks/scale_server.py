"""One process serving N devices, for the ``scale`` section: ``python -m benchmarks.scale_server``.

Brings the devices up one after the other in one ``trio.run`` (``open_device`` with one
admin owner, then ``ServedDevice.run`` started in a nursery, as the server does), measuring
each bring-up and the process's RSS (VmRSS of /proc/self/status) after it; prints one JSON
line with the measurements once every socket exists, then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from vfuserver.device import ServedDevice, open_device
from vfuserver.devices.admin import AdminOwner
from vfuserver.spec import PROFILES, DeviceSpec

FDS_PER_DEVICE_BUDGET = 8
"""Generous: a device holds its listening socket (a connection and eventfds once a client
attaches); trio's epoll and wakeup fds are shared."""


def rss_kib() -> int:
    """VmRSS of this process in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raise_nofile(count: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE so `count` devices fit; the new (soft, hard) limits."""
    needed = 64 + FDS_PER_DEVICE_BUDGET * count
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            hard = needed  # only root may raise the hard limit; EPERM otherwise
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def serve(count: int, directory: Path, profile: str) -> None:
    limits = raise_nofile(count)
    rss_start, fds_start = rss_kib(), open_fds()
    owner = AdminOwner()
    bring_up: list[float] = []
    rss: list[int] = []
    devices: list[ServedDevice] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                spec = DeviceSpec(name=f"d{index}", socket=str(directory / f"d{index}.sock"),
                                  profile=profile)
                started = time.perf_counter()
                device = await open_device(spec, owner=owner)
                await nursery.start(device.run)
                bring_up.append(time.perf_counter() - started)
                rss.append(rss_kib())
                devices.append(device)
            print(json.dumps({
                "count": count,
                "profile": profile,
                "nofile_limits": list(limits),
                "rss_start_kib": rss_start,
                "rss_kib": rss,
                "bring_up_s": bring_up,
                "fds_start": fds_start,
                "fds": open_fds(),
                "sockets": [d.context.socket_path for d in devices],
            }), flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_server",
                                     description=__doc__)
    parser.add_argument("--count", type=int, required=True, help="devices to serve")
    parser.add_argument("--dir", type=Path, required=True, help="folder for the sockets")
    parser.add_argument("--profile", choices=PROFILES, default="modern")
    args = parser.parse_args(argv)
    trio.run(serve, args.count, args.dir, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
