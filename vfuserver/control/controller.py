"""The control plane of one server: its devices as definitions, and the commands on them.

:class:`Controller` owns what the server runs: the definitions (a :class:`ServerConfig`,
written back to its file with ``--persist``) and the running devices (a
:class:`~vfuserver.server.DeviceSet`). Its commands are QMP commands
(:mod:`vfuserver.control.qmp`): :data:`COMMANDS` lists them with their arguments and
return values; contrib/systemd/README.md documents them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from vfuserver import __version__
from vfuserver.config import ConfigError, ServerConfig, check_unique, device_from_mapping
from vfuserver.control.qmp import (
    COMMAND_NOT_FOUND,
    DEVICE_NOT_ACTIVE,
    DEVICE_NOT_FOUND,
    GENERIC_ERROR,
    JsonValue,
    QMPError,
    Version,
    command_list,
)
from vfuserver.control.server import ControlServer
from vfuserver.device import DeviceBusyError, open_device
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.errors import DeviceError
from vfuserver.persist import save_config
from vfuserver.sdnotify import Notifier
from vfuserver.server import DeviceSet, Service, describe_error, serve
from vfuserver.spec import PROFILES, VIRTIO_BLK, DeviceSpec, format_mac

log = logging.getLogger("vfuserver.control")
device_log = logging.getLogger("vfuserver")


def package_version(version: str = __version__) -> Version:
    """``version`` (vfuserver's own by default), in the greeting's and query-version's
    shape: its first three numbers, missing ones 0 (PEP 440: "0.2", "0.2.0rc1")."""
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]]
    major, minor, micro = [*numbers, 0, 0, 0][:3]
    return Version(major, minor, micro, package=f"vfuserver {version}")


class ControlledDevice(Protocol):
    """What the controller needs of a served device (vfuserver.device.ServedDevice)."""

    @property
    def profile(self) -> str: ...

    @property
    def client_attached(self) -> bool: ...

    @property
    def session_ending(self) -> bool: ...

    async def detached(self) -> bool: ...

    async def set_profile(self, profile: str) -> None: ...

    def stats(self) -> dict[str, dict[str, int]]: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


# --- arguments --------------------------------------------------------------------------------

_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer"}


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
            raise QMPError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
    checked: dict[str, Any] = {}
    for param in command.params:
        if param.name not in arguments:
            if param.required:
                raise QMPError(GENERIC_ERROR, f"Parameter '{param.name}' is missing")
            continue
        value = arguments[param.name]
        if type(value) is not param.type:  # bool is an int: compare exactly
            raise QMPError(GENERIC_ERROR, f"Invalid parameter type for '{param.name}', "
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
        self.version = package_version()
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
            with contextlib.suppress(QMPError):  # logged; the others go on
                await self._start(spec)
        task_status.started()

    async def _announce_ready(self, *, task_status: trio.TaskStatus[None]) -> None:
        self.notifier.notify(READY=1, STATUS=self.status_line())
        task_status.started()

    async def _start(self, spec: DeviceSpec) -> None:
        """Open and start one defined device; QMPError (and a log line) if it fails."""
        self._errors.pop(spec.name, None)
        if spec.name in self.device_set:
            raise QMPError(GENERIC_ERROR, f"device {spec.name} is already running")
        try:
            # A copy: the device's own spec follows its state, the definition is ours.
            device: ControlledDevice = await open_device(
                dataclasses.replace(spec), owner=self.owner,
                poll_max_ns=self.config.poll_max_ns)
            await self.device_set.start(spec.name, device)
        except Exception as exc:  # whatever stops one device is reported, the others go on
            reason = describe_error(exc)
            self._errors[spec.name] = reason
            device_log.error("device %s: cannot serve %s: %s", spec.name, spec.socket, reason)
            raise QMPError(GENERIC_ERROR, f"device {spec.name}: {reason}") from None
        if spec.type == VIRTIO_BLK:
            device_log.info("listening on %s (device %s, type %s, profile %s, image %s%s)",
                            spec.socket, spec.name, spec.type, spec.profile, spec.image,
                            ", read-only" if spec.readonly else "")
        else:
            device_log.info("listening on %s (device %s, profile %s, mac %s, netdev %s)",
                            spec.socket, spec.name, spec.profile, format_mac(spec.mac),
                            spec.netdev)

    # -- state ---------------------------------------------------------------------------------

    def definition(self, name: str) -> DeviceSpec:
        for spec in self.config.devices:
            if spec.name == name:
                return spec
        raise QMPError(DEVICE_NOT_FOUND, f"no device named {name!r}")

    def running(self, name: str) -> ControlledDevice | None:
        device = self.device_set.get(name)
        return device  # type: ignore[return-value]  # the set holds what _start put there

    def _active(self, name: str) -> ControlledDevice:
        self.definition(name)
        device = self.running(name)
        if device is None:
            raise QMPError(DEVICE_NOT_ACTIVE,
                           f"device {name} is not running: {self.failure(name)}")
        return device

    def failure(self, name: str) -> str:
        return (self.device_set.errors.get(name) or self._errors.get(name)
                or "not started")

    def describe(self, spec: DeviceSpec) -> dict[str, JsonValue]:
        device = self.running(spec.name)
        info: dict[str, JsonValue] = {
            "name": spec.name, "type": spec.type, "socket": spec.socket,
            "profile": device.profile if device is not None else spec.profile,
            **_settings(spec),
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

    def _changed(self, what: str, device: str) -> None:
        """Write the definition of ``device`` back (with --persist) after a change that is
        in effect; the file's other tables stay as the operator left them."""
        self.notifier.notify(STATUS=self.status_line())
        if not self.persist:
            return
        try:
            save_config(self.config, changed={device})
        except Exception as exc:  # OSError, ConfigError, or tomlkit refusing the file
            log.error("%s, but %s could not be written: %s", what, self.config.path, exc)
            raise QMPError(GENERIC_ERROR, f"{what}, but {self.config.path} could not be "
                                          f"written ({exc}); it is lost on restart") from None

    def _replace_definition(self, spec: DeviceSpec) -> None:
        self.config.devices = [spec if old.name == spec.name else old
                               for old in self.config.devices]

    # -- commands ------------------------------------------------------------------------------

    async def execute(self, name: str, arguments: Mapping[str, JsonValue]) -> JsonValue:
        """Run one command; its return value, or QMPError (a bug becomes one too)."""
        command = COMMANDS.get(name)
        if command is None:
            raise QMPError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
        checked = check_arguments(command, arguments)
        try:
            return await command.handler(self, checked)
        except QMPError:
            raise
        except Exception as exc:  # a bug: the client hears of it, the server goes on
            log.exception("bug in control command %r", name)
            raise QMPError(GENERIC_ERROR, f"internal error: {describe_error(exc)}") from None

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
                "type": spec.type,
                "current": device.profile if device is not None else spec.profile,
                "available": list(PROFILES),
                "changeable": (device is None or not device.client_attached
                               or device.session_ending),
            })
        return out

    async def set_profile(self, args: dict[str, Any]) -> JsonValue:
        name, profile = args["device"], args["profile"]
        async with self._lock:
            spec = self.definition(name)
            if profile not in PROFILES:
                raise QMPError(GENERIC_ERROR, f"unknown profile {profile!r}; choose one "
                                              f"of {', '.join(PROFILES)}")
            device = self.running(name)
            if device is not None:
                if not await device.detached():
                    raise QMPError(GENERIC_ERROR, _busy(name, device))
                try:
                    await device.set_profile(profile)
                except DeviceBusyError:
                    raise QMPError(GENERIC_ERROR, _busy(name, device)) from None
                except (OSError, ValueError, DeviceError) as exc:
                    raise QMPError(GENERIC_ERROR, f"device {name} stays "
                                   f"{device.profile}: {describe_error(exc)}") from None
            if spec.profile != profile:
                self._replace_definition(dataclasses.replace(spec, profile=profile))
                self._changed(f"device {name} is now {profile}", name)
            log.info("device %s: profile %s", name, profile)
        return {}

    async def query_stats(self, args: dict[str, Any]) -> JsonValue:
        if "device" in args:
            name = args["device"]
            return [{"device": name, "type": self.definition(name).type,
                     "stats": self._active(name).stats()}]
        out = []
        for spec in self.config.devices:
            device = self.running(spec.name)
            if device is not None:
                out.append({"device": spec.name, "type": spec.type, "stats": device.stats()})
        return out

    async def device_add(self, args: dict[str, Any]) -> JsonValue:
        async with self._lock:
            try:
                spec = device_from_mapping(args, where="device-add")
                if not os.path.isabs(spec.socket):
                    raise ConfigError(f"device-add: socket {spec.socket!r} must be an "
                                      "absolute path")
                if spec.image and not os.path.isabs(spec.image):
                    raise ConfigError(f"device-add: image {spec.image!r} must be an "
                                      "absolute path")
                check_unique(self.config.devices, spec)
            except ConfigError as exc:
                raise QMPError(GENERIC_ERROR, str(exc)) from None
            await self._start(spec)
            self._errors.pop(spec.name, None)
            self.config.devices.append(spec)
            self._changed(f"device {spec.name} was added", spec.name)
            return self.describe(spec)

    async def device_del(self, args: dict[str, Any]) -> JsonValue:
        name = args["name"]
        async with self._lock:
            self.definition(name)
            device = self.running(name)
            if device is not None:
                if not args.get("force", False) and not await device.detached():
                    raise QMPError(GENERIC_ERROR, _busy(name, device, force=True))
                await self.device_set.stop(name)
            self.config.devices = [spec for spec in self.config.devices if spec.name != name]
            self._errors.pop(name, None)
            self.device_set.errors.pop(name, None)
            log.info("device %s removed", name)
            self._changed(f"device {name} was removed", name)
        return {}

    async def query_version(self, args: dict[str, Any]) -> JsonValue:
        return self.version.to_json()

    async def query_commands(self, args: dict[str, Any]) -> JsonValue:
        return command_list(list(COMMANDS))


def _busy(name: str, device: ControlledDevice, *, force: bool = False) -> str:
    """Why a change that needs the device free is refused, and what to do (``force``:
    the command has a force flag)."""
    anyway = (", or remove it anyway with force (vfuserver device remove --force)"
              if force else "")
    if device.session_ending:
        return (f"device {name}: its client has gone (QEMU exited) but the session has not "
                f"ended yet (a request is still in progress): try again in a moment{anyway}")
    return (f"device {name} has a client attached (a VM uses it): shut the VM down or detach "
            f"the device (QEMU device_del) first{anyway}")


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
    Command("device-add", (Param("name", str), Param("socket", str),
                           Param("profile", str, False), Param("mac", str, False),
                           Param("netdev", str, False), Param("type", str, False),
                           Param("image", str, False), Param("readonly", bool, False),
                           Param("direct", bool, False), Param("serial", str, False),
                           Param("queues", int, False)),
            Controller.device_add, "{name, socket, profile, ...} as in query-devices"),
    Command("device-del", (Param("name", str), Param("force", bool, False)),
            Controller.device_del, "{}"),
    Command("query-version", (), Controller.query_version,
            "{qemu: {major, minor, micro}, package}: vfuserver's version"),
    Command("query-commands", (), Controller.query_commands, "[{name}]"),
]}


def _settings(spec: DeviceSpec) -> dict[str, JsonValue]:
    """What is behind a device, by type, as query-devices shows it."""
    if spec.type == VIRTIO_BLK:
        return {"image": spec.image, "readonly": spec.readonly, "direct": spec.direct,
                "serial": spec.serial, "queues": spec.queues}
    return {"mac": format_mac(spec.mac), "netdev": str(spec.netdev)}
