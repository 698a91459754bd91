"""The device definitions of one server: a TOML file read with tomllib.

::

    [server]
    control = "/run/vfuserver/control.sock"   # optional: the control socket
    poll-max-ns = 32768                       # adaptive polling ceiling, ns (0: off)

    [[device]]                                # one table per device, served in this order
    name = "net0"                             # required: [A-Za-z0-9_.-], at most 64
    socket = "/run/vfuserver/net0.sock"       # required: the vfio-user socket
    profile = "modern"                        # modern (default) or transitional
    mac = "52:54:00:12:34:56"                 # default: 52:54:00 + 3 bytes derived from name
    netdev = "tap,ifname=tap0"                # --netdev syntax (default: none)

    [[device]]
    name = "disk0"
    socket = "/run/vfuserver/disk0.sock"
    type = "virtio-blk"                       # default: virtio-net
    image = "/var/lib/vfuserver/disk0.img"    # required: raw image, file or block device
    readonly = false                          # default false
    direct = false                            # O_DIRECT (default false)
    serial = "disk0"                          # GET_ID answer, at most 20 (default: empty)
    queues = 2                                # request queues, 1..64 (default 1)

Relative paths (``control``, ``socket``) are taken relative to the file's directory, as
an operator reading the file would expect whatever the server's working directory is; they
are written back absolute. Anything wrong in the file is a :class:`ConfigError` naming the
file, the device and the key: a definition is either wholly valid or the server refuses
to start, so writing the file back (``--persist``) never drops a device silently. Whether a
valid device can then be *served* (its backend, its socket) is decided per device at
runtime. :mod:`vfuserver.persist` writes changes back into the file.

``poll-max-ns`` is QEMU's IOThread setting of that name, in the same unit: how long, at
most, each device's serving thread polls its socket for the next message before it sleeps
(the window adapts below it, as QEMU's aio_poll does); 0 turns polling off. It applies to
every device of the server, those added at runtime included; ``vfuserver run
--poll-max-ns N`` takes precedence over it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfuserver.netdev.errors import NetdevSyntaxError
from vfuserver.netdev.options import TapSpec, parse_netdev
from vfuserver.spec import (
    VIRTIO_BLK,
    VIRTIO_NET,
    DeviceSpec,
    SpecError,
    check_profile,
    format_mac,
    parse_mac,
)

NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
"""Device names: they appear in log lines, CLI output columns and systemd instance names."""

SERVER_KEYS = frozenset({"control", "poll-max-ns"})
DEVICE_KEYS = frozenset({"name", "socket", "profile", "mac", "netdev", "type", "image",
                         "readonly", "direct", "serial", "queues"})
BOOLEAN_DEVICE_KEYS = frozenset({"readonly", "direct"})
INTEGER_DEVICE_KEYS = frozenset({"queues"})
REQUIRED_DEVICE_KEYS = ("name", "socket")


DEFAULT_POLL_MAX_NS = 32768
"""Adaptive polling ceiling of the serving threads, in ns (QEMU's IOThread poll-max-ns)."""

MAX_POLL_MAX_NS = 1_000_000_000
"""The largest poll-max-ns taken, in ns (1 s). QEMU takes any int64, but a thread that
polls its socket for longer than a wake-up costs (microseconds) gains nothing, while it
burns a CPU: a larger value is a slip of the unit (µs or ms meant), and refusing it keeps
serve.c's window arithmetic (doubling, start + window) far from int64 overflow."""


class ConfigError(ValueError):
    """A config file, or one definition in it, that cannot be used; the message says where."""


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"device name {name!r} is not valid: use letters, digits, '_', '.' and '-' "
            "(at most 64, not starting with '.' or '-')")
    return name


def check_poll_max_ns(value: object) -> int:
    """``value`` as a poll-max-ns (an int in 0..MAX_POLL_MAX_NS, not a bool); ConfigError
    naming the key and the range if it is not one."""
    if type(value) is not int:  # bool is an int: compare exactly
        raise ConfigError(f"poll-max-ns must be an integer (ns), not {type(value).__name__}")
    if not 0 <= value <= MAX_POLL_MAX_NS:
        raise ConfigError(f"poll-max-ns must be 0..{MAX_POLL_MAX_NS} ns (0 turns polling "
                          f"off), not {value}")
    return value


def parse_poll_max_ns(text: str) -> int:
    """A command-line poll-max-ns (decimal ns); ConfigError as :func:`check_poll_max_ns`."""
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError(f"poll-max-ns must be an integer (ns), not {text!r}") from None
    return check_poll_max_ns(value)


@dataclass
class ServerConfig:
    """What one server runs: its control socket, its serving threads' polling ceiling
    (ns, see :data:`DEFAULT_POLL_MAX_NS`) and its devices, in order."""

    control: str | None = None
    poll_max_ns: int = DEFAULT_POLL_MAX_NS
    devices: list[DeviceSpec] = field(default_factory=list)
    path: Path | None = None
    """The file this came from (and ``--persist`` writes back to)."""


def device_from_mapping(values: Mapping[str, Any], *, base: Path | None = None,
                        where: str = "device") -> DeviceSpec:
    """A :class:`DeviceSpec` from the keys of one ``[[device]]`` table (or add-device's
    arguments); ``base`` resolves a relative socket path."""
    unknown = sorted(set(values) - DEVICE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(DEVICE_KEYS))})")
    for key, value in values.items():
        wanted = (bool if key in BOOLEAN_DEVICE_KEYS
                  else int if key in INTEGER_DEVICE_KEYS else str)
        if type(value) is not wanted:  # bool is an int: compare exactly
            name = {bool: "a boolean", int: "an integer", str: "a string"}[wanted]
            raise ConfigError(f"{where}: {key} must be {name}, not {type(value).__name__}")
    for key in REQUIRED_DEVICE_KEYS:
        if not values.get(key):
            raise ConfigError(f"{where}: {key} is required")
    name = check_name(values["name"])
    where = f"{where} {name}"
    socket = _resolve(values["socket"], base)
    try:
        profile = check_profile(values.get("profile", "modern"))
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        mac = parse_mac(values["mac"]) if "mac" in values else b""
    except SpecError as exc:
        raise ConfigError(f"{where}: mac: {exc}") from None
    try:
        netdev = parse_netdev(values.get("netdev", "none"))
    except NetdevSyntaxError as exc:
        raise ConfigError(f"{where}: netdev: {exc}") from None
    image = values.get("image", "")
    try:
        return DeviceSpec(name=name, socket=socket, profile=profile, mac=mac, netdev=netdev,
                          type=values.get("type", VIRTIO_NET),
                          image=_resolve(image, base) if image else "",
                          readonly=values.get("readonly", False),
                          direct=values.get("direct", False), serial=values.get("serial", ""),
                          queues=values.get("queues", 1))
    except SpecError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def device_to_mapping(spec: DeviceSpec) -> dict[str, str | bool | int]:
    """The inverse of :func:`device_from_mapping` (every key of the type written out)."""
    if spec.type == VIRTIO_BLK:
        return {"name": spec.name, "socket": spec.socket, "profile": spec.profile,
                "type": spec.type, "image": spec.image, "readonly": spec.readonly,
                "direct": spec.direct, "serial": spec.serial, "queues": spec.queues}
    return {"name": spec.name, "socket": spec.socket, "profile": spec.profile,
            "mac": format_mac(spec.mac), "netdev": str(spec.netdev)}


def check_unique(devices: list[DeviceSpec], new: DeviceSpec | None = None) -> None:
    """Names and socket paths identify devices: no two may share one; nor a named tap,
    which only one device can have open (the second's TUNSETIFF would fail with EBUSY)."""
    seen_names: set[str] = set()
    seen_sockets: dict[str, str] = {}
    seen_taps: dict[str, str] = {}
    for spec in [*devices, *([new] if new is not None else [])]:
        if spec.name in seen_names:
            raise ConfigError(f"device {spec.name}: the name is already taken")
        other = seen_sockets.get(spec.socket)
        if other is not None:
            raise ConfigError(f"device {spec.name}: socket {spec.socket} is already "
                              f"device {other}'s")
        tap = spec.netdev.ifname if isinstance(spec.netdev, TapSpec) else ""
        if "%" in tap:  # a template (vfu%d): the kernel picks a new name for each
            tap = ""
        if tap in seen_taps:
            raise ConfigError(f"device {spec.name}: tap {tap} is already device "
                              f"{seen_taps[tap]}'s; give each device its own tap")
        seen_names.add(spec.name)
        seen_sockets[spec.socket] = spec.name
        if tap:
            seen_taps[tap] = spec.name


def parse_config(text: str, *, path: Path | None = None) -> ServerConfig:
    """Parse the TOML text of a config file (``path`` for messages and relative paths)."""
    label = str(path) if path is not None else "config"
    base = path.parent if path is not None else None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"server", "device"})
    if unknown:
        raise ConfigError(f"{label}: unknown table or key {', '.join(unknown)} "
                          "(expected [server] and [[device]])")
    server = document.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{label}: server must be a table ([server])")
    unknown = sorted(set(server) - SERVER_KEYS)
    if unknown:
        raise ConfigError(f"{label}: [server]: unknown key {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(SERVER_KEYS))})")
    control = server.get("control")
    if control is not None and (not isinstance(control, str) or not control):
        raise ConfigError(f"{label}: [server] control must be a non-empty string")
    try:
        poll_max_ns = check_poll_max_ns(server.get("poll-max-ns", DEFAULT_POLL_MAX_NS))
    except ConfigError as exc:
        raise ConfigError(f"{label}: [server] {exc}") from None
    tables = document.get("device", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{label}: devices are [[device]] tables")
    devices = [device_from_mapping(table, base=base, where=f"{label}: [[device]] #{i + 1}")
               for i, table in enumerate(tables)]
    try:
        check_unique(devices)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    return ServerConfig(control=_resolve(control, base) if control else None,
                        poll_max_ns=poll_max_ns, devices=devices, path=path)


def load_config(path: str | os.PathLike[str]) -> ServerConfig:
    file = Path(path).absolute()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from None
    return parse_config(text, path=file)


def _resolve(path: str, base: Path | None) -> str:
    if base is None or os.path.isabs(path):
        return path
    return os.path.normpath(base / path)
