"""Section ``stress``: loaded boots of the full traffic plan, counting queue failures.

Each boot runs the test guest against its own vfuserver, in its own network namespace with
a tap, through a plan that keeps both directions of the device busy: 1000 flood pings,
``nc-recv`` of 64 MiB of random data from the host, ``nc-send`` of 64 MiB to the host (both
checked by sha256 on the other end) and 100 flood pings after the transfers. Boots run
``stress_parallel`` at a time while ``stress_hogs`` busy-looping processes load the host's
CPUs; the three guest configurations (modern, transitional, transitional with
``virtio_pci.force_legacy=1``) take turns.

A boot fails when a step fails, the data differs, the boot times out, or the guest kernel
complains about the NIC (``virtio_net ...: output.0:id N is not a head!`` marks a broken
queue: exactly the failure this section exists to catch). Every failing console line is
reported. The section has no retries: one failed boot makes it fail.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from benchmarks import cbuild
from benchmarks.common import JsonDict, Section, Settings, loadavg
from benchmarks.guest import FORCE_LEGACY, guest_tools
from tests.e2e.rig import (
    BROKEN_QUEUE,
    HOST_ADDRESS,
    TAP,
    NamespaceNames,
    NetNamespace,
    RigError,
    TcpSink,
    TcpSource,
    Tools,
    VfuServer,
    boot_guest,
    find_vfuserver,
)
from tests.e2e.traffic import BRING_UP
from vfuserver.device import RING_JOURNAL_ENV


@dataclass(frozen=True)
class StressConfig:
    key: str
    profile: str
    append: str = ""


CONFIGS = (
    StressConfig("modern", "modern"),
    StressConfig("transitional", "transitional"),
    StressConfig("transitional-legacy", "transitional", FORCE_LEGACY),
)

KERNEL_FAULTS = ("Call Trace", "BUG:", "WARNING:", "Oops")
"""Console lines of a kernel fault, reported besides broken queues."""


def plan(source_port: int, sink_port: int, mib: int, timeout: int) -> str:
    return ",".join([
        *BRING_UP,
        f"ping:{HOST_ADDRESS}:count=1000:flood:deadline={timeout}",
        f"nc-recv:{HOST_ADDRESS}:{source_port}:timeout={timeout}",
        f"nc-send:{HOST_ADDRESS}:{sink_port}:mib={mib}:timeout={timeout}",
        f"ping:{HOST_ADDRESS}:count=100:flood:deadline={timeout}",
    ])


def complaints(console: str) -> list[str]:
    """The console lines that show a fault of the NIC, its driver or the kernel."""
    return [line.strip() for line in console.splitlines()
            if "@@VFU" not in line and (BROKEN_QUEUE.search(line)
                                        or any(word in line for word in KERNEL_FAULTS))]


class CpuHogs:
    """``count`` processes that spin on the CPU until stopped."""

    def __init__(self, count: int) -> None:
        self._procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                        stdin=subprocess.DEVNULL)
                       for _ in range(count)]

    def stop(self) -> None:
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait()


class RingWatch:
    """benchmarks/c/ring_watch.c on one boot: the guest's used rings checked from outside,
    against the ring journals vfuserver keeps in ``folder``."""

    def __init__(self, program: Path, socket_path: Path, folder: Path, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen([str(program), "--match", str(socket_path),
                                           "--journal", str(folder)],
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)

    def stop(self) -> tuple[list[str], str]:
        """Stop it: (its event lines, its summary line or why there is none)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        lines = self.log_path.read_text(errors="replace").splitlines()
        summary = next((line for line in lines if "summary" in line),
                       f"ring_watch ended ({self._proc.returncode}) without a summary: "
                       + " | ".join(lines[-3:]))
        events = [line for line in lines if line.startswith("ring_watch: ")
                  and line.split()[1] in ("USED_BACK", "USED_ELEM", "GUEST_AHEAD")]
        return events, summary


class QemuVfioUserServer(VfuServer):
    """QEMU's own vfio-user server (hw/remote/vfio-user-obj.c) exporting a virtio-net-pci
    on the tap: the same rings written from another process by QEMU's device model, to
    tell a fault of vfuserver from one of QEMU's vfio-user client. One client per process
    (it exits when the client goes), so one per boot. INTx only (vectors=0): the 10.0
    server masks MSI-X vectors the upstream client never unmasks."""

    what = "QEMU's vfio-user server"

    def __init__(self, qemu: str, socket_path: Path, log_path: Path, ns: NetNamespace,
                 profile: str) -> None:
        super().__init__(Path(qemu), socket_path, log_path)
        legacy = "off" if profile == "transitional" else "on"
        self.command = [
            *ns.exec_prefix, qemu, "-machine", "x-remote,vfio-user=on", "-accel", "tcg",
            "-nodefaults", "-display", "none", "-monitor", "none",
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,id=net0,romfile=,vectors=0,"
                       f"disable-legacy={legacy},mac=52:54:00:12:34:56",
            "-object", json.dumps({"qom-type": "x-vfio-user-server", "id": "v0",
                                   "socket": {"type": "unix", "path": str(socket_path)},
                                   "device": "net0"})]


def _boot(settings: Settings, tools: Tools, config: StressConfig, number: int,
          work: Path, sockets_dir: Path, names: NamespaceNames,
          ring_watch: Path | None) -> JsonDict:
    """One loaded boot; a dict with ``failures`` (empty when the boot passed)."""
    failures: list[str] = []
    ns = NetNamespace(names.next())
    server: VfuServer | None = None
    watch: RingWatch | None = None
    watch_summary = None
    console = ""
    seconds = 0.0
    mib = settings.stress_mib
    timeout = settings.step_timeout
    try:
        ns.create()
        ns.add_tap(TAP)
        if settings.stress_qemu_server:
            server = QemuVfioUserServer(settings.stress_qemu_server,
                                        sockets_dir / f"s{number}.sock",
                                        work / f"stress-{number}-{config.key}-qemu-server.log",
                                        ns, config.profile)
            server.start(timeout=30)
        else:
            exe = find_vfuserver()
            if exe is None:
                raise RigError("no vfuserver console script next to this Python")
            env = None
            if ring_watch is not None:
                journals = work / f"stress-{number}-journal"
                journals.mkdir()
                env = {RING_JOURNAL_ENV: str(journals)}
            server = VfuServer(exe, sockets_dir / f"s{number}.sock",
                               work / f"stress-{number}-{config.key}-vfuserver.log", ns,
                               ["--profile", config.profile, "--netdev", f"tap,ifname={TAP}"],
                               log_level="info", env=env)
            server.start()
        if ring_watch is not None and not isinstance(server, QemuVfioUserServer):
            watch = RingWatch(ring_watch, server.socket_path, journals,
                              work / f"stress-{number}-{config.key}-ring-watch.log")
        data = os.urandom(mib << 20)
        with TcpSource(ns, data, timeout=settings.guest_timeout) as source, \
                TcpSink(ns, timeout=settings.guest_timeout) as sink:
            run = boot_guest(tools, work / f"stress-{number}-{config.key}-console.log",
                             plan(source.port, sink.port, mib, timeout), ns=ns,
                             append=config.append, sockets=[server.socket_path],
                             timeout=settings.guest_timeout, smp=settings.stress_smp)
            console, seconds = run.console, run.seconds
            report = run.report
            if run.killed:
                failures.append(f"QEMU killed after {settings.guest_timeout:.0f} s")
            failures += [f"step failed: {step}" for step in report.failed_steps]
            if not report.complete:
                failures.append(f"plan incomplete: {report.summary()}")
            else:
                got = report.step("nc-recv")
                if (got.int_field("bytes"), got.fields["sha256"]) != (len(data), source.sha256):
                    failures.append(f"nc-recv: guest got {got.fields}, host sent "
                                    f"{len(data)} bytes sha256 {source.sha256}")
                sent = report.step("nc-send")
                sink.wait(timeout=30)
                if (sink.received, sink.sha256) != (mib << 20, sent.fields["sha256"]):
                    failures.append(f"nc-send: host got {sink.received} bytes sha256 "
                                    f"{sink.sha256}, guest sent {sent.fields}")
    except (RigError, OSError) as exc:
        failures.append(f"rig: {exc}")
    finally:
        if watch is not None:
            watch_events, watch_summary = watch.stop()
            failures += watch_events
        if server is not None:
            server.stop()
        ns.delete()
    lines = complaints(console)
    return {"number": number, "config": config.key, "seconds": round(seconds, 1),
            "ring_watch": watch_summary,
            "failures": failures + [f"console: {line}" for line in lines] if failures or lines
            else []}


def run(settings: Settings, work: Path) -> Section:
    section = Section("stress")
    tools = guest_tools(section)
    if tools is None:
        return section
    sockets_dir = Path(os.path.realpath(work)) / "s"
    sockets_dir.mkdir(exist_ok=True)
    names = NamespaceNames()
    lock = threading.Lock()
    boots: list[JsonDict] = []
    hogs = CpuHogs(settings.stress_hogs)
    section.extra["setup"] = (
        f"{settings.stress_boots} boots of {settings.stress_smp}-vCPU guests, "
        f"{settings.stress_parallel} at a time, "
        f"NIC served by {settings.stress_qemu_server or 'vfuserver'}, "
        f"{settings.stress_hogs} CPU hogs; per boot: 1000 flood pings, {settings.stress_mib} "
        f"MiB host->guest and guest->host (sha256), 100 flood pings; configurations in turn: "
        + ", ".join(c.key for c in CONFIGS))
    load_before = loadavg()

    ring_watch = None
    if settings.stress_watch and not settings.stress_qemu_server:
        ring_watch = cbuild.build().ring_watch

    def one(number: int) -> None:
        result = _boot(settings, tools, CONFIGS[number % len(CONFIGS)], number, work,
                       sockets_dir, names, ring_watch)
        with lock:
            boots.append(result)
            verdict = "FAILED" if result["failures"] else "ok"
            print(f"benchmarks: stress boot {number + 1}/{settings.stress_boots} "
                  f"({result['config']}): {verdict} in {result['seconds']} s",
                  file=sys.stderr, flush=True)
            for line in result["failures"]:
                print(f"    {line}", file=sys.stderr, flush=True)
            if result["ring_watch"]:
                print(f"    {result['ring_watch']}", file=sys.stderr, flush=True)

    try:
        with concurrent.futures.ThreadPoolExecutor(settings.stress_parallel) as pool:
            for future in [pool.submit(one, n) for n in range(settings.stress_boots)]:
                future.result()
    finally:
        hogs.stop()
    section.extra["loadavg_during"] = [load_before, loadavg()]
    boots.sort(key=lambda b: b["number"])
    for config in CONFIGS:
        mine = [b for b in boots if b["config"] == config.key]
        if not mine:
            continue
        failed = [b for b in mine if b["failures"]]
        section.rows.append({"config": config.key, "boots": len(mine), "failed": len(failed),
                             "median_seconds": sorted(b["seconds"] for b in mine)[len(mine) // 2],
                             "failures": {str(b["number"]): b["failures"] for b in failed}})
    if any(row["failed"] for row in section.rows):
        section.status = "failed"
    return section


def markdown(section: Section) -> list[str]:
    if not section.rows:
        return []
    total = sum(row["boots"] for row in section.rows)
    failed = sum(row["failed"] for row in section.rows)
    lines = [f"Stress ({section.extra.get('setup', '')}): boots run {total}, failed {failed}.",
             "", "| configuration | boots | failed | median boot s |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {row['config']} | {row['boots']} | {row['failed']} | {row['median_seconds']} |"
              for row in section.rows]
    for row in section.rows:
        for number, failures in row["failures"].items():
            lines.append("")
            lines.append(f"Boot {int(number) + 1} ({row['config']}) failed:")
            lines += [f"    {line}" for line in failures]
    return lines
