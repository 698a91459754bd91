"""What every benchmark section shares: settings, results, helper processes, CPU placement."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.e2e.rig import LoggedProcess

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECTIONS = ("region", "inprocess", "guest", "disk", "scale", "hostile", "stress")
DEFAULT_SECTIONS = ("region", "inprocess", "guest", "disk", "scale", "hostile")
"""What a run without --only does: the stress section is long and asked for by name."""

JsonDict = dict[str, Any]


class BenchmarkError(Exception):
    """A benchmark could not be carried out (a helper failed, a result is unusable)."""


@dataclass(frozen=True)
class Settings:
    """How long and how often to measure; ``smoke`` keeps every section very brief."""

    smoke: bool = False
    seconds: float = 2.0
    """Length of one region-access loop."""
    repeats: int = 3
    """Region-access loops per access kind and server (the median is reported)."""
    placement: str = "same"
    """same: client and server on CPU 0; cross: client on CPU 0, server on CPU 1; free."""
    placements: tuple[str, ...] = ("cross", "same")
    """The placements the region section measures, in turn (cross first: a vCPU thread
    and the server sit on different CPUs of a real host)."""
    inprocess_iterations: int = 20000
    scale_counts: tuple[int, ...] = (1, 64, 512)
    idle_seconds: float = 10.0
    """Wall time over which the scale section measures an idle server's CPU."""
    ping_count: int = 1000
    transfer_mib: int = 64
    guest_timeout: float = 300.0
    """Seconds one boot may take in all."""
    step_timeout: int = 120
    """Seconds the guest's ping and transfer may take each (a stalled device fails fast)."""
    guest_repeats: int = 3
    """Boots per guest configuration (rounds over all configurations; the median counts)."""
    disk_mib: int = 64
    """MiB the disk section writes and reads sequentially."""
    disk_reads: int = 200
    """Random 4 KiB reads of the disk section (one dd process each)."""
    stress_boots: int = 60
    """Loaded boots of the stress section (the configurations take turns)."""
    stress_parallel: int = 2
    """Stress boots at a time."""
    stress_hogs: int = 2
    """Busy-looping processes on the host during the stress section."""
    stress_mib: int = 64
    """MiB each way per stress boot."""
    stress_smp: int = 1
    """vCPUs of each stress guest."""
    stress_qemu_server: str | None = None
    """A QEMU built with --enable-vfio-user-server: serve the NIC with QEMU's own
    x-vfio-user-server (virtio-net-pci) instead of vfuserver, for comparison."""
    stress_watch: bool = False
    """Run ring_watch (benchmarks/c/ring_watch.c) beside every stress boot."""

    @classmethod
    def smoke_settings(cls) -> Settings:
        return cls(smoke=True, seconds=0.15, repeats=1, inprocess_iterations=500,
                   scale_counts=(1, 8), idle_seconds=0.5, ping_count=50, transfer_mib=1,
                   guest_timeout=90.0,
                   step_timeout=30, guest_repeats=1, stress_boots=2, stress_mib=8,
                   disk_mib=4, disk_reads=10)

    @property
    def cpus(self) -> tuple[int | None, int | None]:
        """(client CPU, server CPU) for this placement; None: not pinned."""
        if self.placement == "free" or shutil.which("taskset") is None:
            return None, None
        if self.placement == "cross" and (os.cpu_count() or 1) > 1:
            return 0, 1
        return 0, 0

    def describe_placement(self) -> str:
        client, server = self.cpus
        if client is None:
            missing = " (no taskset)" if shutil.which("taskset") is None else ""
            return f"client and server not pinned{missing}"
        if client == server:
            return f"client and server pinned to CPU {client} (taskset)"
        return f"client pinned to CPU {client}, server to CPU {server} (taskset)"


@dataclass
class Section:
    """One section's results: rows of numbers, notes, and why something was skipped."""

    name: str
    status: str = "ok"
    """ok; partial (some rows skipped, see notes); skipped (no rows, see notes); failed."""
    rows: list[JsonDict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: JsonDict = field(default_factory=dict)
    seconds: float = 0.0

    def skip(self, reason: str) -> None:
        self.notes.append(f"skipped: {reason}")
        self.status = "partial" if self.rows else "skipped"

    def to_json(self) -> JsonDict:
        return {"status": self.status, "seconds": round(self.seconds, 2), "notes": self.notes,
                "rows": self.rows, **self.extra}


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """argv run under ``taskset -c CPU`` (taskset execs: the process keeps its PID)."""
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_fields(line: str) -> dict[str, str]:
    """``key=value key=value`` (what the C programs print) as a dict."""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


class HelperProcess(LoggedProcess):
    """A server process of a benchmark, its output in a log file; stopped on exit."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path = REPO) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        """Where it runs: ``python -m`` imports from there first."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchmarkError(f"{self.name} is not running")
        return self.process.pid

    def start(self, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        """Start it and wait until ready() holds."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                self.stop()
                raise BenchmarkError(f"{self.name} exited ({self.process.returncode}) before "
                                     f"it was ready: {self.log[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchmarkError(f"{self.name} not ready in {timeout} s: {self.log[-2000:]}")
            time.sleep(0.02)



    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def vfuserver_cli(log_level: str = "warning") -> list[str]:
    """``vfuserver`` through this Python (the project's venv), before its command."""
    return [sys.executable, "-m", "vfuserver.cli", "--log-level", log_level]


def vfuserver_argv(socket_path: Path, *args: str, log_level: str = "warning") -> list[str]:
    """``vfuserver run`` through this Python (the project's venv)."""
    return [*vfuserver_cli(log_level), "run", "--socket", str(socket_path), *args]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command_version(argv: Sequence[str], pattern: str) -> str | None:
    if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
        return None
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                             check=False, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, out)
    return match.group(1) if match else None


def machine_description(qemu: Path | None) -> JsonDict:
    """What the numbers were measured on."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": _command_version([str(qemu), "--version"], r"version (\S+)") if qemu else None,
        "gcc": _command_version(["gcc", "--version"], r"\) (\S+)"),
        "os": _os_name(),
    }


def code_version() -> JsonDict:
    """The commit measured, and the server's files that differ from it (read-only git)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *args],
                                  capture_output=True, text=True, timeout=30, check=False,
                                  stdin=subprocess.DEVNULL).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    status = git("status", "--porcelain", "--", "vfuserver", "devices", "protocol")
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted": [line[3:] for line in status.splitlines()]}


def _os_name() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.system()
    match = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', text, re.MULTILINE)
    return match.group(1) if match else platform.system()

