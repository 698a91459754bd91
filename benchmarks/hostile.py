"""Section ``hostile``: misbehaving vfio-user clients, and what another device sees meanwhile.

One ``vfuserver run --config`` process serves two transitional devices, ``a`` and ``b``.
While a client of ``a`` misbehaves (each scenario below), a probe thread reads ``b``'s config
space in a loop and records how long each access waits. After each scenario ``a`` must serve
a well-behaved client again. Reported per scenario: b's access latency (median, p99, max)
and the server's open fds and RSS before and after; the connect/disconnect scenario repeats
1000 sessions. tests/server/test_hostile_clients.py runs the same scenarios and checks what
they must show (b answered, a served again, nothing leaked); this section reports figures.

The scenarios are the ones issue 12 lists, one per way a client can leave a message
unfinished (header, body, with file descriptors, closing or stalling, at every byte
offset), a header announcing more than the protocol allows, a client that never reads its
replies, one that never says anything, and connect/disconnect churn.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import HelperProcess, JsonDict, Section, Settings, cpu_seconds
from vfuserver.client import Client
from vfuserver.protocol import vfio_user as vu

HOLD = 1.0
"""Seconds a misbehaving client keeps misbehaving while the probe samples."""

IDS = bytes.fromhex("f41a0010")
"""Vendor and device ID of a transitional virtio-net (what a config read of 4 bytes gives)."""


class ScenarioFailed(AssertionError):
    """The server did not do what a scenario requires."""


@dataclass
class ServerUnderTest:
    """A running two-device server: its process and the devices' sockets."""

    process: HelperProcess
    a: Path
    b: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise ScenarioFailed("no VmRSS in /proc/PID/status")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def alive(self) -> None:
        if self.process.process is None or self.process.process.poll() is not None:
            raise ScenarioFailed(f"the server died: {self.process.log[-3000:]}")


@contextmanager
def two_device_server(work: Path, argv_prefix: list[str]) -> Iterator[ServerUnderTest]:
    """``vfuserver run --config`` with devices a and b (transitional, no backend)."""
    a, b = work / "a.sock", work / "b.sock"
    config = work / "hostile.toml"
    config.write_text("".join(
        f'[[device]]\nname = "{name}"\nsocket = "{path}"\nprofile = "transitional"\n\n'
        for name, path in (("a", a), ("b", b))))
    argv = [*argv_prefix, "run", "--config", str(config)]
    with HelperProcess("vfuserver", argv, work / "hostile.log") as process:
        process.start(lambda: a.is_socket() and b.is_socket())
        yield ServerUnderTest(process, a, b)


class Probe:
    """Reads 4 bytes of b's config space in a loop on a thread: the latency of each."""

    def __init__(self, path: Path) -> None:
        self.client = Client(str(path), timeout=30)
        self.latencies: list[float] = []
        self.last_started = -1.0  # time.perf_counter() when the last answered read began
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No reads meanwhile (to measure what the server does on its own)."""
        self._idle.clear()
        self._running.clear()
        self._idle.wait(30)
        try:
            yield
        finally:
            self._running.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._running.is_set():
                    self._idle.set()
                    self._running.wait()
                started = time.perf_counter()
                ids = self.client.read(vu.PciRegion.CONFIG, 0, 4)
                self.latencies.append(time.perf_counter() - started)
                if ids != IDS:
                    raise ScenarioFailed(f"b answered {ids.hex()}")
                self.last_started = started
                time.sleep(0.001)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._running.set()
        self._thread.join(60)
        self.client.close()
        if self._thread.is_alive():
            raise ScenarioFailed("b stopped answering (the probe is stuck in a read)")
        if self.error is not None:
            raise ScenarioFailed(f"b failed: {self.error!r}") from self.error

    def count(self) -> int:
        return len(self.latencies)

    def answered_since(self, since: float, timeout: float = 10.0) -> bool:
        """Whether b answered a read begun at ``since`` (time.perf_counter()) or later,
        waiting up to ``timeout`` s for one: on a loaded machine the probe thread may not
        have run at all while a scenario's client misbehaved. So this proves b is served
        again, not that it was served throughout; how long b waited during the scenario
        is what the latencies say (the section's "b max ms")."""
        deadline = time.monotonic() + timeout
        while self.last_started < since:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True


@dataclass
class Outcome:
    """What one scenario showed."""

    name: str
    latencies: list[float] = field(default_factory=list)
    fds: tuple[int, int] = (0, 0)
    rss_kib: tuple[int, int] = (0, 0)
    threads: tuple[int, int] = (0, 0)
    server_cpu_s: float = 0.0
    sessions: int = 0

    def row(self) -> JsonDict:
        ms = sorted(x * 1e3 for x in self.latencies) or [0.0]
        return {
            "scenario": self.name,
            "b_samples": len(self.latencies),
            "b_median_ms": statistics.median(ms),
            "b_p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
            "b_max_ms": ms[-1],
            "fds_before": self.fds[0], "fds_after": self.fds[1],
            "rss_kib_before": self.rss_kib[0], "rss_kib_after": self.rss_kib[1],
            "threads_before": self.threads[0], "threads_after": self.threads[1],
            "server_cpu_s": round(self.server_cpu_s, 3),
            "sessions": self.sessions,
        }


# -- the misbehaving clients ----------------------------------------------------------------


def _negotiated(path: Path) -> Client:
    return Client(str(path), timeout=30)


def _region_read(offset: int = 0, count: int = 4, msg_id: int = 7) -> bytes:
    payload = vu.REGION_ACCESS.pack(offset, vu.PciRegion.CONFIG, count)
    return vu.HEADER.pack(msg_id, vu.Command.REGION_READ, vu.HEADER.size + len(payload), 0,
                          0) + payload


def _version_message() -> bytes:
    payload = vu.build_version(0, 0, {"max_msg_fds": 16,
                                      "max_data_xfer_size": vu.MAX_DATA_XFER_SIZE})
    return vu.HEADER.pack(1, vu.Command.VERSION, vu.HEADER.size + len(payload), 0,
                          0) + payload


def wait_closed(sock: socket.socket, timeout: float) -> bool:
    """True once the server closed the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def large_message_stall(server: ServerUnderTest, probe: Probe) -> None:
    """Issue 12, input 1: the 16-byte header of a REGION_WRITE announcing 100,000 bytes,
    then nothing for HOLD seconds, then the client leaves."""
    with _negotiated(server.a) as client:
        client.sock.sendall(vu.HEADER.pack(9, vu.Command.REGION_WRITE, vu.HEADER.size + 100_000,
                                           0, 0))
        time.sleep(HOLD)


def closed_in_message(server: ServerUnderTest, probe: Probe) -> None:
    """Issue 12, input 2: 20 of the 32 bytes of a REGION_READ, then close. Afterwards the
    server must be idle (no CPU, with the probe paused)."""
    with _negotiated(server.a) as client:
        client.sock.sendall(_region_read()[:20])
    with probe.paused():
        time.sleep(0.2)
        before = cpu_seconds(server.pid)
        time.sleep(HOLD)
        spent = cpu_seconds(server.pid) - before
    if spent > 0.1 * HOLD:
        raise ScenarioFailed(f"the server spent {spent:.2f} s of CPU in {HOLD} s after a "
                             "client closed in the middle of a message")


def stall_every_offset(server: ServerUnderTest, probe: Probe) -> None:
    """Every split point of a REGION_READ: the first part, a pause, the rest; the reply
    must be right. Then every split point again, closing instead of sending the rest."""
    message = _region_read(msg_id=5)
    with _negotiated(server.a) as client:
        for split in range(1, len(message)):
            client.sock.sendall(message[:split])
            time.sleep(0.02)
            client.sock.sendall(message[split:])
            payload = client.receive(5, vu.Command.REGION_READ)
            if payload[vu.REGION_ACCESS.size:] != IDS:
                raise ScenarioFailed(f"split at {split}: a answered {payload.hex()}")
    for split in range(1, len(message)):
        with _negotiated(server.a) as client:
            client.sock.sendall(message[:split])


def stall_in_handshake(server: ServerUnderTest, probe: Probe) -> None:
    """Every split point of the VERSION message, closing after the first part: the
    handshake fails for that client (libvfio-user reads VERSION in one piece) and nothing
    else is held."""
    message = _version_message()
    for split in range(1, len(message), 3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(server.a))
            sock.sendall(message[:split])
            time.sleep(0.01)


def unfinished_with_fds(server: ServerUnderTest, probe: Probe) -> None:
    """A DMA_MAP whose header and file descriptor arrive, body missing, then close: the
    descriptor must not leak."""
    fd = os.memfd_create("hostile")
    try:
        os.ftruncate(fd, 1 << 20)
        for _ in range(20):
            with _negotiated(server.a) as client:
                header = vu.HEADER.pack(3, vu.Command.DMA_MAP,
                                        vu.HEADER.size + vu.DmaMap.sizeof(), 0, 0)
                client.sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                fd.to_bytes(4, "little"))])
                time.sleep(0.01)
    finally:
        os.close(fd)


def oversized_header(server: ServerUnderTest, probe: Probe) -> None:
    """A header announcing 4 GiB: the client is cut off at once."""
    with _negotiated(server.a) as client:
        client.sock.sendall(vu.HEADER.pack(4, vu.Command.REGION_WRITE, 0xFFFF_FFF0, 0, 0))
        if not wait_closed(client.sock, 5):
            raise ScenarioFailed("a client announcing a 4 GiB message was not cut off")


def never_reads_replies(server: ServerUnderTest, probe: Probe) -> None:
    """Requests whose replies the client never reads, until both socket buffers are full
    and the server's reply blocks; then HOLD seconds; then the client leaves."""
    with _negotiated(server.a) as client:
        client.sock.settimeout(0.5)
        request = _region_read(count=256)
        try:
            for _ in range(20_000):
                client.sock.sendall(request)
        except TimeoutError:
            pass  # the server stopped reading: its replies are stuck
        time.sleep(HOLD)


def silent_client(server: ServerUnderTest, probe: Probe) -> None:
    """A client that connects and says nothing for HOLD seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.a))
        time.sleep(HOLD)


def connect_cycles(server: ServerUnderTest, sessions: int) -> None:
    """Sessions of connect, negotiate, one read, disconnect."""
    for _ in range(sessions):
        with _negotiated(server.a) as client:
            if client.read(vu.PciRegion.CONFIG, 0, 4) != IDS:
                raise ScenarioFailed("a answered wrong during connect cycles")


SCENARIOS: dict[str, Callable[[ServerUnderTest, Probe], None]] = {
    "large-message-stall": large_message_stall,
    "closed-in-message": closed_in_message,
    "stall-every-offset": stall_every_offset,
    "stall-in-handshake": stall_in_handshake,
    "unfinished-with-fds": unfinished_with_fds,
    "oversized-header": oversized_header,
    "never-reads-replies": never_reads_replies,
    "silent-client": silent_client,
}


def served_again(server: ServerUnderTest, timeout: float = 15.0) -> None:
    """A well-behaved client of a is served (the misbehaving one is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _negotiated(server.a) as client:
                ids = client.read(vu.PciRegion.CONFIG, 0, 4)
            if ids == IDS:
                return
            raise ScenarioFailed(f"a answered {ids.hex()}")
        except (ConnectionError, TimeoutError, OSError) as exc:
            if time.monotonic() > deadline:
                raise ScenarioFailed(f"a is not served again: {exc!r}") from exc
            time.sleep(0.1)


def settle(server: ServerUnderTest, fds: int, timeout: float = 10.0) -> int:
    """The server's fd count once it is back to ``fds`` (or the last seen after timeout):
    a dropped client's fds are closed by the serving thread as it winds down."""
    deadline = time.monotonic() + timeout
    current = server.fds()
    while current != fds and time.monotonic() < deadline:
        time.sleep(0.05)
        current = server.fds()
    return current


def quiet_fds(server: ServerUnderTest, timeout: float = 10.0) -> int:
    """The server's fd count once it has held still for 0.3 s."""
    deadline = time.monotonic() + timeout
    last, since = server.fds(), time.monotonic()
    while time.monotonic() - since < 0.3 and time.monotonic() < deadline:
        time.sleep(0.05)
        current = server.fds()
        if current != last:
            last, since = current, time.monotonic()
    return last


def run_scenario(server: ServerUnderTest, name: str, sessions: int = 1000) -> Outcome:
    """One scenario with the probe on b: its figures. ScenarioFailed if b stopped
    answering, a is not served again, or the server died."""
    outcome = Outcome(name)
    fds = quiet_fds(server)  # the last scenario's last client may still be going away
    rss, threads = server.rss_kib(), server.threads()
    started = cpu_seconds(server.pid)
    with Probe(server.b) as probe:
        misbehaving_since = time.perf_counter()
        if name == "connect-cycles":
            connect_cycles(server, sessions)
            outcome.sessions = sessions
        else:
            SCENARIOS[name](server, probe)
        served_again(server)
        if not probe.answered_since(misbehaving_since):
            raise ScenarioFailed("b was not answered during or after a's client misbehaved")
    outcome.latencies = probe.latencies
    server.alive()
    outcome.server_cpu_s = cpu_seconds(server.pid) - started
    outcome.fds = (fds, settle(server, fds))
    outcome.rss_kib = (rss, server.rss_kib())
    outcome.threads = (threads, server.threads())
    return outcome


def run(settings: Settings, work: Path, argv_prefix: list[str]) -> Section:
    section = Section("hostile")
    sessions = 100 if settings.smoke else 1000
    with two_device_server(work, argv_prefix) as server:
        connect_cycles(server, 20)  # warm up: imports, allocator arenas, the thread cache
        for name in [*SCENARIOS, "connect-cycles"]:
            try:
                section.rows.append(run_scenario(server, name, sessions).row())
            except ScenarioFailed as exc:
                section.notes.append(f"{name} failed: {exc}")
                section.status = "failed"
    section.extra["hold_s"] = HOLD
    return section


def markdown(section: Section) -> list[str]:
    lines = [
        f"Misbehaving clients of device a; device b's config reads sampled meanwhile "
        f"(each misbehaviour held {section.extra.get('hold_s')} s). fds/RSS/threads: the "
        "server process before and after the scenario.",
        "",
        "| scenario | b reads | b median ms | b p99 ms | b max ms | fds before/after "
        "| RSS KiB before/after | threads before/after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in section.rows:
        name = row["scenario"] + (f" ({row['sessions']} sessions)" if row["sessions"] else "")
        lines.append(
            f"| {name} | {row['b_samples']} | {row['b_median_ms']:.2f} | {row['b_p99_ms']:.2f} "
            f"| {row['b_max_ms']:.2f} | {row['fds_before']}/{row['fds_after']} "
            f"| {row['rss_kib_before']}/{row['rss_kib_after']} "
            f"| {row['threads_before']}/{row['threads_after']} |")
    return lines
