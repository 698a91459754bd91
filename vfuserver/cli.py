"""The ``vfuserver`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

from vfuserver.config import (
    DEFAULT_POLL_MAX_NS,
    MAX_POLL_MAX_NS,
    ConfigError,
    ServerConfig,
    check_name,
    load_config,
    parse_poll_max_ns,
)
from vfuserver.control.client import ControlUnreachable, ServerError, execute
from vfuserver.control.qmp import JsonValue
from vfuserver.netdev import NETDEV_HELP, NetdevSyntaxError, NoneSpec, parse_netdev
from vfuserver.spec import (
    DEVICE_TYPES,
    PROFILES,
    VIRTIO_BLK,
    VIRTIO_NET,
    DeviceSpec,
    SpecError,
    check_serial,
    default_mac,
    parse_mac,
    parse_queues,
)

log = logging.getLogger("vfuserver")
_T = TypeVar("_T")

RUN_EPILOG = f"""\
device types (--device):
  virtio-net    a network function on --netdev (default)
  virtio-blk    a disk on --image, a raw image (a regular file or a block device):
                --readonly, --direct (O_DIRECT), --serial (the guest's serial, at most 20),
                --queues N (request queues, default 1)

profiles:
  modern        the device as it is: virtio-net 1af4:1041, virtio-blk 1af4:1042,
                revision 1 (default)
  transitional  also presents the legacy virtio interface, as Linux's virtio-vfio-pci does
                for hardware VFs: device ID 0x1000 (net) or 0x1001 (blk), revision 0,
                subsystem 1af4:0001 (net) or 1af4:0002 (blk) and an IO BAR0 whose accesses
                are translated into virtio admin commands

{NETDEV_HELP}

QEMU must give the server shared guest RAM:
  -object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem
  -device '{{"driver":"vfio-user-pci","socket":{{"path":"SOCKET","type":"unix"}}}}'

CONFIG: --config FILE serves many devices in one process (TOML; relative paths are taken
relative to the file's directory):
  [server]
  control = "/run/vfuserver/control.sock"   # optional control socket
  poll-max-ns = 32768                       # polling ceiling in ns, 0 off (--poll-max-ns)
  [[device]]                                # one table per device
  name = "net0"                             # required
  socket = "/run/vfuserver/net0.sock"       # required
  profile = "modern"                        # default modern
  mac = "52:54:00:12:34:56"                 # default 52:54:00 + 3 bytes derived from name
  netdev = "tap,ifname=tap0"                # --netdev syntax, default none
  [[device]]
  name = "disk0"
  socket = "/run/vfuserver/disk0.sock"
  type = "virtio-blk"                       # default virtio-net
  image = "/var/lib/vfuserver/disk0.img"    # required for virtio-blk
  readonly = false                          # also: direct = true (O_DIRECT), serial = "..."
A device that cannot be served is logged with its name and the reason; the others go on.
With $NOTIFY_SOCKET set (systemd Type=notify), READY=1 is sent once every socket exists.
"""


def _argument_type(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """``parse`` as an argparse type: its error becomes a usage error with its message
    (argparse would turn a plain ValueError into "invalid value")."""

    def convert(text: str) -> _T:
        try:
            return parse(text)
        except (SpecError, NetdevSyntaxError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


# --- run --------------------------------------------------------------------------------------

_SOCKET_ONLY = ("name", "profile", "mac", "netdev", "device", "image", "serial", "queues")
_SOCKET_ONLY_FLAGS = ("readonly", "direct")


def _socket_device(args: argparse.Namespace) -> DeviceSpec:
    """The one device ``run --socket`` describes; usage errors name the flag."""
    parser: argparse.ArgumentParser = args.parser
    device_type = args.device or VIRTIO_NET
    if device_type == VIRTIO_BLK:
        if args.image is None:
            parser.error("--device virtio-blk needs --image PATH (a raw disk image)")
        # --netdev none is what a disk has anyway (the systemd template always passes it)
        given = [f"--{key}" for key in ("mac", "netdev") if getattr(args, key) is not None
                 and not (key == "netdev" and isinstance(args.netdev, NoneSpec))]
        if given:
            parser.error(f"{', '.join(given)}: virtio-net options, not virtio-blk ones")
        return DeviceSpec(name=args.name or "disk0", socket=args.socket, type=device_type,
                          profile=args.profile or "modern", image=args.image,
                          readonly=args.readonly, direct=args.direct, serial=args.serial or "",
                          queues=args.queues or 1)
    given = [f"--{key}" for key in ("image", "serial", "queues")
             if getattr(args, key) is not None]
    given += [f"--{key}" for key in ("readonly", "direct") if getattr(args, key)]
    if given:
        parser.error(f"{', '.join(given)}: virtio-blk options; add --device virtio-blk")
    # As a [[device]] table, the default MAC is derived from the name; without --name
    # every such device is net0, so from the socket path, which two servers cannot share.
    mac = args.mac or default_mac(args.name or os.path.abspath(args.socket))
    return DeviceSpec(name=args.name or "net0", socket=args.socket,
                      profile=args.profile or "modern", mac=mac,
                      netdev=args.netdev if args.netdev is not None else NoneSpec())


def _run(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    if args.config is not None:
        given = [f"--{key}" for key in _SOCKET_ONLY if getattr(args, key) is not None]
        given += [f"--{key}" for key in _SOCKET_ONLY_FLAGS if getattr(args, key)]
        if given:
            verb = "describes" if len(given) == 1 else "describe"
            parser.error(f"{', '.join(given)} {verb} the --socket device; with --config, "
                         "put them in the config file's [[device]] table")
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            log.error("%s", exc)
            return 1
    else:
        if args.persist:
            parser.error("--persist writes changes back to a config file: it needs --config")
        config = ServerConfig(devices=[_socket_device(args)])
    if args.control is not None:
        config.control = os.path.abspath(args.control)
    if args.poll_max_ns is not None:
        config.poll_max_ns = args.poll_max_ns
    # The serving stack (trio, the C extension) is loaded here, for `run` alone: the client
    # commands (status, stats, profile, device) work where it is not even built.
    import trio

    from vfuserver.control.controller import Controller
    from vfuserver.sdnotify import Notifier
    from vfuserver.server import describe_error

    controller = Controller(config, persist=args.persist, notifier=Notifier.from_environment())
    try:
        # Without a control socket nothing can add a device: stop once none is left.
        stopped_by = trio.run(partial(controller.run, stop_when_empty=config.control is None))
    except OSError as exc:  # the control socket (devices report their own failures)
        log.error("%s", describe_error(exc))
        return 1
    log.info("stopped")
    return 0 if stopped_by is not None else 1


# --- the control commands ----------------------------------------------------------------------

EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

CONTROL_ENV = "VFUSERVER_CONTROL"

CONTROL_EPILOG = f"""\
The server is the one whose control socket --control names (default: ${CONTROL_ENV}); it has
one when started with 'vfuserver run --control PATH' or '[server] control = PATH' in its config.
The socket speaks QMP: qmp-shell (from the qemu.qmp package) can drive it too.

Output: one line per item, fields separated by single spaces, no header; --json prints the
server's return value instead (one JSON line).
exit status: 0 done, 1 the server refused (its reason on stderr), 2 usage error,
3 the server cannot be reached
"""


def _control_path(args: argparse.Namespace) -> str:
    path: str | None = args.control or os.environ.get(CONTROL_ENV)
    if not path:
        parser: argparse.ArgumentParser = args.parser
        parser.error(f"which server? pass --control PATH or set {CONTROL_ENV}=PATH, the "
                     "control socket the server was started with ('vfuserver run "
                     "--control PATH' or '[server] control' in its config)")
    return path


Request = tuple[str, dict[str, JsonValue]]
"""A QMP command's name and arguments."""


def _client_command(request: Callable[[argparse.Namespace], Request],
                    show: Callable[[JsonValue, argparse.Namespace], list[str]],
                    ) -> Callable[[argparse.Namespace], int]:
    """A control command: run it (qemu.qmp), print its lines (or --json), map exit codes."""

    def command(args: argparse.Namespace) -> int:
        path = _control_path(args)
        name, arguments = request(args)
        try:
            value = execute(path, name, arguments)
        except ControlUnreachable as exc:
            print(f"vfuserver: {exc.strerror or exc}; is the server running with "
                  f"--control {path}?", file=sys.stderr)
            return EXIT_UNREACHABLE
        except ServerError as exc:
            print(f"vfuserver: {exc.desc}", file=sys.stderr)
            return EXIT_SERVER_ERROR
        if args.json:
            print(json.dumps(value, sort_keys=True))
        else:
            for line in show(value, args):
                print(line)
        return EXIT_OK

    return command


def _no_lines(value: JsonValue, args: argparse.Namespace) -> list[str]:
    return []


def _profile_lines(value: JsonValue, args: argparse.Namespace) -> list[str]:
    return [f"{p['device']} {p['current']} {','.join(p['available'])}" for p in value]


def _status_lines(value: JsonValue, args: argparse.Namespace) -> list[str]:
    lines = []
    for device in value:
        client = "-" if device["state"] != "running" else (
            "attached" if device["client-attached"] else "detached")
        line = f"{device['name']} {device['state']} {device['profile']} {client} {device['socket']}"
        if "error" in device:
            line += f" {' '.join(str(device['error']).split())}"
        lines.append(line)
    return lines


def _stats_lines(value: JsonValue, args: argparse.Namespace) -> list[str]:
    return [f"{entry['device']} {group}.{counter} {count}"
            for entry in value
            for group, counters in entry["stats"].items()
            for counter, count in counters.items()]


def _only_device(args: argparse.Namespace) -> dict[str, JsonValue]:
    return {"device": args.device} if args.device else {}


def _profile_list(args: argparse.Namespace) -> Request:
    return "query-profiles", _only_device(args)


def _profile_set(args: argparse.Namespace) -> Request:
    return "set-profile", {"device": args.device, "profile": args.profile}


def _status(args: argparse.Namespace) -> Request:
    return "query-devices", {}


def _stats(args: argparse.Namespace) -> Request:
    return "query-stats", _only_device(args)


def _device_add(args: argparse.Namespace) -> Request:
    arguments: dict[str, JsonValue] = {"name": args.name, "socket": os.path.abspath(args.socket)}
    for key in ("profile", "mac", "netdev", "serial"):
        if getattr(args, key) is not None:
            arguments[key] = getattr(args, key)
    if args.device is not None:
        arguments["type"] = args.device
    if args.queues is not None:
        arguments["queues"] = args.queues
    if args.image is not None:
        arguments["image"] = os.path.abspath(args.image)
    for key in ("readonly", "direct"):
        if getattr(args, key):
            arguments[key] = True
    return "device-add", arguments


def _device_remove(args: argparse.Namespace) -> Request:
    return "device-del", {"name": args.name, **({"force": True} if args.force else {})}


# --- the parser -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfuserver",
        description="vfio-user device server presenting virtio-net and virtio-blk functions "
                    "to QEMU.")
    levels = ["debug", "info", "warning", "error"]
    parser.add_argument("--log-level", default="info", choices=levels,
                        help="log verbosity (default: info)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels,
                        help="log verbosity (default: info)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a device on a vfio-user socket", parents=[common],
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--socket", metavar="PATH",
                      help="UNIX socket to listen on (created 0600, removed on exit)")
    what.add_argument("--config", metavar="FILE",
                      help="serve every device a TOML file defines (see CONFIG below)")
    run.add_argument("--name", type=_argument_type(check_name),
                     help="device name used in logs (default net0, disk0)")
    run.add_argument("--device", choices=DEVICE_TYPES,
                     help="device type (default: virtio-net)")
    run.add_argument("--profile", choices=PROFILES,
                     help="how the device presents itself to the guest (default: modern)")
    run.add_argument("--mac", type=_argument_type(parse_mac),
                     help="MAC address (default: 52:54:00 and 3 bytes derived from --name, "
                          "or without --name from the socket's absolute path)")
    run.add_argument("--netdev", type=_argument_type(parse_netdev), metavar="SPEC",
                     help="network backend, e.g. tap,ifname=tap0 (default: none)")
    run.add_argument("--image", metavar="PATH",
                     help="virtio-blk: the raw disk image, a regular file or a block device")
    run.add_argument("--readonly", action="store_true",
                     help="virtio-blk: open the image read-only; the guest sees a "
                          "read-only disk")
    run.add_argument("--direct", action="store_true",
                     help="virtio-blk: O_DIRECT (bypass the host page cache)")
    run.add_argument("--serial", type=_argument_type(check_serial), metavar="ID",
                     help="virtio-blk: the disk's serial (at most 20 characters)")
    run.add_argument("--queues", type=_argument_type(parse_queues), metavar="N",
                     help="virtio-blk: request queues, 1..64 (default 1)")
    run.add_argument("--control", metavar="PATH",
                     help="QMP control socket (created 0600) for 'vfuserver "
                          "profile/status/device' or qmp-shell (default: [server] control of "
                          "--config, else none)")
    run.add_argument("--poll-max-ns", type=_argument_type(parse_poll_max_ns), metavar="N",
                     help="how long each device's serving thread polls its socket for the "
                          "next message before it sleeps, at most, in ns (QEMU's IOThread "
                          f"poll-max-ns): 0..{MAX_POLL_MAX_NS}, 0 turns polling off "
                          f"(default: [server] poll-max-ns of --config, else "
                          f"{DEFAULT_POLL_MAX_NS}); takes precedence over the file")
    run.add_argument("--persist", action="store_true",
                     help="write runtime changes (profile set, device add/remove) back to "
                          "--config, atomically, keeping its comments")
    run.set_defaults(func=_run, parser=run)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--control", metavar="PATH",
                        help=f"the server's control socket (default: ${CONTROL_ENV})")
    client.add_argument("--json", action="store_true",
                        help="print the server's return value as JSON")

    def leaf(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             help_text: str,
             func: Callable[[argparse.Namespace], Request],
             show: Callable[[JsonValue, argparse.Namespace], list[str]],
             epilog: str = "") -> argparse.ArgumentParser:
        command = subparsers.add_parser(
            name, help=help_text, description=help_text, parents=[common, client],
            epilog=epilog + CONTROL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        command.set_defaults(func=_client_command(func, show), parser=command)
        return command

    profile = sub.add_parser("profile", help="list or set the profiles of devices")
    profile_sub = profile.add_subparsers(dest="action", required=True)
    listing = leaf(profile_sub, "list", "list each device's current and available profiles",
                   _profile_list, _profile_lines,
                   "lines: NAME CURRENT AVAILABLE (comma-separated)\n\n")
    listing.add_argument("device", nargs="?", metavar="DEVICE", help="only this device")
    setting = leaf(profile_sub, "set", "set a device's profile (refused while a VM uses it)",
                   _profile_set, _no_lines,
                   "Takes effect at once: the next VM to attach sees the device as set.\n\n")
    setting.add_argument("device", metavar="DEVICE")
    setting.add_argument("profile", choices=PROFILES, metavar="PROFILE",
                         help=" or ".join(PROFILES))

    leaf(sub, "status", "list the server's devices and their state", _status, _status_lines,
         "lines: NAME STATE PROFILE CLIENT SOCKET [ERROR...]\n"
         "  STATE running or failed; CLIENT attached, detached or - (not running)\n\n")
    stats = leaf(sub, "stats", "show the counters of running devices", _stats, _stats_lines,
                 "lines: NAME GROUP.COUNTER VALUE\n\n")
    stats.add_argument("device", nargs="?", metavar="DEVICE", help="only this device")

    device = sub.add_parser("device", help="add or remove devices of a running server")
    device_sub = device.add_subparsers(dest="action", required=True)
    add = leaf(device_sub, "add", "define and start a device", _device_add, _no_lines)
    add.add_argument("name", metavar="NAME")
    add.add_argument("--socket", required=True, metavar="PATH",
                     help="UNIX socket the device listens on")
    add.add_argument("--profile", choices=PROFILES, help="default: modern")
    add.add_argument("--mac", help="default: 52:54:00 and 3 bytes derived from NAME")
    add.add_argument("--netdev", metavar="SPEC", help="network backend (default: none)")
    add.add_argument("--device", choices=DEVICE_TYPES, help="default: virtio-net")
    add.add_argument("--image", metavar="PATH", help="virtio-blk: the raw disk image")
    add.add_argument("--readonly", action="store_true", help="virtio-blk: read-only")
    add.add_argument("--direct", action="store_true", help="virtio-blk: O_DIRECT")
    add.add_argument("--serial", metavar="ID", help="virtio-blk: the disk's serial")
    add.add_argument("--queues", type=int, metavar="N", help="virtio-blk: request queues")
    remove = leaf(device_sub, "remove", "stop a device and drop its definition",
                  _device_remove, _no_lines)
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--force", action="store_true",
                        help="remove it even while a VM uses it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":  # the control commands report qemu.qmp's failures
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        result: int = args.func(args)
    except BrokenPipeError:
        # `vfuserver stats | head`: the reader is gone; no traceback (Python's docs, "Note on
        # SIGPIPE"): point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
