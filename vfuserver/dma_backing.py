"""The file behind a DMA map, and how much of the map it really backs.

libvfio-user mmaps the file descriptor a client sends with DMA_MAP (lib/dma.c
dma_map_region) and hands the device only the resulting address: its register callback
carries no fd. The kernel still knows the file: ``/proc/self/maps`` gives the mapping's
file offset, and ``/proc/self/map_files/<start>-<end>`` opens the file itself (following
that link needs CAP_SYS_ADMIN, or CAP_CHECKPOINT_RESTORE, in the initial user namespace:
proc_map_files_get_link in fs/proc/base.c).

Two client faults make a map disagree with its file, and both end in SIGBUS on the
host's first access to a page past the end of the file (mm/filemap.c filemap_fault):

* the map is larger than the file from its offset on (issue 12, input 3): the map is
  clipped here to what the file holds, and the client is told in the log;
* the client shrinks the file (ftruncate) after mapping it: :func:`inspect` first seals
  the file against shrinking (F_SEAL_SHRINK, memfd_create(2)); QEMU's
  memory-backend-memfd is sealed that way already (its ``seal=on`` default). A file that
  cannot be sealed (not a memfd, or a memfd without MFD_ALLOW_SEALING) is covered by the
  server's SIGBUS guard instead (vfuserver/csrc/vfuserver.c).
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

MAPS = "/proc/self/maps"
MAP_FILES = "/proc/self/map_files"


@dataclass(frozen=True)
class Backing:
    """The file behind one mapping of this process, as found at map time."""

    name: str
    """What /proc/self/maps calls it ("/memfd:guest-ram (deleted)", a path)."""
    offset: int
    """File offset of the address asked about."""
    file_size: int
    """Bytes in the file, read after sealing it."""
    sealed: bool
    """The file cannot shrink any more (F_SEAL_SHRINK is set)."""

    def backed(self, length: int) -> int:
        """How many of ``length`` bytes from :attr:`offset` on the file holds."""
        return max(0, min(length, self.file_size - self.offset))


def _vma_of(address: int) -> tuple[int, int, int, str]:
    """(start, end, file offset of start, name) of the mapping holding ``address``."""
    with open(MAPS, "rb") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start_text, _, end_text = fields[0].partition(b"-")
            start, end = int(start_text, 16), int(end_text, 16)
            if start <= address < end:
                name = fields[5].strip().decode(errors="replace") if len(fields) > 5 else ""
                return start, end, int(fields[2], 16), name
    raise FileNotFoundError(errno.ENOENT, "no mapping holds this address", hex(address))


def _seal_against_shrinking(fd: int) -> bool:
    """Add F_SEAL_SHRINK if the file allows it; whether the file is now sealed."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: not a file that supports seals (not a memfd)
        return False
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:  # EPERM: F_SEAL_SEAL is set (memfd without MFD_ALLOW_SEALING)
        return False
    return True


def inspect(address: int) -> Backing:
    """Seal the file mapped at ``address`` against shrinking (if it can be) and measure it.

    Errors: OSError if the mapping or its file cannot be found or opened (no such
    mapping; PermissionError without CAP_SYS_ADMIN).
    """
    start, end, vma_offset, name = _vma_of(address)
    link = f"{MAP_FILES}/{start:x}-{end:x}"
    try:
        fd = os.open(link, os.O_RDWR | os.O_CLOEXEC)  # F_ADD_SEALS needs a writable fd
    except PermissionError:
        fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sealed = _seal_against_shrinking(fd)
        size = os.fstat(fd).st_size  # after the seal: it cannot shrink behind our back
    finally:
        os.close(fd)
    return Backing(name, vma_offset + address - start, size, sealed)
