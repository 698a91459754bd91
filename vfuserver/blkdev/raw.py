"""A raw disk image: a regular file or a block device, and the blocking I/O on it.

:meth:`RawImage.execute` runs one :class:`~vfuserver.devices.virtio_blk.BlockRequest` to
the end and blocks while it does: it is called on a worker thread
(:mod:`vfuserver.blkdev.backend`), never on the event loop. Errors become the request's
``error`` (an errno), never an exception, as QEMU's raw-posix driver hands ``-errno`` to
virtio-blk.

With ``direct`` (O_DIRECT) the page cache is bypassed: buffers are page-aligned anonymous
maps and offsets and lengths whole logical blocks, which the device guarantees by
advertising :attr:`RawImage.block_size` (probed: 512, or 4096 where the file system or
disk refuses 512-byte direct I/O). FLUSH is ``fdatasync``; a write in write-through mode
(``fua``) is followed by one before it completes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from typing import Protocol

from vfuserver.protocol.virtio_blk import RequestType

SECTOR_SIZE = 512

BLKSSZGET = 0x1268
"""_IO(0x12, 104): logical block size of a block device (int)."""
BLKGETSIZE64 = 0x80081272
"""_IOR(0x12, 114, size_t): size of a block device in bytes."""
BLKDISCARD = 0x1277
"""_IO(0x12, 119): discard a byte range (u64 start, u64 length)."""
BLKZEROOUT = 0x127F
"""_IO(0x12, 127): zero a byte range (u64 start, u64 length)."""
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
ZERO_CHUNK = 1 << 20
"""Bytes written per pwrite when WRITE_ZEROES falls back to writing zeros."""

_RANGE = struct.Struct("=QQ")
_FLOCK = struct.Struct("=hhxxxxqqixxxx")
"""struct flock on x86-64 Linux: l_type, l_whence, l_start, l_len, l_pid."""

# QEMU's image locking (block/file-posix.c raw_apply_lock_bytes, raw_check_lock_bytes): a
# user of an image holds a shared OFD lock on byte LOCK_PERM_BASE + n for each permission n
# it uses, and on byte LOCK_SHARED_BASE + n for each it does not let others use. Taking the
# same bytes makes vfuserver and QEMU (and two devices of one server) refuse each other
# exactly as two QEMUs do.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}
"""BLK_PERM_* of include/block/block-common.h, and QEMU's names for them."""
SHARED_PERMS = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_RESIZE
"""What a virtio-blk disk lets others do with its image: QEMU's for its own virtio-blk
(blkconf_apply_backend_options with share-rw=off and resizable, hw/block/virtio-blk.c): a
reader or a writer keeps every other writer out. (The capacity is read once; an image
resized under the device keeps its old size for the guest until the next start.)"""
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)
"""What a file system or driver answers when it lacks a fallocate mode or an ioctl."""


class ImageError(OSError):
    """The image cannot be opened or used as a disk; the message names the fix."""


class IoRequest(Protocol):
    """What :meth:`RawImage.execute` reads and fills in of a request
    (:class:`vfuserver.devices.virtio_blk.BlockRequest`)."""

    @property
    def type(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def data(self) -> bytes: ...
    @property
    def unmap(self) -> bool: ...
    @property
    def fua(self) -> bool: ...

    error: int
    """0, or the errno of the failure."""
    result: bytes | bytearray | memoryview
    """IN: the bytes read."""


class _Libc:
    """fallocate(2) with a mode, which the os module does not offer."""

    def __init__(self) -> None:
        self._fallocate = ctypes.CDLL(None, use_errno=True).fallocate
        self._fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        self._fallocate.restype = ctypes.c_int

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        if self._fallocate(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))


class RawImage:
    """An open raw image. ``path`` is a regular file or a block device; ImageError if it
    cannot be opened or is neither. Close with :meth:`close` (idempotent)."""

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            hint = ""
            if direct and exc.errno == errno.EINVAL:
                hint = " (the file system may not support O_DIRECT; drop --direct)"
            elif not read_only and exc.errno == errno.EROFS:
                hint = (" (under systemd: the units' ProtectSystem=strict leaves only "
                        "/var/lib/vfuserver writable, add ReadWritePaths=; or serve it "
                        "--readonly)")
            elif not read_only and exc.errno in (errno.EPERM, errno.EACCES):
                hint = " (to serve it read-only: --readonly, or readonly = true)"
            raise ImageError(exc.errno, f"cannot open disk image {path}: "
                             f"{exc.strerror}{hint}") from None
        try:
            self._lock()
            self.is_block_device, size, self.block_size = self._probe()
            if size < SECTOR_SIZE:
                raise ImageError(errno.EINVAL, f"disk image {path} holds {size} bytes, not "
                                 f"one whole {SECTOR_SIZE}-byte sector: grow it (truncate -s)")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size - size % SECTOR_SIZE
        """Bytes served: the image's size rounded down to whole sectors."""
        self._libc = _Libc()

    def _lock(self) -> None:
        """Take QEMU's image locks for a guest disk (readers and writers share consistent
        reads, nobody shares writes); ImageError naming the permission if another user of
        the image (a QEMU, another vfuserver, another device of this one) conflicts."""
        perms = PERM_CONSISTENT_READ | (0 if self.read_only else PERM_WRITE)
        try:
            for perm in PERM_NAMES:
                bit = perm.bit_length() - 1
                if perms & perm:
                    self._flock(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_PERM_BASE + bit)
                if not SHARED_PERMS & perm:
                    self._flock(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_SHARED_BASE + bit)
            for perm, name in PERM_NAMES.items():
                bit = perm.bit_length() - 1
                if perms & perm and self._locked_by_another(LOCK_SHARED_BASE + bit):
                    raise BlockingIOError(errno.EAGAIN, f"another user of it does not share "
                                          f"the {name} permission")
                if not SHARED_PERMS & perm and self._locked_by_another(LOCK_PERM_BASE + bit):
                    raise BlockingIOError(errno.EAGAIN, f"another user of it has the {name} "
                                          f"permission, which this disk does not share")
        except BlockingIOError as exc:
            raise ImageError(errno.EAGAIN, f"disk image {self.path} is in use: {exc.strerror} "
                             "(QEMU's image locking). Is a QEMU, another vfuserver or "
                             "another device of this one using it? Two users may share an "
                             "image only if both are read-only") from None
        except OSError as exc:
            # a file system without OFD locks (QEMU warns and goes on without locking)
            raise ImageError(exc.errno, f"cannot lock disk image {self.path}: "
                             f"{exc.strerror}") from None

    def _flock(self, command: int, kind: int, byte: int) -> bytes:
        return fcntl.fcntl(self.fd, command, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))

    def _locked_by_another(self, byte: int) -> bool:
        """Whether another open file description holds a lock on ``byte`` (F_OFD_GETLK
        with a write lock: any lock of another conflicts with it, ours do not)."""
        kind = _FLOCK.unpack(self._flock(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte))[0]
        return bool(kind != fcntl.F_UNLCK)

    def _probe(self) -> tuple[bool, int, int]:
        mode = os.fstat(self.fd).st_mode
        if stat.S_ISBLK(mode):
            size = struct.unpack("=Q", fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8)))[0]
            logical = struct.unpack("=i", fcntl.ioctl(self.fd, BLKSSZGET, bytes(4)))[0]
            return True, size, logical if self.direct else SECTOR_SIZE
        if not stat.S_ISREG(mode):
            raise ImageError(errno.EINVAL, f"disk image {self.path} is neither a regular "
                             "file nor a block device")
        size = os.fstat(self.fd).st_size
        return False, size, self._direct_block_size(size) if self.direct else SECTOR_SIZE

    def _direct_block_size(self, size: int) -> int:
        """512 if a 512-byte O_DIRECT read works here, else 4096 (QEMU raw_probe_alignment's
        idea, reduced to the two sizes disks have)."""
        if size < 4096:
            return SECTOR_SIZE
        with mmap.mmap(-1, 4096) as buffer:
            try:
                os.preadv(self.fd, [memoryview(buffer)[:SECTOR_SIZE]], 0)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                return 4096
        return SECTOR_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests (worker threads) ----------------------------------------------------

    def execute(self, request: IoRequest) -> None:
        """Run ``request`` (its ``type`` a virtio_blk RequestType) to the end; errors go to
        ``request.error``."""
        try:
            self._execute(request)
        except OSError as exc:
            request.error = exc.errno or errno.EIO

    def _execute(self, request: IoRequest) -> None:
        kind = request.type
        if kind == RequestType.IN:
            request.result = self._read(request.offset, request.length)
        elif kind == RequestType.OUT:
            self._write(request.offset, request.data)
            if request.fua:
                os.fdatasync(self.fd)
        elif kind == RequestType.FLUSH:
            os.fdatasync(self.fd)
        elif kind == RequestType.DISCARD:
            self._discard(request.offset, request.length)
        elif kind == RequestType.WRITE_ZEROES:
            self._write_zeroes(request.offset, request.length, request.unmap)
        else:
            raise OSError(errno.EOPNOTSUPP, f"request type {kind}")

    def _buffer(self, length: int) -> bytearray | mmap.mmap:
        """A buffer O_DIRECT accepts (page-aligned) when direct, else a bytearray."""
        return mmap.mmap(-1, length) if self.direct else bytearray(length)

    def _read(self, offset: int, length: int) -> memoryview:
        view = memoryview(self._buffer(length))
        done = 0
        while done < length:
            count = os.preadv(self.fd, [view[done:]], offset + done)
            if count == 0:  # the image shrank under us
                raise OSError(errno.EIO, f"end of {self.path} at {offset + done}")
            done += count
        return view

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        source: bytes | memoryview = data
        aligned = None
        if self.direct:
            aligned = mmap.mmap(-1, len(data))
            aligned[:] = data
            source = memoryview(aligned)
        try:
            view = memoryview(source)
            done = 0
            while done < len(view):
                done += os.pwritev(self.fd, [view[done:]], offset + done)
            view.release()
        finally:
            if aligned is not None:
                if isinstance(source, memoryview):
                    source.release()
                aligned.close()

    def _discard(self, offset: int, length: int) -> None:
        """Advisory (QEMU ignores ENOTSUP for discard): a disk that cannot, keeps the data."""
        try:
            if self.is_block_device:
                fcntl.ioctl(self.fd, BLKDISCARD, _RANGE.pack(offset, length))
            else:
                self._libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                     offset, length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero the range cheaply if the file system or disk can, else write zeros."""
        try:
            if self.is_block_device:
                fcntl.ioctl(self.fd, BLKZEROOUT, _RANGE.pack(offset, length))
            else:
                mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
                self._libc.fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        zeros = bytes(min(length, ZERO_CHUNK))
        done = 0
        while done < length:
            part = min(length - done, len(zeros))
            self._write(offset + done, memoryview(zeros)[:part])
            done += part
