"""The ``--netdev`` option grammar: QEMU's ``-netdev`` syntax turned into frozen specs.

:func:`parse_netdev` parses ``KIND,key=value,...`` (QEMU's option syntax, ``,,`` a literal
comma) into a :data:`NetdevSpec`; ``str(spec)`` writes it back in the same syntax. Pure:
no trio, no sockets, no C extension, so configuration can be checked without them.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from vfuserver.netdev.errors import NetdevSyntaxError

IFNAMSIZ = 16
"""<linux/if.h>: interface names are shorter than this (the NUL included)."""
UNIX_PATH_MAX = 108
"""sizeof(sockaddr_un.sun_path) (<linux/un.h>)."""


def _escape(value: str) -> str:
    return value.replace(",", ",,")  # QEMU option syntax: ",," is a literal comma


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def options(self, prefix: str) -> str:
        return f"{prefix}.type=unix,{prefix}.path={_escape(self.path)}"


@dataclass(frozen=True)
class InetAddress:
    host: str
    port: int

    def options(self, prefix: str) -> str:
        return f"{prefix}.type=inet,{prefix}.host={_escape(self.host)},{prefix}.port={self.port}"


SocketAddress = UnixAddress | InetAddress


@dataclass(frozen=True)
class NoneSpec:
    kind: ClassVar[str] = "none"

    def __str__(self) -> str:
        return "none"


@dataclass(frozen=True)
class TapSpec:
    ifname: str = ""
    """Empty: the kernel names a new tap (tap%d)."""
    vnet_hdr: bool = True
    kind: ClassVar[str] = "tap"

    def __str__(self) -> str:
        name = f",ifname={_escape(self.ifname)}" if self.ifname else ""
        return f"tap{name},vnet_hdr={'on' if self.vnet_hdr else 'off'}"


@dataclass(frozen=True)
class StreamSpec:
    addr: SocketAddress
    server: bool = False
    reconnect_ms: int = 0
    """Client only: retry interval after a failed connect or a disconnect; 0: never."""
    kind: ClassVar[str] = "stream"

    def __str__(self) -> str:
        text = f"stream,server={'on' if self.server else 'off'},{self.addr.options('addr')}"
        return text + (f",reconnect-ms={self.reconnect_ms}" if self.reconnect_ms else "")


@dataclass(frozen=True)
class DgramSpec:
    local: SocketAddress
    remote: SocketAddress
    kind: ClassVar[str] = "dgram"

    def __str__(self) -> str:
        return f"dgram,{self.local.options('local')},{self.remote.options('remote')}"


NetdevSpec = NoneSpec | TapSpec | StreamSpec | DgramSpec

_SYNTAX = {
    "none": ["none"],
    "tap": ["tap,ifname=NAME[,vnet_hdr=on|off]"],
    "stream": [
        "stream,server=on|off,addr.type=unix,addr.path=PATH[,reconnect=SECONDS]",
        "stream,server=on|off,addr.type=inet,addr.host=HOST,addr.port=PORT[,reconnect=SECONDS]",
    ],
    "dgram": [
        "dgram,local.type=unix,local.path=PATH,remote.type=unix,remote.path=PATH",
        "dgram,local.type=inet,local.host=HOST,local.port=PORT,"
        "remote.type=inet,remote.host=HOST,remote.port=PORT",
    ],
}

NETDEV_HELP = """\
network backend (--netdev, QEMU's -netdev syntax; id=... is accepted and ignored):
  none (default)  frames the guest sends are dropped and counted
  tap,ifname=NAME[,vnet_hdr=on|off]
                  a tap device in the server's network namespace, attached if it exists
                  (ip tuntap add dev NAME mode tap [user USER]), else created (and gone
                  when the server exits); without ifname= the kernel names it (tapN);
                  vnet_hdr=on (default): frames carry the 12-byte virtio-net header,
                  and the tap is told the offloads the guest's driver takes
  stream,server=on|off,addr.type=unix,addr.path=PATH[,reconnect=SECONDS]
  stream,server=on|off,addr.type=inet,addr.host=HOST,addr.port=PORT[,reconnect=SECONDS]
                  a peer of QEMU's -netdev stream: server=on listens for one peer at a
                  time, server=off connects (reconnect=/reconnect-ms= retry interval)
  dgram,local.type=unix,local.path=PATH,remote.type=unix,remote.path=PATH
  dgram,local.type=inet,local.host=HOST,local.port=PORT,remote.type=inet,remote.host=HOST,\
remote.port=PORT
                  a peer of QEMU's -netdev dgram: one frame per datagram
"""


def _split_options(text: str) -> list[str]:
    """Split at single commas; ",," is a literal comma (QEMU's get_opt_value)."""
    items, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    return items


class _Options:
    """The key=value items of one --netdev string, consumed by the parser of its kind."""

    _BOOLS: ClassVar[dict[str, bool]] = {"on": True, "yes": True, "true": True,
                                         "off": False, "no": False, "false": False}

    def __init__(self, text: str, kind: str, items: dict[str, str]) -> None:
        self.text, self.kind, self.items = text, kind, items

    def error(self, problem: str) -> NetdevSyntaxError:
        lines = _SYNTAX.get(self.kind) or list(itertools.chain(*_SYNTAX.values()))
        syntax = "\n".join(f"  {line}" for line in lines)
        return NetdevSyntaxError(f"--netdev {self.text!r}: {problem}\naccepted syntax:\n{syntax}")

    def take(self, key: str) -> str | None:
        return self.items.pop(key, None)

    def require(self, key: str) -> str:
        value = self.take(key)
        if value is None:
            raise self.error(f"{key}= is required")
        if not value:
            raise self.error(f"{key}= is empty")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.take(key)
        if value is None:
            return default
        if value.lower() not in self._BOOLS:
            raise self.error(f"{key}={value}: expected on or off")
        return self._BOOLS[value.lower()]

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.take(key)
        return None if value is None else self._in_range(key, value, low, high)

    def _in_range(self, key: str, value: str, low: int, high: int) -> int:
        if not value.isdecimal() or not low <= int(value) <= high:
            raise self.error(f"{key}={value}: expected an integer from {low} to {high}")
        return int(value)

    def address(self, prefix: str, *, any_port: bool) -> SocketAddress:
        kind = self.require(f"{prefix}.type")
        if kind == "unix":
            path = self.require(f"{prefix}.path")
            if len(os.fsencode(path)) >= UNIX_PATH_MAX:
                raise self.error(f"{prefix}.path is too long for a unix socket "
                                 f"(at most {UNIX_PATH_MAX - 1} bytes)")
            return UnixAddress(path)
        if kind == "inet":
            host = self.require(f"{prefix}.host")
            key = f"{prefix}.port"
            return InetAddress(host, self._in_range(key, self.require(key), int(not any_port),
                                                    65535))
        raise self.error(f"{prefix}.type={kind}: expected unix or inet")

    def done(self) -> None:
        if self.items:
            unknown = ", ".join(sorted(self.items))
            raise self.error(f"unknown or unsupported option {unknown} for {self.kind}")


def _parse_tap(opts: _Options) -> TapSpec:
    ifname = opts.take("ifname") or ""
    encoded = os.fsencode(ifname)
    # The kernel's dev_valid_name(): shorter than IFNAMSIZ, no '/', ':' or whitespace.
    if (len(encoded) >= IFNAMSIZ or ifname in (".", "..")
            or any(c in "/:" or c.isspace() for c in ifname)):
        raise opts.error(f"ifname={ifname}: not a valid interface name "
                         f"(at most {IFNAMSIZ - 1} bytes, no '/', ':' or spaces)")
    vnet_hdr = opts.flag("vnet_hdr", True)
    for key in ("script", "downscript"):  # accepted as QEMU command lines often carry them
        value = opts.take(key)
        if value not in (None, "no"):
            raise opts.error(f"{key}={value}: scripts are not run; configure the tap "
                             f"beforehand and use {key}=no")
    opts.done()
    return TapSpec(ifname, vnet_hdr)


def _parse_stream(opts: _Options) -> StreamSpec:
    server = opts.flag("server", False)
    addr = opts.address("addr", any_port=server)
    seconds = opts.integer("reconnect", 0, 2**32 // 1000 - 1)
    millis = opts.integer("reconnect-ms", 0, 2**32 - 1)
    # Both rules are QEMU's net_init_stream().
    if seconds is not None and millis is not None:
        raise opts.error("reconnect and reconnect-ms are mutually exclusive")
    reconnect_ms = millis if millis is not None else (seconds or 0) * 1000
    if server and (seconds is not None or millis is not None):
        raise opts.error("reconnect is incompatible with server=on")
    opts.done()
    return StreamSpec(addr, server, reconnect_ms)


def _parse_dgram(opts: _Options) -> DgramSpec:
    local = opts.address("local", any_port=True)
    remote = opts.address("remote", any_port=False)
    if type(local) is not type(remote):  # QEMU's net_init_dgram() says the same
        raise opts.error("remote and local types must be the same")
    if isinstance(remote, InetAddress) and _is_multicast(remote.host):
        raise opts.error(f"remote.host={remote.host}: multicast dgram is not supported")
    opts.done()
    return DgramSpec(local, remote)


def _parse_none(opts: _Options) -> NoneSpec:
    opts.done()
    return NoneSpec()


def _is_multicast(host: str) -> bool:
    try:
        return socket.inet_aton(host)[0] & 0xF0 == 0xE0
    except OSError:
        return False


_PARSERS: dict[str, Callable[[_Options], NetdevSpec]] = {
    "none": _parse_none, "tap": _parse_tap, "stream": _parse_stream, "dgram": _parse_dgram,
}


def parse_netdev(text: str) -> NetdevSpec:
    """Parse QEMU's ``-netdev`` option syntax: ``KIND,key=value,...`` (see NETDEV_HELP)."""
    first, *rest = _split_options(text.strip())
    kind = first.removeprefix("type=")  # QEMU also accepts the implied key spelled out
    opts = _Options(text, kind, {})
    if kind not in _PARSERS:
        raise opts.error(f"unknown backend {kind!r} (expected none, tap, stream or dgram)")
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise opts.error(f"{item!r} is not key=value")
        if key in opts.items:
            raise opts.error(f"{key}= is given twice")
        opts.items[key] = value
    opts.take("id")
    return _PARSERS[kind](opts)
