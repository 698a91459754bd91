"""A FUSE file system with one file, ``ram``, for tests of guest RAM a client maps from a
file whose page faults wait for another process (pyfuse3, libfuse's own Python binding).

Run as ``python -m tests.server.fuse_ram MOUNTPOINT SIZE [--stall-from OFFSET]``: mounts,
prints ``mounted`` and serves until SIGTERM or SIGINT, then unmounts. ``ram`` holds SIZE
zero bytes and takes writes; with ``--stall-from``, a read of any byte at OFFSET or after
never returns, as a FUSE daemon that hangs (or a network file system whose server went
away) leaves a page fault waiting.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

RAM_INODE = pyfuse3.ROOT_INODE + 1
RAM_NAME = b"ram"


class RamFs(pyfuse3.Operations):
    def __init__(self, size: int, stall_from: int | None) -> None:
        super().__init__()
        self.size = size
        self.stall_from = stall_from
        self.data = bytearray(size)

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
        elif inode == RAM_INODE:
            entry.st_mode = stat.S_IFREG | 0o666
            entry.st_size = self.size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_ino = inode
        entry.st_uid, entry.st_gid = os.getuid(), os.getgid()
        entry.attr_timeout = entry.entry_timeout = 300
        return entry

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: object = None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == RAM_NAME:
            return await self.getattr(RAM_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
        if inode != RAM_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if self.stall_from is not None and off + size > self.stall_from:
            await trio.sleep_forever()
        return bytes(self.data[off:off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        end = min(off + len(buf), self.size)
        self.data[off:end] = buf[:end - off]
        return len(buf)


async def serve(mountpoint: str, fs: RamFs) -> None:
    options = set(pyfuse3.default_options) | {"fsname=vfuserver-test-ram"}
    pyfuse3.init(fs, mountpoint, options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            # no readahead: a page fault reads its own page, so the pages before
            # stall_from never fetch (and cache) the ones after it
            device = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
            with open(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb",
                      "w") as read_ahead:
                read_ahead.write("0")
            print("mounted", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint")
    parser.add_argument("size", type=lambda text: int(text, 0))
    parser.add_argument("--stall-from", type=lambda text: int(text, 0))
    args = parser.parse_args(argv)
    trio.run(serve, args.mountpoint, RamFs(args.size, args.stall_from))
    return 0


if __name__ == "__main__":
    sys.exit(main())
