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
            hint = " (the file system may not support O_DIRECT; drop --direct)" if (
                direct and exc.errno == errno.EINVAL) else ""
            raise ImageError(exc.errno, f"cannot open disk image {path}: "
                             f"{exc.strerror}{hint}") from None
        try:
            self.is_block_device, size, self.block_size = self._probe()
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size - size % SECTOR_SIZE
        """Bytes served: the image's size rounded down to whole sectors."""
        self._libc = _Libc()

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
