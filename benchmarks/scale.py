"""Section ``scale``: one vfuserver process serving N devices.

For each N, benchmarks/scale_server.py brings N modern devices up in one process and reports
its RSS after each device and each bring-up time; then the C client times region accesses
(device_status reads) on the first device while the N - 1 others sit idle, under the same
CPU placement as the region section. Last, the server's CPU time while all N sit idle, with
no client, then with a negotiated client on every device (a serving thread each).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.accesses import LEGACY_KINDS, MODERN_KINDS, AccessKind
from benchmarks.cbuild import Programs
from benchmarks.common import (
    BenchmarkError,
    HelperProcess,
    JsonDict,
    Section,
    Settings,
    cpu_seconds,
    pinned,
)
from benchmarks.region import measure
from vfuserver.client import Client

KINDS: dict[str, AccessKind] = {"modern": MODERN_KINDS[0], "transitional": LEGACY_KINDS[1]}
"""The access timed on the first device: a status read (modern BAR4, or legacy BAR0)."""

MIB = 1024


def _report(server: HelperProcess) -> JsonDict | None:
    for line in server.log.splitlines():
        if line.startswith("{"):
            report: JsonDict = json.loads(line)
            return report
    return None


def run_one(settings: Settings, programs: Programs, work: Path, count: int,
            profile: str) -> JsonDict:
    client_cpu, server_cpu = settings.cpus
    kind = KINDS[profile]
    name = f"scale-{profile}-{count}"
    directory = work / name
    directory.mkdir()
    argv = pinned([sys.executable, "-m", "benchmarks.scale_server", "--count", str(count),
                   "--dir", str(directory), "--profile", profile], server_cpu)
    with HelperProcess(name, argv, work / f"{name}.log") as server:
        server.start(lambda: _report(server) is not None, timeout=60 + count * 0.5)
        report = _report(server)
        if report is None:  # pragma: no cover - start() waited for it
            raise BenchmarkError("scale server gave no report")
        first = Path(report["sockets"][0])
        loops = [measure(programs, server, first, kind, settings.seconds, client_cpu)
                 for _ in range(settings.repeats)]
        idle = idle_cpu_percent(server.pid, settings.idle_seconds)
        with attached_clients(report["sockets"]):
            idle_attached = idle_cpu_percent(server.pid, settings.idle_seconds)
        status = server.stop()
    if status not in (0, None):
        raise BenchmarkError(f"scale server for {count} devices exited with {status}: "
                             f"{server.log[-2000:]}")
    rss = report["rss_kib"]
    bring_up_ms = [s * 1000 for s in report["bring_up_s"]]
    return {
        "devices": count,
        "profile": profile,
        "rss_start_mib": report["rss_start_kib"] / MIB,
        "rss_first_device_mib": rss[0] / MIB,
        "rss_total_mib": rss[-1] / MIB,
        "rss_first_device_kib": rss[0] - report["rss_start_kib"],
        "rss_per_extra_device_kib": (rss[-1] - rss[0]) / (count - 1) if count > 1 else None,
        "bring_up_ms_median": statistics.median(bring_up_ms),
        "bring_up_ms_max": max(bring_up_ms),
        "bring_up_s_total": sum(report["bring_up_s"]),
        "fds": report["fds"],
        "fds_per_device": (report["fds"] - report["fds_start"]) / count,
        "nofile_limits": report["nofile_limits"],
        "access": kind.label,
        "ops_per_s": statistics.median(loop["ops_per_s"] for loop in loops),
        "us_per_op": statistics.median(loop["us_per_op"] for loop in loops),
        "server_cpu_us_per_op": statistics.median(loop["server_cpu_us_per_op"]
                                                  for loop in loops),
        "idle_cpu_percent": idle,
        "idle_attached_cpu_percent": idle_attached,
    }


def idle_cpu_percent(pid: int, seconds: float) -> float:
    """The process's CPU time over ``seconds`` of wall time, in % of one core."""
    time.sleep(0.5)  # let the last client's wake-ups settle
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds * 100


@contextmanager
def attached_clients(sockets: list[str]) -> Iterator[None]:
    """A negotiated client on every device, saying nothing (a VM whose devices sit idle):
    each has its serving thread."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < len(sockets) + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, len(sockets) + 256), hard))
    with ExitStack() as stack:
        for path in sockets:
            stack.enter_context(Client(path, timeout=60))
        yield


def run(settings: Settings, programs: Programs, work: Path) -> Section:
    section = Section("scale")
    section.extra["placement"] = settings.describe_placement()
    runs = [(count, "modern") for count in settings.scale_counts]
    runs.append((max(settings.scale_counts), "transitional"))
    for count, profile in runs:
        try:
            section.rows.append(run_one(settings, programs, work, count, profile))
        except (BenchmarkError, subprocess.TimeoutExpired, OSError) as exc:
            section.notes.append(f"{count} {profile} devices failed: {exc}")
            section.status = "partial"
    if not section.rows:
        section.status = "failed"
    return section


def markdown(section: Section) -> list[str]:
    lines = [
        f"One process serving N devices (netdev none, no client attached but the measured "
        f"one); status-register reads/s of the first device while the others sit idle "
        f"({section.extra.get('placement', '')}).",
        "",
        "| devices | profile | RSS total MiB | RSS per extra device KiB | bring-up ms/device "
        "(median / max) | fds per device | status reads/s on device 0 | µs/op "
        "| idle CPU % of a core (no client / every device attached) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in section.rows:
        per_device = row["rss_per_extra_device_kib"]
        per = "n/a" if per_device is None else f"{per_device:.0f}"
        lines.append(
            f"| {row['devices']} | {row['profile']} | {row['rss_total_mib']:.1f} | {per} "
            f"| {row['bring_up_ms_median']:.1f} / {row['bring_up_ms_max']:.1f} "
            f"| {row['fds_per_device']:.1f} | {row['ops_per_s']:,.0f} | {row['us_per_op']:.1f} "
            f"| {row['idle_cpu_percent']:.2f} / {row['idle_attached_cpu_percent']:.2f} |")
    return lines
