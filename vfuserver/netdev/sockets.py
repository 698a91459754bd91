"""The socket backends, peers of QEMU's ``-netdev stream`` and ``-netdev dgram``.

The wire formats follow QEMU so either end can be a QEMU: ``stream`` prefixes each frame
with its length as a 4-byte big-endian integer (net/stream_data.c,
net_stream_data_receive), ``dgram`` sends one frame per datagram (net/dgram.c); neither
carries a virtio-net header.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import trio

from vfuserver.netdev.backend import (
    NET_BUFSIZE,
    TX_QUEUE_LIMIT,
    Deliver,
    QueuedBackend,
    close_waking,
    log,
)
from vfuserver.netdev.errors import NetdevHostError
from vfuserver.netdev.options import DgramSpec, SocketAddress, StreamSpec, UnixAddress
from vfuserver.sockfile import SocketFile, prepare_socket_path

_LENGTH = struct.Struct(">I")


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


def _stale_socket_removed(path: str) -> bool:
    """Whether a unix socket file nobody serves any more was at ``path`` and is gone now.

    QEMU unlinks whatever is at the path (net_init_dgram(), unix_listen_saddr()); a running
    peer's socket (or any other file) is never taken over here.
    """
    try:
        return prepare_socket_path(path)
    except OSError:  # in use, not a socket, or not checkable: the bind error stands
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
                    and _stale_socket_removed(addr.path)):
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
        close_waking(sock)
        raise
    return sock


class StreamBackend(QueuedBackend):
    """A peer of QEMU's ``-netdev stream``: 4-byte big-endian length, then the frame."""

    def __init__(self, spec: StreamSpec, family: int, sockaddr: str | tuple[str, int],
                 listener: socket.socket | None, peer: socket.socket | None,
                 **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.spec, self._family, self._sockaddr = spec, family, sockaddr
        self._listener, self._first_peer = listener, peer
        self._bound = SocketFile.of(listener) if listener else None
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
        if self._peer_scope is not None:  # send() may run on a device's serving thread
            self._loop.call(self._peer_scope.cancel)

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
            close_waking(peer)
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
                    close_waking(sock)
            if self._bound is not None:
                self._bound.remove()  # only if the file is still the one we bound


class DgramBackend(QueuedBackend):
    """A peer of QEMU's ``-netdev dgram``: one frame per datagram, sent to ``remote``.

    As QEMU, the socket is not connected: frames are sent with sendto() and received from
    anyone (net_dgram_send() reads with recv()).
    """

    def __init__(self, spec: DgramSpec, sock: socket.socket, remote: str | tuple[str, int],
                 **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.spec, self._sock, self._remote = spec, sock, remote
        self._bound = SocketFile.of(sock)

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
            close_waking(self._sock)
            if self._bound is not None:
                self._bound.remove()  # only if the file is still the one we bound
