"""Unix socket files: clear a stale one, create ours owner-only, remove only ours.

A server that dies leaves its socket file behind, and ``bind()`` then fails with
EADDRINUSE. QEMU simply unlinks whatever is at the path (``unix_listen_saddr()``,
``net_init_dgram()``); here a file is only removed when it is a socket nobody serves
any more, so a running server's socket and an operator's regular file are never taken
over. On the way out a server removes the file only if it is still the one it bound
(same device, inode, owner and change time): a second server that has since taken the
path keeps its socket. Pure standard library (os, socket, stat); one idea, used by the vfio-user
context, the control socket and the netdev sockets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass

OWNER_ONLY_UMASK = 0o177
"""The umask under which a socket file is created 0600 (bind() applies the umask to 0777)."""
SUN_PATH_BYTES = 108
"""sizeof(sockaddr_un.sun_path) on Linux: a path of at most 107 bytes and its NUL (unix(7))."""


def prepare_socket_path(path: str) -> bool:
    """Make ``path`` free for a new socket: True if a stale socket file was removed.

    Nothing there: False. A socket whose server is gone (connecting is refused): it is
    removed. Errors: OSError(ENAMETOOLONG) if ``path`` is too long for a socket,
    FileNotFoundError(ENOENT) if its directory does not exist (messages naming the fix),
    FileExistsError(EEXIST) if ``path`` is not a socket,
    FileExistsError(EADDRINUSE) if a server (of any socket type) still holds it, another
    OSError if it cannot be probed (EACCES: no write permission on it).

    The probe is a SOCK_STREAM connect: a live stream listener accepts it (or its backlog
    is full: EAGAIN), a live datagram socket answers EPROTOTYPE, and a file whose socket
    was closed refuses it (ECONNREFUSED) whatever its type (unix(7)).
    """
    length = len(os.fsencode(path))
    if length >= SUN_PATH_BYTES:
        raise OSError(errno.ENAMETOOLONG, f"{path}: {length} bytes, and a UNIX socket path "
                                          f"holds at most {SUN_PATH_BYTES - 1}; choose a "
                                          "shorter one")
    directory = os.path.dirname(path) or "."
    try:
        os.stat(directory)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{path}: its directory {directory} does not "
                                              f"exist; create it (mkdir -p {directory}) or "
                                              "choose another path") from None
    except OSError as exc:  # EACCES on a parent, ENOTDIR: the kernel's word is the right one
        raise OSError(exc.errno, f"{path}: its directory {directory}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # nobody listens: left behind by a server that died
            return True
        except FileNotFoundError:
            return False  # removed meanwhile
        except BlockingIOError:
            pass  # the listener's backlog is full: it is alive
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:  # EPROTOTYPE: a live socket of another type
                raise OSError(exc.errno, f"{path}: cannot tell whether a server holds it: "
                                         f"{exc.strerror}") from exc
    raise FileExistsError(errno.EADDRINUSE,
                          f"{path} is held by a running server; stop it or choose another path")


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """Files created inside are owner-only (0600 for a socket); the umask is restored.

    The umask is per process: for a socket bound by a library (libvfio-user's
    vfu_create_ctx), this is the only way to choose its mode at creation, with no window
    in which another user could connect.
    """
    old = os.umask(OWNER_ONLY_UMASK)
    try:
        yield
    finally:
        os.umask(old)


@dataclass(frozen=True)
class SocketFile:
    """The socket file a server created: where, and which file (to remove only that one).

    A file is its (device, inode): an operator's chmod or chown (to let a non-root QEMU in)
    changes neither, so the file is still removed on the way out. A file system may give
    a file created later the inode number of one just freed; such a successor at the same
    path is indistinguishable by stat (as it is for QEMU and the kernel's unix sockets).
    """

    path: str
    device: int
    inode: int

    @classmethod
    def at(cls, path: str) -> SocketFile:
        """The socket file just created at ``path``; FileNotFoundError, or
        FileExistsError(EEXIST) if what is there is not a socket."""
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} is not a socket")
        return cls(path, st.st_dev, st.st_ino)

    @classmethod
    def of(cls, sock: socket.socket) -> SocketFile | None:
        """The file a bound AF_UNIX socket created; None for other families, unbound and
        abstract-namespace sockets (they have no file)."""
        if sock.family != socket.AF_UNIX:
            return None
        path = sock.getsockname()
        if not isinstance(path, str) or not path:
            return None
        return cls.at(path)

    def is_there(self) -> bool:
        """Whether ``path`` is still this socket file."""
        try:
            return SocketFile.at(self.path) == self
        except OSError:
            return False

    def remove(self) -> bool:
        """Unlink ``path`` if it is still this file; True if it was removed.

        A file someone else has put there since (another server that took over a path it
        found stale, an operator's file) is left alone. Never raises: it runs on the way
        out of a server, where the file may already be gone.
        """
        if not self.is_there():
            return False
        try:
            os.unlink(self.path)
        except OSError:
            return False
        return True


def bind_unix(sock: socket.socket, path: str, *, owner_only: bool = True) -> SocketFile:
    """Bind AF_UNIX ``sock`` to ``path``: a stale socket file there is replaced first
    (:func:`prepare_socket_path`, and its errors), the new file is 0600 unless
    ``owner_only`` is False. Returns the file, for :meth:`SocketFile.remove` on close."""
    prepare_socket_path(path)
    if owner_only:
        with owner_only_umask():
            sock.bind(path)
    else:
        sock.bind(path)
    return SocketFile.at(path)
