"""The control socket: QMP (:mod:`vfuserver.control.qmp`) on a UNIX socket, served by
``trio.serve_listeners``; the commands are a :class:`CommandExecutor`'s.

The socket is owner-only: created 0600, and a peer whose SO_PEERCRED uid is not the
server's is answered with one error object (no greeting) and disconnected.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Mapping
from functools import partial
from typing import Protocol

import trio

from vfuserver.control.qmp import (
    CLOSED,
    GENERIC_ERROR,
    MAX_MESSAGE,
    NEED_DATA,
    Execute,
    JsonValue,
    QMPError,
    ServerConnection,
    Version,
    encode,
)
from vfuserver.sockfile import SocketFile, bind_unix

log = logging.getLogger("vfuserver.control")

MAX_CONNECTIONS = 32
"""Control connections served at once; more wait in the listen backlog."""
LISTEN_BACKLOG = 16

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (socket(7), SO_PEERCRED)


class CommandExecutor(Protocol):
    """What runs the commands (vfuserver.control.controller.Controller)."""

    @property
    def version(self) -> Version: ...

    async def execute(self, name: str, arguments: Mapping[str, JsonValue]) -> JsonValue:
        """The command's return value, or QMPError."""


def peer_uid(sock: trio.socket.SocketType) -> int:
    _pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    return int(uid)


class _SlotListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts only while a connection slot is free: the others wait in the backlog.

    The connection's handler releases its slot when it ends.
    """

    def __init__(self, inner: trio.SocketListener, slots: trio.Semaphore) -> None:
        self.inner = inner
        self.slots = slots

    async def accept(self) -> trio.SocketStream:
        await self.slots.acquire()
        try:
            return await self.inner.accept()
        except BaseException:
            self.slots.release()
            raise

    async def aclose(self) -> None:
        await self.inner.aclose()


class ControlServer:
    """The control socket: owner-only (0600), and peers of another uid are refused.

    The file mode keeps other users out; the SO_PEERCRED check also refuses root's peers
    when the server runs as another user, and anything that got hold of a connected fd.
    """

    def __init__(self, path: str, executor: CommandExecutor, *,
                 owner_uid: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self.executor = executor
        self.owner_uid = os.geteuid() if owner_uid is None else owner_uid
        self._slots = trio.Semaphore(MAX_CONNECTIONS)
        self._sock: socket.socket | None = None
        self._socket_file: SocketFile | None = None

    def bind(self) -> socket.socket:
        """Create the socket file (0600) and listen; OSError says why not. Idempotent."""
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._socket_file = bind_unix(sock, self.path)  # owner-only (0600)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            # Python's "AF_UNIX path too long" comes without an errno or strerror
            err = exc.errno or (errno.ENAMETOOLONG if len(os.fsencode(self.path)) >= 108
                                else errno.EINVAL)
            raise OSError(err, f"control socket {self.path}: "
                               f"{exc.strerror or str(exc)}") from exc
        self._sock = sock
        return sock

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Listen (the socket exists when started), serve until cancelled, remove the file."""
        sock = self.bind()
        try:
            listener = _SlotListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                                     self._slots)
            async with trio.open_nursery() as nursery:
                # serve_listeners also rides out EMFILE and friends (it sleeps, then retries)
                await nursery.start(partial(trio.serve_listeners, self._connection, [listener]))
                log.info("control socket %s", self.path)
                task_status.started()
        finally:
            sock.close()
            self._sock = None
            socket_file, self._socket_file = self._socket_file, None
            if socket_file is not None:
                socket_file.remove()  # only if it is still ours, not a successor's

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                uid = peer_uid(stream.socket)
                if uid != self.owner_uid:
                    log.warning("control socket: refused a peer of uid %d (the server's is %d)",
                                uid, self.owner_uid)
                    await stream.send_all(encode(QMPError(
                        GENERIC_ERROR, f"permission denied: only uid {self.owner_uid} may "
                                       "control this server").reply()))
                    return
                await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("bug in a control connection (closed; the server goes on)")
        finally:
            self._slots.release()

    async def _serve(self, stream: trio.SocketStream) -> None:
        connection = ServerConnection(self.executor.version)  # the greeting is queued
        while True:
            event = connection.next_event()
            if isinstance(event, Execute):
                try:
                    value = await self.executor.execute(event.name, event.arguments)
                except QMPError as error:
                    connection.send_error(error)
                else:
                    connection.send_return(value)
            if out := connection.data_to_send():
                await stream.send_all(out)
            if event is CLOSED:
                return
            if event is NEED_DATA:
                connection.receive_data(await stream.receive_some(MAX_MESSAGE))
