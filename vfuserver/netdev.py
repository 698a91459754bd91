"""Network backends of the virtio-net device, chosen with QEMU's ``-netdev`` syntax.

:func:`parse_netdev` turns a ``--netdev`` string into a frozen spec; :func:`open_netdev`
(async: it may resolve host names) opens the backend it names. Every backend follows
:class:`NetBackend`: the device model calls :meth:`~NetBackend.send` synchronously from a
libvfio-user callback, so sending never blocks (a bounded queue, then drop and count), and
one trio task runs :meth:`~NetBackend.run` to pump received frames into the guest.

The wire formats follow QEMU so either end can be a QEMU: ``stream`` prefixes each frame
with its length as a 4-byte big-endian integer (net/stream_data.c,
net_stream_data_receive), ``dgram`` sends one frame per datagram (net/dgram.c); neither
carries a virtio-net header. ``tap`` frames carry the 12-byte virtio_net_hdr_v1 in front
when ``vnet_hdr=on`` (the default, as QEMU's tap does when the kernel supports it).

Life cycle: ``backend = await open_netdev(parse_netdev(text))``, then ``await
nursery.start(backend.run, deliver)``; cancel that task, then ``backend.close()``. All
methods must be called from the trio thread that runs :meth:`~NetBackend.run`.

Errors have a direction: :class:`NetdevSyntaxError` (a ValueError) for the --netdev text,
:class:`NetdevHostError` (an OSError with errno) for a host that refuses or loses the
backend; both are :class:`NetdevError`. Frames the guest sends that cannot be delivered
are counted in :class:`NetStats`, never raised.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import pwd
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NoReturn, Protocol

import trio

log = logging.getLogger("vfuserver.netdev")

VNET_HDR_LEN = 12
"""struct virtio_net_hdr_v1 (virtio 1.x 5.1.6), num_buffers included."""
NET_BUFSIZE = 4096 + 65536
"""The largest frame a backend takes, as QEMU's NET_BUFSIZE (include/net/net.h)."""
TX_QUEUE_LIMIT = 256
"""Frames queued towards the host while it cannot take them; more are dropped and counted."""
RX_BATCH = 64
"""Frames read back to back before the receive task lets other tasks run."""
TX_RETRY_DELAY = 0.001
"""Pause after a "writable" wake-up that still could not write (see _flush_loop)."""
TUN_DEVICE = "/dev/net/tun"

# <linux/if_tun.h>, <linux/if.h>
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
UNIX_PATH_MAX = 108
_IFREQ = struct.Struct("16sH22x")
_LENGTH = struct.Struct(">I")


class NetdevError(Exception):
    """Base of everything wrong with a --netdev backend."""


class NetdevSyntaxError(NetdevError, ValueError):
    """A --netdev string that does not parse; the message names the item and the syntax."""


class NetdevHostError(NetdevError, OSError):
    """The host refused or lost the backend (``errno`` set); the message names the fix."""


# --- specs ---------------------------------------------------------------------------------

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
                  vnet_hdr=on (default): frames carry the 12-byte virtio-net header
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


# --- the backend interface -----------------------------------------------------------------

@dataclass
class NetStats:
    """Frame counters; bytes count Ethernet frames, without any virtio-net header."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0


Deliver = Callable[[bytes], bool]


class NetBackend(Protocol):
    vnet_hdr: bool
    """Frames carry a 12-byte virtio_net_hdr_v1 in front, both ways (received ones with
    num_buffers = 1; the device model rewrites it when a frame spans several buffers)."""
    stats: NetStats

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        """Write ``frame`` now, or queue it (bounded), or drop and count it; never blocks."""

    async def run(self, deliver: Deliver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump received frames into ``deliver`` and flush queued ones, until cancelled.

        ``deliver(frame)`` returns False when the guest has no receive buffers: the frame
        is kept (not dropped) and nothing more is read until :meth:`wake_receiver`.
        """

    def wake_receiver(self) -> None:
        """The guest posted receive buffers: retry the frame deliver() refused."""

    def close(self) -> None:
        """Release the fds (waking trio tasks waiting on them); idempotent."""


def _close(sock_or_fd: socket.socket | int) -> None:
    """Close after waking any trio task waiting on it (they get ClosedResourceError)."""
    if isinstance(sock_or_fd, socket.socket) and sock_or_fd.fileno() == -1:
        return  # already closed
    with contextlib.suppress(RuntimeError):  # outside trio.run nobody can be waiting
        trio.lowlevel.notify_closing(sock_or_fd)
    if isinstance(sock_or_fd, socket.socket):
        sock_or_fd.close()
    else:
        os.close(sock_or_fd)


class NoneBackend:
    """``none``: what the guest sends is dropped and counted; nothing is ever received."""

    vnet_hdr = False

    def __init__(self) -> None:
        self.stats = NetStats()

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        self.stats.tx_dropped += 1

    async def run(self, deliver: Deliver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def wake_receiver(self) -> None:
        pass

    def close(self) -> None:
        pass


class _QueuedBackend:
    """What the fd-based backends share: the bounded transmit queue and guest backpressure."""

    vnet_hdr = False

    def __init__(self, *, tx_queue_limit: int = TX_QUEUE_LIMIT) -> None:
        self.stats = NetStats()
        self._tx_queue: deque[tuple[bytes, int]] = deque()  # (bytes for the host, frame length)
        self._tx_sent = 0  # bytes of the head already written (stream sockets write partially)
        self._tx_limit = tx_queue_limit
        self._tx_lot = trio.lowlevel.ParkingLot()
        self._rx_lot = trio.lowlevel.ParkingLot()
        self._rx_woken = False
        self._closed = False

    # What a backend defines.
    def _connected(self) -> bool:
        return not self._closed

    def _encode(self, frame: bytes | bytearray | memoryview) -> bytes:
        return bytes(frame)

    def _write(self, data: memoryview) -> int:
        raise NotImplementedError

    def _write_failed(self, exc: OSError) -> None:
        log.debug("%s: frame dropped: %s", type(self).__name__, exc)

    # The shared part.
    def send(self, frame: bytes | bytearray | memoryview) -> None:
        length = len(frame) - (VNET_HDR_LEN if self.vnet_hdr else 0)
        if length <= 0 or not self._connected() or len(self._tx_queue) >= self._tx_limit:
            self.stats.tx_dropped += 1
            return
        self._tx_queue.append((self._encode(frame), length))
        if len(self._tx_queue) == 1:
            self._flush()
        if self._tx_queue:
            self._tx_lot.unpark_all()

    def wake_receiver(self) -> None:
        self._rx_woken = True
        self._rx_lot.unpark_all()

    def _flush(self) -> bool:
        """Write queued frames until the host would block; True if anything was written."""
        progress = False
        while self._tx_queue:
            data, length = self._tx_queue[0]
            try:
                written = self._write(memoryview(data)[self._tx_sent:])
            except BlockingIOError:
                break
            except OSError as exc:
                self._tx_queue.popleft()
                self._tx_sent = 0
                self.stats.tx_dropped += 1
                self._write_failed(exc)
                continue
            progress = True
            self._tx_sent += written
            if self._tx_sent == len(data):
                self._tx_queue.popleft()
                self._tx_sent = 0
                self.stats.tx_frames += 1
                self.stats.tx_bytes += length
        return progress

    def _drop_tx_queue(self) -> None:
        self.stats.tx_dropped += len(self._tx_queue)
        self._tx_queue.clear()
        self._tx_sent = 0

    async def _flush_loop(self, target: socket.socket | int) -> NoReturn:
        while True:
            if not self._tx_queue:
                await self._tx_lot.park()
                continue
            await trio.lowlevel.wait_writable(target)
            if not self._flush():
                # unix_dgram_poll() calls an unconnected datagram socket writable by its own
                # send buffer while sendto() fails with EAGAIN on the receiver's full queue.
                await trio.sleep(TX_RETRY_DELAY)

    async def _deliver(self, deliver: Deliver, frame: bytes) -> None:
        """Hand one frame to the guest; while it has no buffers, keep the frame and wait."""
        while True:
            self._rx_woken = False
            if deliver(frame):
                self.stats.rx_frames += 1
                self.stats.rx_bytes += len(frame) - (VNET_HDR_LEN if self.vnet_hdr else 0)
                return
            if not self._rx_woken:  # unless wake_receiver() ran inside deliver()
                await self._rx_lot.park()

    async def _receive_datagrams(self, fd: socket.socket | int, deliver: Deliver,
                                 read: Callable[[bytearray], int]) -> NoReturn:
        """Receive loop for backends where every read returns exactly one frame."""
        buffer = bytearray(NET_BUFSIZE)
        while True:
            await trio.lowlevel.wait_readable(fd)
            for _ in range(RX_BATCH):
                try:
                    size = read(buffer)
                except BlockingIOError:
                    break
                minimum = VNET_HDR_LEN if self.vnet_hdr else 0
                if not minimum < size <= NET_BUFSIZE:
                    self.stats.rx_dropped += 1
                    continue
                frame = bytearray(buffer[:size])
                if self.vnet_hdr:
                    # tun_put_user() skips, without writing, the vnet header bytes past the
                    # 10-byte virtio_net_hdr: num_buffers is 1 for a frame in one buffer.
                    frame[10:12] = b"\x01\x00"
                await self._deliver(deliver, bytes(frame))


# --- tap -----------------------------------------------------------------------------------

def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _tap_error(exc: OSError, ifname: str, tun_device: str) -> NetdevHostError:
    name = ifname or "NAME"
    err = exc.errno or errno.EIO
    if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        fix = f"{tun_device} is missing: load the kernel module tun (modprobe tun)"
    elif err == errno.EACCES:
        fix = (f"no permission to open {tun_device}: run as root, or give this user read and "
               f"write access to it (distributions usually make it mode 0666)")
    elif err == errno.EPERM:  # TUNSETIFF without CAP_NET_ADMIN: tun_set_iff(), tun_not_capable()
        fix = (f"no permission to create or attach tap {name}: run as root, or create the "
               f"tap for this user with 'ip tuntap add dev {name} mode tap user {_user_name()}'")
    elif err == errno.EBUSY:
        fix = (f"tap {name} is busy: another process (a QEMU, another vfuserver) has it "
               "open; stop it or use another ifname=")
    elif err == errno.EINVAL:
        fix = (f"{name} exists but is not a single-queue tap (a tun, a multi_queue tap or "
               "another kind of interface): delete it or use another ifname=")
    else:
        fix = f"cannot open tap {name}: {os.strerror(err)}"
    return NetdevHostError(err, fix)


class TapBackend(_QueuedBackend):
    """A tap device in the server's network namespace (QEMU net/tap-linux.c, tap_open())."""

    def __init__(self, fd: int, ifname: str, vnet_hdr: bool, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.fd, self.ifname, self.vnet_hdr = fd, ifname, vnet_hdr

    @classmethod
    def open(cls, ifname: str = "", *, vnet_hdr: bool = True, tun_device: str = TUN_DEVICE,
             tx_queue_limit: int = TX_QUEUE_LIMIT) -> TapBackend:
        """Attach to tap ``ifname``, or create it (gone again when closed, unless persistent)."""
        try:
            fd = os.open(tun_device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _tap_error(exc, ifname, tun_device) from exc
        try:
            flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            ifreq = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(os.fsencode(ifname), flags))
            name = os.fsdecode(_IFREQ.unpack(ifreq)[0].rstrip(b"\0"))
            if vnet_hdr:
                # The 12-byte virtio_net_hdr_v1 of virtio 1.x (and legacy MRG_RXBUF), as QEMU's
                # tap_set_vnet_hdr_len(); the kernel default is the 10-byte legacy header.
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as exc:
            os.close(fd)
            raise _tap_error(exc, ifname, tun_device) from exc
        return cls(fd, name, vnet_hdr, tx_queue_limit=tx_queue_limit)

    def _write(self, data: memoryview) -> int:
        return os.write(self.fd, data)

    async def run(self, deliver: Deliver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop, self.fd)
            task_status.started()
            try:
                await self._receive_datagrams(self.fd, deliver,
                                              lambda buffer: os.readv(self.fd, [buffer]))
            except OSError as exc:  # EBADFD: the tap was deleted under us (tun_chr_read_iter)
                raise NetdevHostError(exc.errno, f"tap {self.ifname} failed: {exc}") from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_tx_queue()
            _close(self.fd)


# --- sockets -------------------------------------------------------------------------------

async def _resolve(addr: SocketAddress, socktype: int,
                   family: int = socket.AF_UNSPEC) -> tuple[int, str | tuple[str, int]]:
    if isinstance(addr, UnixAddress):
        return socket.AF_UNIX, addr.path
    try:
        infos = await trio.socket.getaddrinfo(addr.host, addr.port, family, socktype)
    except socket.gaierror as exc:
        raise NetdevHostError(errno.EADDRNOTAVAIL, f"cannot resolve {addr.host}: {exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def _where(addr: SocketAddress) -> str:
    return addr.path if isinstance(addr, UnixAddress) else f"{addr.host}:{addr.port}"


def _unlink_stale_socket(path: str, socktype: int) -> bool:
    """Remove a unix socket file nobody serves any more; True if one was removed.

    QEMU unlinks whatever is at the path (net_init_dgram(), unix_listen_saddr()); a running
    peer's socket is never taken over here: only one that refuses connections is removed.
    """
    with contextlib.suppress(OSError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        with socket.socket(socket.AF_UNIX, socktype | socket.SOCK_NONBLOCK) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
                return True
    return False


def _bind(addr: SocketAddress, family: int, sockaddr: str | tuple[str, int], socktype: int,
          option: str) -> socket.socket:
    sock = socket.socket(family, socktype | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family != socket.AF_UNIX and socktype == socket.SOCK_STREAM:
            # As QEMU's inet_listen_saddr(): rebinding right after a restart works; a second
            # listener still gets EADDRINUSE. Not for UDP, where it would let two share a port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if not (exc.errno == errno.EADDRINUSE and isinstance(addr, UnixAddress)
                    and _unlink_stale_socket(addr.path, socktype)):
                raise
            sock.bind(sockaddr)
        if socktype == socket.SOCK_STREAM:
            sock.listen(1)
    except OSError as exc:
        sock.close()
        err = exc.errno or errno.EIO
        if err == errno.EADDRINUSE:
            msg = (f"{_where(addr)} is already in use (another process serves it): stop it "
                   f"or choose another {option}")
        else:
            msg = f"cannot bind {_where(addr)}: {os.strerror(err)}; check {option}"
        raise NetdevHostError(err, msg) from exc
    return sock


def _bound_inode(sock: socket.socket) -> tuple[str, int] | None:
    """The unix socket file this socket created, to remove it on close (if still ours)."""
    if sock.family != socket.AF_UNIX:
        return None
    path = sock.getsockname()
    return (path, os.stat(path).st_ino) if isinstance(path, str) and path else None


def _remove_socket_file(bound: tuple[str, int] | None) -> None:
    if bound is not None:
        with contextlib.suppress(OSError):
            if os.stat(bound[0]).st_ino == bound[1]:
                os.unlink(bound[0])


async def _connect(addr: SocketAddress, family: int,
                   sockaddr: str | tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(sockaddr)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
        if family != socket.AF_UNIX:
            # net_stream_data_client_connected(): "Disable Nagle algorithm ... latency"
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        _close(sock)
        raise
    return sock


class StreamBackend(_QueuedBackend):
    """A peer of QEMU's ``-netdev stream``: 4-byte big-endian length, then the frame."""

    def __init__(self, spec: StreamSpec, family: int, sockaddr: str | tuple[str, int],
                 listener: socket.socket | None, peer: socket.socket | None,
                 **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.spec, self._family, self._sockaddr = spec, family, sockaddr
        self._listener, self._first_peer = listener, peer
        self._bound = _bound_inode(listener) if listener else None
        self._peer: socket.socket | None = None
        self._peer_scope: trio.CancelScope | None = None

    @classmethod
    async def open(cls, spec: StreamSpec, *, tx_queue_limit: int = TX_QUEUE_LIMIT
                   ) -> StreamBackend:
        """Listen (server=on) or connect now, so a wrong address fails at start-up."""
        family, sockaddr = await _resolve(spec.addr, socket.SOCK_STREAM)
        listener = peer = None
        if spec.server:
            listener = _bind(spec.addr, family, sockaddr, socket.SOCK_STREAM,
                             "addr.path" if family == socket.AF_UNIX else "addr.port")
        elif not spec.reconnect_ms:
            try:
                peer = await _connect(spec.addr, family, sockaddr)
            except OSError as exc:
                err = exc.errno or errno.ECONNREFUSED
                raise NetdevHostError(err, (
                    f"cannot connect to {_where(spec.addr)}: {os.strerror(err)}; start the "
                    "peer first (e.g. QEMU with -netdev stream,server=on,...) or add "
                    "reconnect=SECONDS to keep trying")) from exc
        return cls(spec, family, sockaddr, listener, peer, tx_queue_limit=tx_queue_limit)

    @property
    def address(self) -> str | tuple[str, int]:
        """The listening address (with the port chosen for addr.port=0), else the peer's."""
        return self._listener.getsockname() if self._listener else self._sockaddr

    def _connected(self) -> bool:
        return self._peer is not None and not self._closed

    def _encode(self, frame: bytes | bytearray | memoryview) -> bytes:
        return _LENGTH.pack(len(frame)) + frame

    def _write(self, data: memoryview) -> int:
        if self._peer is None:  # lost while flushing
            raise BrokenPipeError(errno.EPIPE, "stream peer gone")
        return self._peer.send(data, socket.MSG_NOSIGNAL)

    def _write_failed(self, exc: OSError) -> None:
        # As net_stream_data_receive() failing: the link is down until the next peer.
        log.info("stream peer %s lost: %s", _where(self.spec.addr), exc)
        self._peer = None
        self._drop_tx_queue()
        if self._peer_scope is not None:
            self._peer_scope.cancel()

    async def run(self, deliver: Deliver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        peer, self._first_peer = self._first_peer, None
        while True:
            if self._listener is not None:
                peer = await self._accept(self._listener)
            elif peer is None and not self.spec.reconnect_ms:
                # QEMU's net_stream_arm_reconnect() does nothing without reconnect: the
                # link stays down.
                log.warning("stream peer %s gone; not reconnecting (no reconnect=)",
                            _where(self.spec.addr))
                await trio.sleep_forever()
            elif peer is None:
                peer = await self._reconnect()
            await self._serve_peer(peer, deliver)
            peer = None
            if self.spec.reconnect_ms:
                await trio.sleep(self.spec.reconnect_ms / 1000)  # net_stream_arm_reconnect()

    async def _accept(self, listener: socket.socket) -> socket.socket:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                peer, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                log.warning("stream accept on %s failed: %s", _where(self.spec.addr), exc)
                await trio.sleep(0.1)  # EMFILE & co. leave the listener readable: do not spin
                continue
            peer.setblocking(False)
            if peer.family != socket.AF_UNIX:
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return peer

    async def _reconnect(self) -> socket.socket:
        while True:
            try:
                return await _connect(self.spec.addr, self._family, self._sockaddr)
            except OSError as exc:
                log.debug("stream connect to %s: %s", _where(self.spec.addr), exc)
            await trio.sleep(self.spec.reconnect_ms / 1000)

    async def _serve_peer(self, peer: socket.socket, deliver: Deliver) -> None:
        """One connection: the link is up until the peer leaves or a write fails."""
        log.info("stream peer connected on %s", _where(self.spec.addr))
        self._peer = peer
        try:
            async with trio.open_nursery() as nursery:
                self._peer_scope = nursery.cancel_scope
                nursery.start_soon(self._flush_loop, peer)
                await self._receive_stream(peer, deliver)
                nursery.cancel_scope.cancel()
        finally:
            self._peer = self._peer_scope = None
            self._drop_tx_queue()
            _close(peer)
        log.info("stream peer left %s", _where(self.spec.addr))

    async def _receive_stream(self, peer: socket.socket, deliver: Deliver) -> None:
        buffer = bytearray()
        while True:
            await trio.lowlevel.wait_readable(peer)
            try:
                data = peer.recv(NET_BUFSIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.info("stream peer %s: %s", _where(self.spec.addr), exc)
                return
            if not data:
                return
            buffer += data
            start = 0
            while len(buffer) - start >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buffer, start)
                if length > NET_BUFSIZE:  # net_fill_rstate() fails and QEMU hangs up too
                    log.warning("stream peer sent a %d-byte frame; disconnecting", length)
                    self.stats.rx_dropped += 1
                    return
                end = start + _LENGTH.size + length
                if len(buffer) < end:
                    break
                frame = bytes(buffer[start + _LENGTH.size : end])
                start = end
                if frame:
                    await self._deliver(deliver, frame)
                else:
                    self.stats.rx_dropped += 1
            del buffer[:start]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_tx_queue()
            if self._peer_scope is not None:
                self._peer_scope.cancel()
            for sock in (self._listener, self._first_peer, self._peer):
                if sock is not None:
                    _close(sock)
            _remove_socket_file(self._bound)


class DgramBackend(_QueuedBackend):
    """A peer of QEMU's ``-netdev dgram``: one frame per datagram, sent to ``remote``.

    As QEMU, the socket is not connected: frames are sent with sendto() and received from
    anyone (net_dgram_send() reads with recv()).
    """

    def __init__(self, spec: DgramSpec, sock: socket.socket, remote: str | tuple[str, int],
                 **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.spec, self._sock, self._remote = spec, sock, remote
        self._bound = _bound_inode(sock)

    @classmethod
    async def open(cls, spec: DgramSpec, *, tx_queue_limit: int = TX_QUEUE_LIMIT
                   ) -> DgramBackend:
        family, local = await _resolve(spec.local, socket.SOCK_DGRAM)
        _, remote = await _resolve(spec.remote, socket.SOCK_DGRAM, family)
        option = "local.path" if family == socket.AF_UNIX else "local.port"
        sock = _bind(spec.local, family, local, socket.SOCK_DGRAM, option)
        return cls(spec, sock, remote, tx_queue_limit=tx_queue_limit)

    @property
    def address(self) -> str | tuple[str, int]:
        """The local address (with the port chosen for local.port=0)."""
        name: str | tuple[str, int] = self._sock.getsockname()
        return name

    def _write(self, data: memoryview) -> int:
        return self._sock.sendto(data, self._remote)

    async def run(self, deliver: Deliver, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop, self._sock)
            task_status.started()
            # MSG_TRUNC: recv() returns the datagram's real length, so oversize ones are seen.
            await self._receive_datagrams(
                self._sock, deliver,
                lambda buffer: self._sock.recv_into(buffer, NET_BUFSIZE, socket.MSG_TRUNC))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._drop_tx_queue()
            _close(self._sock)
            _remove_socket_file(self._bound)


async def open_netdev(spec: NetdevSpec, *, tx_queue_limit: int = TX_QUEUE_LIMIT
                      ) -> NetBackend:
    """Open the backend ``spec`` names; failures raise NetdevHostError naming the fix.

    Async because host names are resolved and a stream client connects here. The caller
    runs ``backend.run(deliver)`` in a nursery and calls ``backend.close()`` after it ends.
    """
    match spec:
        case NoneSpec():
            return NoneBackend()
        case TapSpec():
            return TapBackend.open(spec.ifname, vnet_hdr=spec.vnet_hdr,
                                   tx_queue_limit=tx_queue_limit)
        case StreamSpec():
            return await StreamBackend.open(spec, tx_queue_limit=tx_queue_limit)
        case DgramSpec():
            return await DgramBackend.open(spec, tx_queue_limit=tx_queue_limit)
