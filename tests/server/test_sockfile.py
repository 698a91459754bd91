"""vfuserver.sockfile with real unix sockets in tmp_path."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfuserver.sockfile import SocketFile, bind_unix, owner_only_umask, prepare_socket_path


def dead_socket(path: Path, kind: int = socket.SOCK_STREAM) -> None:
    """What a killed server leaves: the file stays, nobody holds the socket."""
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.bind(str(path))


@pytest.fixture
def live_listener(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen(1)
        yield path


def test_nothing_there_is_free(tmp_path: Path) -> None:
    assert prepare_socket_path(str(tmp_path / "none.sock")) is False


def test_a_missing_directory_and_a_long_path_are_named(tmp_path: Path) -> None:
    # Found trying the server as an operator: the README's first command, on a machine
    # without /run/vfuserver, said only "vfu_create_ctx(...): No such file or directory".
    missing = tmp_path / "run" / "vfuserver"
    with pytest.raises(FileNotFoundError, match=rf"its directory {missing} does not exist; "
                                                rf"create it \(mkdir -p {missing}\)"):
        prepare_socket_path(str(missing / "net0.sock"))
    longest = str(tmp_path / ("a" * (107 - len(str(tmp_path)) - 1)))
    assert len(longest) == 107 and prepare_socket_path(longest) is False
    with pytest.raises(OSError, match=r"108 bytes, and a UNIX socket path holds at most "
                                      r"107") as raised:
        prepare_socket_path(longest + "a")
    assert raised.value.errno == errno.ENAMETOOLONG


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM],
                         ids=["stream", "dgram"])
def test_stale_socket_is_removed(tmp_path: Path, kind: int) -> None:
    path = tmp_path / "stale.sock"
    dead_socket(path, kind)
    assert prepare_socket_path(str(path)) is True
    assert not path.exists()


def test_live_listener_is_refused(live_listener: Path) -> None:
    with pytest.raises(FileExistsError, match="held by a running server") as raised:
        prepare_socket_path(str(live_listener))
    assert raised.value.errno == errno.EADDRINUSE
    assert stat.S_ISSOCK(os.lstat(live_listener).st_mode)


def test_live_listener_with_a_full_backlog_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen(0)
        waiting = []
        try:
            while True:  # fill the backlog: the next connect answers EAGAIN
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                waiting.append(peer)
                peer.connect(str(path))
        except BlockingIOError:
            pass
        try:
            with pytest.raises(FileExistsError, match="held by a running server"):
                prepare_socket_path(str(path))
        finally:
            for peer in waiting:
                peer.close()
        assert path.exists()


def test_live_datagram_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dgram.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        with pytest.raises(FileExistsError, match="held by a running server"):
            prepare_socket_path(str(path))
        assert path.exists()


def test_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket") as raised:
        prepare_socket_path(str(path))
    assert raised.value.errno == errno.EEXIST
    assert path.read_text() == "precious"


def test_bind_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "private.sock"
    old = os.umask(0)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            bound = bind_unix(sock, str(path))
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert os.umask(0) == 0  # restored
    finally:
        os.umask(old)
    assert bound == SocketFile.at(str(path))
    assert os.lstat(path).st_uid == os.geteuid()


def test_owner_only_umask_is_restored_after_an_error() -> None:
    before = os.umask(0o022)
    try:
        with pytest.raises(OSError), owner_only_umask():
            assert os.umask(0o177) == 0o177
            raise OSError(errno.EIO, "bind failed")
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


def test_bind_replaces_a_stale_socket_and_refuses_a_live_one(tmp_path: Path,
                                                             live_listener: Path) -> None:
    stale = tmp_path / "stale.sock"
    dead_socket(stale)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        bind_unix(sock, str(stale))
        assert sock.getsockname() == str(stale)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, \
            pytest.raises(FileExistsError):
        bind_unix(sock, str(live_listener))


def test_remove_unlinks_the_file_we_bound(tmp_path: Path) -> None:
    path = tmp_path / "ours.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        bound = bind_unix(sock, str(path))
        assert SocketFile.of(sock) == bound
    assert bound.remove() is True
    assert not path.exists()
    assert bound.remove() is False  # already gone: no error


def test_remove_leaves_a_socket_another_server_put_there(tmp_path: Path) -> None:
    path = tmp_path / "taken.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ours, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as theirs:
        bound = bind_unix(ours, str(path))
        # ours never listened (refuses connections, as a hung server's would): a second
        # server replaces the file and serves on the path
        theirs_file = bind_unix(theirs, str(path))
        theirs.listen(1)
        assert theirs_file != bound
        assert bound.remove() is False
        assert SocketFile.at(str(path)) == theirs_file


def test_remove_leaves_a_regular_file_put_there(tmp_path: Path) -> None:
    path = tmp_path / "replaced.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        bound = bind_unix(sock, str(path))
    path.unlink()
    path.write_text("someone else's")
    assert bound.remove() is False
    assert path.read_text() == "someone else's"


def test_remove_after_the_operator_changed_mode_and_owner(tmp_path: Path) -> None:
    # Operators open the 0600 socket to a non-root QEMU; the file is still ours to remove.
    path = tmp_path / "shared.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        bound = bind_unix(sock, str(path))
    os.chmod(path, 0o660)
    os.chown(path, os.geteuid(), 4242)
    assert bound.remove() is True
    assert not path.exists()


@pytest.mark.parametrize("field", ["inode", "device"])
def test_remove_checks_the_whole_identity(tmp_path: Path, field: str) -> None:
    path = tmp_path / "owned.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        bound = bind_unix(sock, str(path))
    # a file that differs in one part is not ours to remove
    other = dataclasses.replace(bound, **{field: getattr(bound, field) + 1})
    assert other.remove() is False
    assert path.exists()
    assert bound.remove() is True


def test_socket_file_of_non_unix_and_abstract_sockets_is_none() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        assert SocketFile.of(inet) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract:
        abstract.bind(b"\0vfuserver-sockfile-test-%d" % os.getpid())
        assert SocketFile.of(abstract) is None


def test_socket_file_at_refuses_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("")
    with pytest.raises(FileExistsError, match="not a socket"):
        SocketFile.at(str(path))
