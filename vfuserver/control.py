"""The control plane of one server: its devices as definitions, and a control socket.

:class:`Controller` owns what the server runs: the definitions (a :class:`ServerConfig`,
written back to its file with ``--persist``) and the running devices (a
:class:`~vfuserver.server.DeviceSet`). :class:`ControlServer` serves a QMP-like protocol
on a UNIX socket, owner-only:

* one JSON object per line, UTF-8, at most :data:`MAX_MESSAGE` bytes; requests are answered
  in order, one reply line each; there is no greeting and no capability negotiation (a
  client may write its first request at once: ``echo '{"execute":"query-devices"}' | socat
  - UNIX-CONNECT:PATH``);
* request ``{"execute": NAME, "arguments": {...}, "id": ANY}`` ("arguments" and "id" are
  optional; "id" is echoed in the reply);
* reply ``{"return": VALUE}`` or ``{"error": {"class": CLASS, "desc": TEXT}}``, with QMP's
  classes (qapi/error.json): GenericError, CommandNotFound, DeviceNotFound,
  DeviceNotActive; messages that are not JSON, not an object, too long or carry invalid
  arguments get a GenericError and the connection goes on.

The commands and the shapes of their arguments and return values are in :data:`COMMANDS`
and in contrib/systemd/README.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from vfuserver.config import (
    ConfigError,
    ServerConfig,
    check_unique,
    device_from_mapping,
    save_config,
)
from vfuserver.context import prepare_socket_path
from vfuserver.device import DeviceBusyError, open_device
from vfuserver.devices.admin import AdminOwner
from vfuserver.sdnotify import Notifier
from vfuserver.server import DeviceSet, Service, describe_error, serve
from vfuserver.spec import PROFILES, DeviceSpec, format_mac

log = logging.getLogger("vfuserver.control")
device_log = logging.getLogger("vfuserver")

MAX_MESSAGE = 64 * 1024
"""Longest request line; a longer one is answered with an error and skipped."""
MAX_CONNECTIONS = 32
"""Control connections served at once; more wait in the listen backlog."""
LISTEN_BACKLOG = 16

JsonValue = Any
"""What json.loads returns and json.dumps takes."""

# QMP's error classes (qapi/error.json, ErrorClass).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"


class CommandError(Exception):
    """A request that fails: becomes the reply's error object."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def reply(self) -> dict[str, JsonValue]:
        return {"error": {"class": self.error_class, "desc": self.desc}}


class ControlledDevice(Protocol):
    """What the controller needs of a served device (vfuserver.device.ServedDevice)."""

    @property
    def profile(self) -> str: ...

    @property
    def client_attached(self) -> bool: ...

    async def set_profile(self, profile: str) -> None: ...

    def stats(self) -> dict[str, dict[str, int]]: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


# --- arguments --------------------------------------------------------------------------------

_TYPE_NAMES = {str: "string", bool: "boolean"}


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    required: bool = True


@dataclass(frozen=True)
class Command:
    name: str
    params: tuple[Param, ...]
    handler: Callable[[Controller, dict[str, Any]], Awaitable[JsonValue]]
    doc: str


def check_arguments(command: Command, arguments: Mapping[str, JsonValue]) -> dict[str, Any]:
    """QMP's argument checks and messages (qapi/qobject-input-visitor.c)."""
    known = {param.name: param for param in command.params}
    for key in arguments:
        if key not in known:
            raise CommandError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
    checked: dict[str, Any] = {}
    for param in command.params:
        if param.name not in arguments:
            if param.required:
                raise CommandError(GENERIC_ERROR, f"Parameter '{param.name}' is missing")
            continue
        value = arguments[param.name]
        if type(value) is not param.type:  # bool is an int: compare exactly
            raise CommandError(GENERIC_ERROR, f"Invalid parameter type for '{param.name}', "
                                              f"expected: {_TYPE_NAMES[param.type]}")
        checked[param.name] = value
    return checked


# --- the controller ---------------------------------------------------------------------------

class Controller:
    """The definitions and the running devices of one server, and the commands on them.

    A definition whose device cannot be served (its backend, its socket) stays defined and
    is shown as failed, with the reason; ``--persist`` never drops it. Commands that change
    anything run one at a time.
    """

    def __init__(self, config: ServerConfig, *, persist: bool = False,
                 notifier: Notifier | None = None) -> None:
        if persist and config.path is None:
            raise ValueError("persist needs a config file to write to")
        self.config = config
        self.persist = persist
        self.notifier = notifier or Notifier(None)
        self.device_set = DeviceSet()
        self.owner = AdminOwner()  # one admin group owner per server process
        self._errors: dict[str, str] = {}  # why a defined device could not be started
        self._lock = trio.Lock()

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, stop_when_empty: bool = False,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> signal.Signals | None:
        """Serve every defined device and the control socket until SIGINT or SIGTERM.

        ``task_status.started()`` once every socket exists; that is also when the service
        manager is told READY=1. See :func:`vfuserver.server.serve` for the return value.
        """
        services: list[Service] = [self._start_defined_devices]
        if self.config.control is not None:
            control = ControlServer(self.config.control, self)
            control.bind()  # a socket that cannot be had stops the server before it starts
            services.append(control.run)
        services.append(self._announce_ready)
        try:
            return await serve(device_set=self.device_set, services=services,
                               stop_when_empty=stop_when_empty, task_status=task_status)
        finally:
            self.notifier.notify(STOPPING=1, STATUS="stopping")

    async def _start_defined_devices(self, *,
                                     task_status: trio.TaskStatus[None]) -> None:
        for spec in self.config.devices:
            with contextlib.suppress(CommandError):  # logged; the others go on
                await self._start(spec)
        task_status.started()

    async def _announce_ready(self, *, task_status: trio.TaskStatus[None]) -> None:
        self.notifier.notify(READY=1, STATUS=self.status_line())
        task_status.started()

    async def _start(self, spec: DeviceSpec) -> None:
        """Open and start one defined device; CommandError (and a log line) if it fails."""
        self._errors.pop(spec.name, None)
        if spec.name in self.device_set:
            raise CommandError(GENERIC_ERROR, f"device {spec.name} is already running")
        try:
            # A copy: the device's own spec follows its state, the definition is ours.
            device: ControlledDevice = await open_device(dataclasses.replace(spec),
                                                         owner=self.owner)
            await self.device_set.start(spec.name, device)
        except Exception as exc:  # whatever stops one device is reported, the others go on
            reason = describe_error(exc)
            self._errors[spec.name] = reason
            device_log.error("device %s: cannot serve %s: %s", spec.name, spec.socket, reason)
            raise CommandError(GENERIC_ERROR, f"device {spec.name}: {reason}") from None
        device_log.info("listening on %s (device %s, profile %s, mac %s, netdev %s)",
                        spec.socket, spec.name, spec.profile, format_mac(spec.mac), spec.netdev)

    # -- state ---------------------------------------------------------------------------------

    def definition(self, name: str) -> DeviceSpec:
        for spec in self.config.devices:
            if spec.name == name:
                return spec
        raise CommandError(DEVICE_NOT_FOUND, f"no device named {name!r}")

    def running(self, name: str) -> ControlledDevice | None:
        device = self.device_set.get(name)
        return device  # type: ignore[return-value]  # the set holds what _start put there

    def _active(self, name: str) -> ControlledDevice:
        self.definition(name)
        device = self.running(name)
        if device is None:
            raise CommandError(DEVICE_NOT_ACTIVE,
                               f"device {name} is not running: {self.failure(name)}")
        return device

    def failure(self, name: str) -> str:
        return (self.device_set.errors.get(name) or self._errors.get(name)
                or "not started")

    def describe(self, spec: DeviceSpec) -> dict[str, JsonValue]:
        device = self.running(spec.name)
        info: dict[str, JsonValue] = {
            "name": spec.name, "socket": spec.socket,
            "profile": device.profile if device is not None else spec.profile,
            "mac": format_mac(spec.mac), "netdev": str(spec.netdev),
            "state": "running" if device is not None else "failed",
            "client-attached": device is not None and device.client_attached,
        }
        if device is None:
            info["error"] = self.failure(spec.name)
        return info

    def status_line(self) -> str:
        total = len(self.config.devices)
        failed = [spec.name for spec in self.config.devices if self.running(spec.name) is None]
        text = f"serving {total - len(failed)} of {total} devices"
        if failed:
            text += f"; failed: {', '.join(failed)}"
        if self.config.control is not None:
            text += f"; control {self.config.control}"
        return text

    def _changed(self, what: str) -> None:
        """Write the definitions back (with --persist) after a change that is in effect."""
        self.notifier.notify(STATUS=self.status_line())
        if not self.persist:
            return
        try:
            save_config(self.config)
        except OSError as exc:
            log.error("%s, but %s could not be written: %s", what, self.config.path, exc)
            raise CommandError(GENERIC_ERROR, f"{what}, but {self.config.path} could not be "
                                              f"written ({exc}); it is lost on restart") from None

    def _replace_definition(self, spec: DeviceSpec) -> None:
        self.config.devices = [spec if old.name == spec.name else old
                               for old in self.config.devices]

    # -- commands ------------------------------------------------------------------------------

    async def query_devices(self, args: dict[str, Any]) -> JsonValue:
        return [self.describe(spec) for spec in self.config.devices]

    async def query_profiles(self, args: dict[str, Any]) -> JsonValue:
        specs = ([self.definition(args["device"])] if "device" in args
                 else self.config.devices)
        out = []
        for spec in specs:
            device = self.running(spec.name)
            out.append({
                "device": spec.name,
                "current": device.profile if device is not None else spec.profile,
                "available": list(PROFILES),
                "changeable": device is None or not device.client_attached,
            })
        return out

    async def set_profile(self, args: dict[str, Any]) -> JsonValue:
        name, profile = args["device"], args["profile"]
        async with self._lock:
            spec = self.definition(name)
            if profile not in PROFILES:
                raise CommandError(GENERIC_ERROR, f"unknown profile {profile!r}; choose one "
                                                  f"of {', '.join(PROFILES)}")
            device = self.running(name)
            if device is not None:
                if device.client_attached:
                    raise CommandError(GENERIC_ERROR, _busy(name))
                try:
                    await device.set_profile(profile)
                except DeviceBusyError:
                    raise CommandError(GENERIC_ERROR, _busy(name)) from None
                except (OSError, ValueError) as exc:
                    raise CommandError(GENERIC_ERROR, f"device {name} stays "
                                       f"{device.profile}: {describe_error(exc)}") from None
            if spec.profile != profile:
                self._replace_definition(dataclasses.replace(spec, profile=profile))
                self._changed(f"device {name} is now {profile}")
            log.info("device %s: profile %s", name, profile)
        return {}

    async def query_stats(self, args: dict[str, Any]) -> JsonValue:
        if "device" in args:
            name = args["device"]
            return [{"device": name, "stats": self._active(name).stats()}]
        out = []
        for spec in self.config.devices:
            device = self.running(spec.name)
            if device is not None:
                out.append({"device": spec.name, "stats": device.stats()})
        return out

    async def add_device(self, args: dict[str, Any]) -> JsonValue:
        async with self._lock:
            try:
                spec = device_from_mapping(args, where="add-device")
                if not os.path.isabs(spec.socket):
                    raise ConfigError(f"add-device: socket {spec.socket!r} must be an "
                                      "absolute path")
                check_unique(self.config.devices, spec)
            except ConfigError as exc:
                raise CommandError(GENERIC_ERROR, str(exc)) from None
            await self._start(spec)
            self._errors.pop(spec.name, None)
            self.config.devices.append(spec)
            self._changed(f"device {spec.name} was added")
            return self.describe(spec)

    async def remove_device(self, args: dict[str, Any]) -> JsonValue:
        name = args["name"]
        async with self._lock:
            self.definition(name)
            device = self.running(name)
            if device is not None:
                if device.client_attached and not args.get("force", False):
                    raise CommandError(GENERIC_ERROR, (
                        f"device {name} has a client attached (a VM uses it): shut the VM "
                        "down or detach the device (QEMU device_del) first, or remove it "
                        "anyway with force"))
                await self.device_set.stop(name)
            self.config.devices = [spec for spec in self.config.devices if spec.name != name]
            self._errors.pop(name, None)
            self.device_set.errors.pop(name, None)
            log.info("device %s removed", name)
            self._changed(f"device {name} was removed")
        return {}

    async def query_commands(self, args: dict[str, Any]) -> JsonValue:
        return [{"name": name} for name in COMMANDS]

    # -- the protocol ----------------------------------------------------------------------------

    async def execute_line(self, line: bytes) -> dict[str, JsonValue]:
        """One request line in, one reply object out; never raises for what a client sends."""
        try:
            request = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return CommandError(GENERIC_ERROR, f"JSON parse error: {exc}").reply()
        if not isinstance(request, dict):
            return CommandError(GENERIC_ERROR, "QMP input must be a JSON object").reply()
        reply = await self.execute(request)
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    async def execute(self, request: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
        try:
            for key in request:
                if key not in ("execute", "arguments", "id"):
                    raise CommandError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
            if "execute" not in request:
                raise CommandError(GENERIC_ERROR, "QMP input lacks member 'execute'")
            name = request["execute"]
            if not isinstance(name, str):
                raise CommandError(GENERIC_ERROR, "QMP input member 'execute' must be a string")
            arguments = request.get("arguments", {})
            if not isinstance(arguments, dict):
                raise CommandError(GENERIC_ERROR,
                                   "QMP input member 'arguments' must be an object")
            command = COMMANDS.get(name)
            if command is None:
                raise CommandError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
            return {"return": await command.handler(self, check_arguments(command, arguments))}
        except CommandError as exc:
            return exc.reply()
        except Exception as exc:  # a bug: the client hears of it, the server goes on
            log.exception("bug in control command %r", request.get("execute"))
            return CommandError(GENERIC_ERROR, f"internal error: {describe_error(exc)}").reply()


def _busy(name: str) -> str:
    return (f"device {name} has a client attached (a VM uses it): shut the VM down or detach "
            "the device (QEMU device_del) first, then set the profile")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


COMMANDS: dict[str, Command] = {command.name: command for command in [
    Command("query-devices", (), Controller.query_devices,
            "[{name, socket, profile, mac, netdev, state: running|failed, client-attached, "
            "error?}]"),
    Command("query-profiles", (Param("device", str, False),), Controller.query_profiles,
            "[{device, current, available: [profile], changeable}]"),
    Command("set-profile", (Param("device", str), Param("profile", str)),
            Controller.set_profile, "{}"),
    Command("query-stats", (Param("device", str, False),), Controller.query_stats,
            "[{device, stats: {group: {counter: int}}}]"),
    Command("add-device", (Param("name", str), Param("socket", str),
                           Param("profile", str, False), Param("mac", str, False),
                           Param("netdev", str, False)),
            Controller.add_device, "{name, socket, profile, ...} as in query-devices"),
    Command("remove-device", (Param("name", str), Param("force", bool, False)),
            Controller.remove_device, "{}"),
    Command("query-commands", (), Controller.query_commands, "[{name}]"),
]}


# --- the socket -------------------------------------------------------------------------------

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)


def peer_uid(sock: trio.socket.SocketType) -> int:
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return int(uid)


class ControlServer:
    """The control socket: owner-only (0600), and peers of another uid are refused.

    The file mode keeps other users out; the SO_PEERCRED check also refuses root's peers
    when the server runs as another user, and anything that got hold of a connected fd.
    """

    def __init__(self, path: str, controller: Controller, *,
                 owner_uid: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self.controller = controller
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self._sock: socket.socket | None = None

    def bind(self) -> socket.socket:
        """Create the socket file (0600) and listen; OSError says why not. Idempotent."""
        if self._sock is not None:
            return self._sock
        prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old_umask = os.umask(0o177)  # the socket file is created owner-only (0600)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"control socket {self.path}: {exc.strerror}") from exc
        self._sock = sock
        return sock

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Listen (the socket exists when started), serve until cancelled, remove the file."""
        sock = self.bind()
        inode = os.stat(self.path).st_ino
        try:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            log.info("control socket %s", self.path)
            async with trio.open_nursery() as nursery:
                task_status.started()
                async with listener:
                    while True:
                        await self._slots.acquire()
                        try:
                            stream = await listener.accept()
                        except OSError as exc:
                            self._slots.release()
                            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                                 errno.ENOMEM):
                                raise
                            log.warning("control socket: cannot accept: %s", exc)
                            await trio.sleep(0.1)
                            continue
                        nursery.start_soon(self._connection, stream)
        finally:
            sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == inode:
                    os.unlink(self.path)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                uid = peer_uid(stream.socket)
                if uid != self.owner_uid:
                    log.warning("control socket: refused a peer of uid %d (the server's is %d)",
                                uid, self.owner_uid)
                    await _send(stream, CommandError(
                        GENERIC_ERROR, f"permission denied: only uid {self.owner_uid} may "
                                       "control this server").reply())
                    return
                await self._serve_requests(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("bug in a control connection (closed; the server goes on)")
        finally:
            self._slots.release()

    async def _serve_requests(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        skipping = False  # inside a line that was too long: drop it up to its newline
        while True:
            data = await stream.receive_some(MAX_MESSAGE)
            if not data:
                if buffer.strip() and not skipping:  # a last request without its newline
                    await _send(stream, await self.controller.execute_line(bytes(buffer)))
                return
            buffer += data
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) > MAX_MESSAGE:
                        if not skipping:
                            await _send(stream, _too_long())
                        skipping = True
                        buffer.clear()
                    break
                line = bytes(buffer[:end])
                del buffer[:end + 1]
                if skipping:
                    skipping = False
                    continue
                if len(line) > MAX_MESSAGE:
                    await _send(stream, _too_long())
                    continue
                if line.strip():
                    await _send(stream, await self.controller.execute_line(line))


def _too_long() -> dict[str, JsonValue]:
    return CommandError(GENERIC_ERROR, f"message longer than {MAX_MESSAGE} bytes "
                                       "(ignored up to its end of line)").reply()


async def _send(stream: trio.SocketStream, reply: Mapping[str, JsonValue]) -> None:
    await stream.send_all(json.dumps(reply, separators=(",", ":")).encode() + b"\n")


# --- the client -------------------------------------------------------------------------------

CLIENT_TIMEOUT = 60.0
"""Seconds a client waits for a reply (add-device opens a backend, which may take a while)."""


class ControlUnreachable(OSError):
    """No server answers at the control socket (or it hung up / stopped answering)."""


class ServerError(Exception):
    """The server answered a request with an error object."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class ControlClient:
    """A synchronous client of the control socket (the CLI's, and the tests')."""

    def __init__(self, path: str, *, timeout: float | None = CLIENT_TIMEOUT) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise ControlUnreachable(exc.errno, f"cannot reach the server at {path}: "
                                                f"{exc.strerror or exc}") from exc
        self._file = self.sock.makefile("rb")

    def send_line(self, line: bytes) -> None:
        try:
            self.sock.sendall(line + b"\n")
        except OSError as exc:
            raise ControlUnreachable(exc.errno, f"{self.path}: {exc}") from exc

    def receive(self) -> dict[str, JsonValue]:
        """The next reply object."""
        try:
            line = self._file.readline(16 * MAX_MESSAGE)
        except OSError as exc:  # a timeout is an OSError too
            raise ControlUnreachable(exc.errno, f"{self.path}: no reply: {exc}") from exc
        if not line.endswith(b"\n"):
            raise ControlUnreachable(errno.ECONNRESET, f"{self.path}: the server hung up")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ControlUnreachable(errno.EPROTO, f"{self.path}: not a reply: {line!r}")
        return reply

    def request(self, request: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
        """Send one request object; its raw reply object."""
        try:
            self.send_line(json.dumps(request).encode())
        except ControlUnreachable as exc:
            try:  # a server that hangs up (a refused peer) says why first
                return self.receive()
            except ControlUnreachable:
                raise exc from None
        return self.receive()

    def execute(self, command: str, **arguments: JsonValue) -> JsonValue:
        """Run a command; its return value, or ServerError."""
        request: dict[str, JsonValue] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        reply = self.request(request)
        if "error" in reply:
            error = reply["error"]
            raise ServerError(str(error.get("class")), str(error.get("desc")))
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
