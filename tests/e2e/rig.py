"""Host side of the end-to-end tests: QEMU and the test guest, a private network namespace
with a tap, the vfuserver process, guest boots, and TCP endpoints for the guest's nc steps.

Every process started here is stopped by whoever started it (a context manager or a fixture
finalizer), also when a test fails or times out; namespaces are always deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .report import GuestReport, parse

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "qemu"
GET_QEMU = CONTRIB / "get-qemu.sh"
MAKE_TEST_GUEST = CONTRIB / "make-test-guest.sh"
LAUNCHER = CONTRIB / "vfuserver-qemu"

# The host end of the guest's network: a tap inside the test's namespace (QEMU user-net's
# addresses, so a plan reads like the usual setup).
TAP = "vfutap0"
HOST_ADDRESS = "10.0.2.1"
GUEST_ADDRESS = "10.0.2.15"
PREFIX_LENGTH = 24

# sched.h: setns(fd, CLONE_NEWNET) moves the calling thread into a network namespace
_CLONE_NEWNET = 0x40000000


BROKEN_QUEUE = re.compile(r":id \d+ (is not a head!|out of range)|queue failure: -\d+")
"""What Linux prints when a virtqueue breaks: virtio_ring.c's BAD_RING in
virtqueue_get_buf_ctx_split ("input.0:id 214 is not a head!"), virtio_net.c's
"Unexpected TXQ (0) queue failure: -5"."""


class RigError(Exception):
    """The test machinery itself failed (a script, a namespace, a process start)."""


def unusable_machine_reason() -> str | None:
    """Why this machine cannot run the end-to-end tests at all, or None if it can."""
    if os.geteuid() != 0:
        return "not root (network namespaces and taps need root)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (taps are impossible)"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is missing"
    return None


def _run(cmd: Sequence[str], timeout: float = 30.0) -> str:
    """Run a short command; its stdout, or RigError with its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RigError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _helper_output(script: Path, lines: int, timeout: float) -> list[str]:
    """The last `lines` stdout lines of a contrib helper; its stderr goes to ours."""
    proc = subprocess.run([str(script)], stdout=subprocess.PIPE, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    out = proc.stdout.splitlines()
    if proc.returncode != 0 or len(out) < lines:
        raise RigError(f"{script} failed with exit status {proc.returncode} (its stderr above)")
    return out[-lines:]


@dataclass(frozen=True)
class Tools:
    """A QEMU with vfio-user-pci and the test guest's kernel and initramfs."""

    qemu: Path
    kernel: Path
    initrd: Path

    @classmethod
    def prepare(cls, timeout: float = 900.0) -> Tools:
        """Run get-qemu.sh and make-test-guest.sh (fast when their results are cached)."""
        (qemu,) = _helper_output(GET_QEMU, 1, timeout)
        kernel, initrd = _helper_output(MAKE_TEST_GUEST, 2, timeout)
        return cls(Path(qemu), Path(kernel), Path(initrd))


class NamespaceNames:
    """Unique network namespace names for this process: vfu-<pid>-<n>."""

    def __init__(self) -> None:
        self._numbers = itertools.count()

    def next(self) -> str:
        return f"vfu-{os.getpid()}-{next(self._numbers)}"


class NetNamespace:
    """A network namespace of our own (`ip netns add`), deleted on exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._created = False
        self._taps: list[str] = []

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix that runs a command inside the namespace (ip execs it: same PID)."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> None:
        _run(["ip", "netns", "add", self.name])
        self._created = True
        _run(["ip", "-n", self.name, "link", "set", "lo", "up"])

    def add_tap(self, tap: str = TAP, address: str = f"{HOST_ADDRESS}/{PREFIX_LENGTH}") -> None:
        """A persistent tap (QEMU attaches to it by name) with the host's address, up."""
        _run(["ip", "-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap"])
        self._taps.append(tap)
        _run(["ip", "-n", self.name, "addr", "add", address, "dev", tap])
        _run(["ip", "-n", self.name, "link", "set", tap, "up"])

    def delete(self) -> None:
        """Delete the namespace and the taps in it; idempotent."""
        if not self._created:
            return
        self._created = False
        # taps are persistent devices: delete them explicitly, then the namespace
        for tap in self._taps:
            subprocess.run(["ip", "-n", self.name, "link", "del", tap], check=False,
                           capture_output=True, timeout=30)
        self._taps.clear()
        _run(["ip", "netns", "del", self.name])

    def __enter__(self) -> NetNamespace:
        self.create()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.delete()

    def _enter_in_this_thread(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def listening_socket(self, address: str, port: int = 0) -> socket.socket:
        """A TCP socket listening on address:port inside the namespace.

        A socket belongs to the namespace it was created in, whichever thread uses it later;
        so a short-lived thread enters the namespace (setns affects only that thread) and
        creates it there.
        """
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def work() -> None:
            try:
                self._enter_in_this_thread()
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                sock.listen(1)
                made.append(sock)
            except BaseException as exc:  # handed to the caller's thread
                failed.append(exc)

        thread = threading.Thread(target=work, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        if failed:
            raise RigError(f"cannot listen on {address}:{port} in {self.name}") from failed[0]
        return made[0]


class _OneConnection:
    """Serves one TCP connection accepted in a namespace, in a daemon thread."""

    def __init__(self, ns: NetNamespace, address: str, timeout: float) -> None:
        self._listener = ns.listening_socket(address)
        self._listener.settimeout(timeout)
        self.port: int = self._listener.getsockname()[1]
        self._timeout = timeout
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True,
                                        name=f"{type(self).__name__}-{self.port}")
        self._thread.start()

    def _main(self) -> None:
        try:
            conn, _ = self._listener.accept()
            with conn:
                conn.settimeout(self._timeout)
                self._serve(conn)
        except BaseException as exc:  # reported by wait()
            self._error = exc
        finally:
            self._listener.close()
            self._done.set()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def wait(self, timeout: float = 10.0) -> None:
        """Wait until the connection is over; RigError if it failed or never came."""
        if not self._done.wait(timeout):
            raise RigError(f"{type(self).__name__} on port {self.port}: still busy")
        if self._error is not None:
            raise RigError(f"{type(self).__name__} on port {self.port}: {self._error!r}")

    def close(self) -> None:
        """Stop listening (wakes a pending accept)."""
        with contextlib.suppress(OSError):  # not listening any more
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class TcpSink(_OneConnection):
    """Counts and hashes (sha256) everything one client sends until it closes (nc-send)."""

    def __init__(self, ns: NetNamespace, address: str = HOST_ADDRESS,
                 timeout: float = 120.0) -> None:
        self.received = 0
        self._hash = hashlib.sha256()
        super().__init__(ns, address, timeout)

    def _serve(self, conn: socket.socket) -> None:
        while chunk := conn.recv(1 << 16):
            self.received += len(chunk)
            self._hash.update(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class TcpSource(_OneConnection):
    """Sends `data` to one client and closes (the guest's nc-recv)."""

    def __init__(self, ns: NetNamespace, data: bytes, address: str = HOST_ADDRESS,
                 timeout: float = 120.0) -> None:
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        super().__init__(ns, address, timeout)

    def _serve(self, conn: socket.socket) -> None:
        conn.sendall(self.data)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(1 << 16):  # until the client closes too
            pass


def find_vfuserver() -> Path | None:
    """The vfuserver console script of the Python running the tests (its venv)."""
    candidate = Path(sys.executable).parent / "vfuserver"
    if candidate.is_file():
        return candidate
    found = shutil.which("vfuserver")
    return Path(found) if found else None


class LoggedProcess:
    """A child process whose output goes to a log file; stopped with SIGTERM, SIGKILL after
    a timeout. Shared by the e2e rig, the control-plane tests and the benchmarks."""

    process: subprocess.Popen[bytes] | None
    log_path: Path

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after timeout; the exit status (idempotent)."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


class VfuServer(LoggedProcess):
    """`vfuserver run --socket PATH ...` inside a namespace, its log captured in a file."""

    what = "vfuserver"
    """How errors name the server (a subclass may run another vfio-user server)."""

    def __init__(self, exe: Path, socket_path: Path, log_path: Path,
                 ns: NetNamespace | None = None, args: Sequence[str] = (),
                 log_level: str = "debug", env: dict[str, str] | None = None) -> None:
        self.socket_path = socket_path
        self.env = None if env is None else {**os.environ, **env}
        """The server's environment: ours plus ``env``."""
        self.log_path = log_path
        prefix = ns.exec_prefix if ns is not None else []
        self.command = [*prefix, str(exe), "--log-level", log_level, "run",
                        "--socket", str(socket_path), *args]
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until the socket exists."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while not self.socket_path.is_socket():
            if self.process.poll() is not None:
                self.stop()
                raise RigError(f"{self.what} exited ({self.returncode}) before creating "
                               f"{self.socket_path}; its log:\n{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RigError(f"{self.what} made no {self.socket_path} in {timeout} s; "
                               f"its log:\n{self.log}")
            time.sleep(0.05)


    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of a regex (re.MULTILINE) in the log, waiting up to timeout."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no /{pattern}/ in the vfuserver log within "
                                     f"{timeout} s:\n{self.log}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> int | None:
        self.returncode = super().stop(timeout)
        return self.returncode


@dataclass
class GuestRun:
    """One boot of the test guest: what QEMU printed and what the guest reported."""

    command: list[str]
    returncode: int | None  # QEMU's; None when the host's timeout killed it
    console_path: Path
    console: str
    seconds: float
    report: GuestReport

    @property
    def killed(self) -> bool:
        return self.returncode is None

    def describe(self, tail: int = 60) -> str:
        lines = self.console.splitlines()[-tail:]
        return "\n".join([
            f"guest run: {' '.join(self.command)}",
            f"QEMU exit status {self.returncode}, {self.seconds:.1f} s, console in "
            f"{self.console_path}",
            self.report.summary(),
            f"--- last {len(lines)} console lines ---",
            *lines,
        ])

    def check_complete(self) -> GuestReport:
        """The report, once the guest is known to have run its whole plan with its modules."""
        if not self.report.complete or self.report.failed_modules:
            raise AssertionError(f"the guest did not run its plan cleanly\n{self.describe()}")
        return self.report

    def check_passed(self) -> GuestReport:
        """The report, once every step is known to have passed and no virtqueue broke."""
        self.check_complete()
        return self.check_clean()

    def check_clean(self) -> GuestReport:
        """The report, once no module or step that ran failed and no virtqueue broke; the
        plan may have been cut short (the host stopped the VM on purpose)."""
        report = self.report
        if report.failed_modules:
            raise AssertionError(f"guest modules failed\n{self.describe()}")
        if report.failed_steps:
            raise AssertionError(f"guest steps failed\n{self.describe()}")
        broken = self.broken_queue_lines()
        if broken:
            raise AssertionError(f"a virtqueue broke in the guest: {broken}\n{self.describe()}")
        return report

    def broken_queue_lines(self) -> list[str]:
        """Console lines where the guest's virtio_ring declared a queue broken (BAD_RING:
        "id N is not a head!", "id N out of range", ...) or virtio_net saw it fail."""
        return [line.strip() for line in self.console.splitlines()
                if BROKEN_QUEUE.search(line)]


def boot_guest(tools: Tools, console_path: Path, plan: str, *, ns: NetNamespace | None = None,
               append: str = "", sockets: Iterable[Path] = (), builtin_net: Iterable[str] = (),
               no_shared_memory: bool = False, timeout: float = 60.0,
               qemu_args: Sequence[str] = (), smp: int = 1) -> GuestRun:
    """Boot the test guest with the launcher (inside ns) and wait until QEMU ends.

    QEMU is killed after timeout seconds, or on any exception; the guest's own watchdog
    (vfu.timeout) fires a few seconds earlier, so a hung plan is still reported.
    """
    watchdog = max(int(timeout) - 10, 5)
    # loglevel=5: the kernel's informational messages (a late "tsc: Refined TSC
    # clocksource calibration", printed while the init script writes a report line) stay
    # off the console, where they could land inside a report line; warnings and errors,
    # such as a broken virtqueue's (BROKEN_QUEUE), still show
    cmdline = (f"console=ttyS0 loglevel=5 panic=-1 vfu.timeout={watchdog} vfu.plan={plan} "
               f"{append}").strip()
    cmd = [*(ns.exec_prefix if ns is not None else []), sys.executable, str(LAUNCHER),
           "--qemu", str(tools.qemu), "--kernel", str(tools.kernel),
           "--initrd", str(tools.initrd), "--append", cmdline, "--smp", str(smp)]
    for path in sockets:
        cmd += ["--socket", str(path)]
    for net in builtin_net:
        cmd += ["--builtin-net", net]
    if no_shared_memory:
        cmd.append("--no-shared-memory")
    if qemu_args:
        cmd += ["--", *qemu_args]

    started = time.monotonic()
    returncode: int | None = None
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = console_path.read_bytes().decode(errors="replace")
    return GuestRun(cmd, returncode, console_path, text, time.monotonic() - started, parse(text))


class Servers:
    """Starts vfuserver processes for one test and stops them all at the end."""

    def __init__(self, exe: Path, directory: Path, ns: NetNamespace | None) -> None:
        self._exe = exe
        self._directory = directory
        self._ns = ns
        # UNIX socket paths are limited to 108 bytes: keep them short, out of tmp_path
        self._socket_dir = Path(tempfile.mkdtemp(prefix="vfu-"))
        self.started: list[VfuServer] = []

    def start(self, *args: str, name: str = "net0", log_level: str = "debug") -> VfuServer:
        """`vfuserver run --socket <tmp>/<name>.sock ARGS...`, ready when this returns."""
        server = VfuServer(self._exe, self._socket_dir / f"{name}.sock",
                           self._directory / f"vfuserver-{name}.log", self._ns, args, log_level)
        self.started.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        try:
            for server in self.started:
                server.stop()
        finally:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


class Guests:
    """Boots the test guest for one test, in its namespace, console logs in directory."""

    def __init__(self, tools: Tools, directory: Path, ns: NetNamespace | None) -> None:
        self._tools = tools
        self._directory = directory
        self._ns = ns
        self.runs: list[GuestRun] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()

    def boot(self, plan: str, *, append: str = "", sockets: Iterable[Path] = (),
             builtin_net: Iterable[str] = (), no_shared_memory: bool = False,
             timeout: float = 60.0, qemu_args: Sequence[str] = ()) -> GuestRun:
        with self._lock:  # boots may run in parallel threads (two VMs talking)
            path = self._directory / f"console-{next(self._numbers)}.log"
        run = boot_guest(self._tools, path, plan, ns=self._ns, append=append, sockets=sockets,
                         builtin_net=builtin_net, no_shared_memory=no_shared_memory,
                         timeout=timeout, qemu_args=qemu_args)
        self.runs.append(run)
        return run
