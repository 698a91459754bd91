"""The ``vfuserver`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from vfuserver.device import DEFAULT_MAC, PROFILES, DeviceSpec, format_mac, open_device, parse_mac
from vfuserver.netdev import NETDEV_HELP, NetdevError, NetdevSpec, parse_netdev

log = logging.getLogger("vfuserver")

RUN_EPILOG = f"""\
profiles:
  modern        the device as it is: virtio-net 1af4:1041, revision 1 (default)
  transitional  also presents the legacy virtio interface, as Linux's virtio-vfio-pci does
                for hardware VFs: device ID 0x1000, revision 0, subsystem 1af4:0001 and an
                IO BAR0 whose accesses are translated into virtio admin commands

network backends (--netdev, QEMU's -netdev syntax):
{NETDEV_HELP}

QEMU must give the server shared guest RAM:
  -object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem
  -device '{{"driver":"vfio-user-pci","socket":{{"path":"SOCKET","type":"unix"}}}}'
"""


def _netdev(text: str) -> NetdevSpec:
    try:
        return parse_netdev(text)
    except NetdevError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _serve(spec: DeviceSpec) -> int:
    from vfuserver.server import serve

    try:
        device = await open_device(spec)
    except (OSError, NetdevError) as exc:
        log.error("cannot serve %s: %s", spec.socket, exc)
        return 1
    log.info("listening on %s (device %s, profile %s, mac %s, netdev %s)",
             device.context.socket_path, spec.name, spec.profile, format_mac(spec.mac),
             spec.netdev)
    await serve([device])
    log.info("stopped")
    return 0


def _run(args: argparse.Namespace) -> int:
    spec = DeviceSpec(name=args.name, socket=args.socket, profile=args.profile, mac=args.mac,
                      netdev=args.netdev)
    result: int = trio.run(_serve, spec)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfuserver",
        description="vfio-user device server presenting virtio-net functions to QEMU.")
    levels = ["debug", "info", "warning", "error"]
    parser.add_argument("--log-level", default="info", choices=levels,
                        help="log verbosity (default: info)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels,
                        help="log verbosity (default: info)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a device on a vfio-user socket", parents=[common],
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--socket", required=True, metavar="PATH",
                     help="UNIX socket to listen on (created 0600, removed on exit)")
    run.add_argument("--name", default="net0", help="device name used in logs (default net0)")
    run.add_argument("--profile", choices=PROFILES, default="modern",
                     help="how the device presents itself to the guest (default: modern)")
    run.add_argument("--mac", type=parse_mac, default=DEFAULT_MAC,
                     help=f"MAC address (default: {format_mac(DEFAULT_MAC)})")
    run.add_argument("--netdev", type=_netdev, default=parse_netdev("none"), metavar="SPEC",
                     help="network backend, e.g. tap,ifname=tap0 (default: none)")
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
