"""Helpers of the control-plane tests: a server in-process or as a `vfuserver run` process,
the CLI as a process, raw QMP sessions, and short vfio-user sessions.

In-process servers run :meth:`Controller.run` in the test's trio loop with real
ServedDevice objects over the real libvfio-user; the clients (qemu.qmp through the CLI's
client, raw sockets, vfuserver.client.Client) run in worker threads, as QEMU's would run
elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from tests.e2e.rig import LoggedProcess
from vfuserver.client import Client
from vfuserver.config import ServerConfig, device_from_mapping
from vfuserver.control.client import execute as client_execute
from vfuserver.control.controller import Controller
from vfuserver.control.qmp import JsonValue
from vfuserver.protocol import vfio_user as vu
from vfuserver.spec import DeviceSpec

VENDOR_DEVICE_MODERN = bytes.fromhex("f41a4110")  # 1af4:1041, little-endian in config space
VENDOR_DEVICE_TRANSITIONAL = bytes.fromhex("f41a0010")  # 1af4:1000
CLI = [sys.executable, "-m", "vfuserver.cli"]


def spec(directory: Path, name: str, **keys: str) -> DeviceSpec:
    """A device listening on directory/NAME.sock, other keys as in a [[device]] table."""
    return device_from_mapping({"name": name, "socket": str(directory / f"{name}.sock"),
                                **keys})


async def start_controller(nursery: trio.Nursery, config: ServerConfig,
                           **kwargs: Any) -> Controller:
    """A Controller serving ``config`` in ``nursery``; every socket exists on return."""
    controller = Controller(config, **kwargs)
    await nursery.start(controller.run)
    return controller


async def execute(path: str | Path, command: str, **arguments: JsonValue) -> JsonValue:
    """One command on the control socket, through the CLI's client (qemu.qmp)."""
    return await trio.to_thread.run_sync(
        lambda: client_execute(str(path), command, arguments, timeout=10))


class RawSession:
    """A QMP session by hand over a plain socket: what a client sends is up to the test."""

    def __init__(self, path: str | Path, *, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.receive()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.receive() == {"return": {}}

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def receive(self) -> dict[str, JsonValue]:
        """The next message; a line must end in CRLF (qmp-spec "General Definitions")."""
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        message: dict[str, JsonValue] = json.loads(line)
        return message

    def request(self, request: dict[str, JsonValue]) -> dict[str, JsonValue]:
        self.send(json.dumps(request).encode())
        return self.receive()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def request(path: str | Path, request: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """One raw request object after negotiation; the raw reply object."""

    def session() -> dict[str, JsonValue]:
        with RawSession(path) as raw:
            return raw.request(request)

    return await trio.to_thread.run_sync(session)


def read_ids(socket_path: str | Path) -> bytes:
    """Connect as a vfio-user client (VERSION), read vendor and device ID from config space."""
    with Client(str(socket_path), timeout=10) as client:
        return client.read(vu.PciRegion.CONFIG, 0, 4)


async def ids_of(socket_path: str | Path) -> bytes:
    return await trio.to_thread.run_sync(read_ids, socket_path)


def run_cli(*args: str, control: Path | None = None, timeout: float = 30,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vfuserver ARGS [--control PATH]` as a process; its exit status and output."""
    command = [*CLI, *args, *(["--control", str(control)] if control is not None else [])]
    environment = {k: v for k, v in os.environ.items() if k != "VFUSERVER_CONTROL"}
    environment.update(env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False, env=environment, stdin=subprocess.DEVNULL)


class ServerProcess(LoggedProcess):
    """`vfuserver run ARGS` as a process, its log in a file; ready once ``wait_for`` exist."""

    def __init__(self, args: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.command = [*CLI, "--log-level", "debug", "run", *args]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: Sequence[Path] = (), timeout: float = 20) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while not all(path.is_socket() for path in wait_for):
            if self.process.poll() is not None:
                raise AssertionError(f"vfuserver exited ({self.process.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"no {list(map(str, wait_for))} in {timeout} s:\n{self.log}")
            time.sleep(0.05)
        return self




@contextmanager
def server_process(args: Sequence[str], log_path: Path, wait_for: Sequence[Path] = (),
                   env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A running `vfuserver run ARGS`, stopped on the way out (its log printed on failure)."""
    server = ServerProcess(args, log_path, env)
    try:
        yield server.start(wait_for)
    finally:
        server.stop()
        print(f"=== {' '.join(server.command)}\n{server.log}")
