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

A third makes it wait: a file whose page faults (and opens) are answered by another
process or over the network, on FUSE (which an unprivileged client can mount in a user
namespace of its own) or NFS, CIFS, 9p, ... A daemon that never answers leaves whatever
touches the map asleep in the kernel for good: the thread serving the device, holding the
device's lock, and the event loop every device shares once it takes that lock (a disk's
completion, a stats query). :func:`stall_risk` tells such a file from guest RAM by the
mapping's device number alone (/proc/self/maps, /proc/self/mountinfo), without touching
the file, and the map is refused.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

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


MOUNTINFO = "/proc/self/mountinfo"
MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "hugetlbfs", "ramfs", "devtmpfs"})
"""Whose pages are RAM: a fault never waits for I/O."""
MFD_HUGE_SHIFT = 26
"""memfd_create(2): log2 of the huge page size goes in the flags' bits 26..31."""
LOCAL_FILE_SYSTEMS = frozenset({"btrfs", "bcachefs", "zfs"})
"""Local disk file systems that report a device number of their own (major 0) rather than
their disk's. One on a block device (major != 0) is taken as local too: a loop, NBD or
iSCSI disk behind it would have to be set up by root, not by a client."""


class Mapping(NamedTuple):
    """One mapping of this process, as /proc/self/maps shows it."""

    start: int
    end: int
    offset: int
    """File offset of :attr:`start`."""
    name: str
    """The file's path ("/memfd:guest-ram (deleted)" for a memfd)."""
    device: int
    """Device number of the file's file system."""


def mapping_at(address: int) -> Mapping:
    """The mapping holding ``address``; read once per DMA map, for :func:`stall_risk` and
    :func:`inspect`. Errors: FileNotFoundError if no mapping holds it."""
    with open(MAPS, "rb") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start_text, _, end_text = fields[0].partition(b"-")
            start, end = int(start_text, 16), int(end_text, 16)
            if start <= address < end:
                name = fields[5].strip().decode(errors="replace") if len(fields) > 5 else ""
                major, _, minor = fields[3].partition(b":")
                return Mapping(start, end, int(fields[2], 16), name,
                               os.makedev(int(major, 16), int(minor, 16)))
    raise FileNotFoundError(errno.ENOENT, "no mapping holds this address", hex(address))


def _mounted_types() -> dict[int, str]:
    """File system type of each device number mounted in this mount namespace."""
    types = {}
    with open(MOUNTINFO, "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            major, _, minor = fields[2].partition(b":")
            # after the optional fields, " - " then the type
            types[os.makedev(int(major), int(minor))] = fields[fields.index(b"-") + 1].decode(
                errors="replace")
    return types


@functools.cache
def _internal_memory_devices() -> frozenset[int]:
    """Device numbers of the kernel's internal shmem and hugetlbfs mounts: memfd_create(2)
    files (QEMU's memory-backend-memfd, with or without hugetlb=on) and MAP_SHARED
    anonymous or /dev/zero memory live there, in no mount table."""
    devices = set()
    flags = [0]
    for entry in _hugepage_sizes():  # hugepages-2048kB, ...
        page = int(entry.name.removeprefix("hugepages-").removesuffix("kB")) * 1024
        flags.append(os.MFD_HUGETLB | (page.bit_length() - 1) << MFD_HUGE_SHIFT)
    for flag in flags:
        try:
            fd = os.memfd_create("vfuserver-probe", os.MFD_CLOEXEC | flag)
        except OSError:  # that page size is not configured
            continue
        try:
            devices.add(os.fstat(fd).st_dev)
        finally:
            os.close(fd)
    return frozenset(devices)


def _hugepage_sizes() -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir("/sys/kernel/mm/hugepages"))
    except OSError:
        return []


def stall_risk(mapping: Mapping) -> str | None:
    """Why page faults on the file behind ``mapping`` could wait on another process or the
    network (a sentence naming the file and its file system), or None if they cannot: it
    is RAM (memfd, tmpfs, hugetlbfs, ramfs) or on a local disk. Nothing but /proc is read:
    the file itself, which such a fault would wait for, is not touched.

    Errors: OSError if /proc/self/mountinfo cannot be read.
    """
    name, device = mapping.name, mapping.device
    if device in _internal_memory_devices():
        return None
    fs_type = _mounted_types().get(device)
    where = f"device {os.major(device)}:{os.minor(device)}"
    if fs_type is None:
        return (f"its file {name} is on a file system ({where}) that is not mounted in this "
                "server's mount namespace, which cannot tell whether its page faults can "
                "wait for another process (FUSE) or the network")
    if fs_type in MEMORY_FILE_SYSTEMS:
        return None
    if not fs_type.startswith("fuse") and (os.major(device) != 0
                                           or fs_type in LOCAL_FILE_SYSTEMS):
        return None
    if fs_type == "overlay":  # Linux 6.6 on: maps shows the overlay, not its layer's file
        return (f"its file {name} is on an overlay file system ({where}), which does not "
                "tell whether its layers are RAM, local disks, or file systems whose page "
                "faults wait for another process (FUSE) or the network")
    return (f"its file {name} is on a file system of type {fs_type} ({where}): its page "
            "faults wait for another process or the network, and one that never answers "
            "would stall the device's thread and whatever waits for the device")


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


def inspect(mapping: Mapping, address: int) -> Backing:
    """Seal the file behind ``mapping`` against shrinking (if it can be) and measure it,
    from ``address`` (inside ``mapping``) on.

    Errors: OSError if the file cannot be opened (PermissionError without CAP_SYS_ADMIN).
    """
    start, end, vma_offset, name, _ = mapping
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
