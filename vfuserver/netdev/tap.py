"""The ``tap`` backend: a tap device in the server's network namespace (QEMU
net/tap-linux.c).

Frames carry the 12-byte virtio_net_hdr_v1 in front when ``vnet_hdr=on`` (the default, as
QEMU's tap does when the kernel supports it); the offloads the guest takes are passed on
with TUNSETOFFLOAD, so the kernel hands over checksum and segmentation work only to a guest
that does it.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import pwd
import struct

import trio

from vfuserver.netdev.backend import (
    TX_QUEUE_LIMIT,
    VNET_HDR_LEN,
    Deliver,
    NetOffloads,
    QueuedBackend,
    close_waking,
    log,
)
from vfuserver.netdev.errors import NetdevHostError

TUN_DEVICE = "/dev/net/tun"

# <linux/if_tun.h>, <linux/if.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_IFREQ = struct.Struct("16sH22x")


class TunOffload(enum.IntFlag):
    """TUNSETOFFLOAD's argument (<linux/if_tun.h> TUN_F_*): what the reader of the tap,
    here the guest, can take in the virtio-net header of a received frame."""

    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10
    USO4 = 0x20
    USO6 = 0x40


def tun_offload(offloads: NetOffloads) -> TunOffload:
    """The TUN_F_* flags for ``offloads``, as QEMU's tap_fd_set_offload(): nothing without
    checksum offload (segmentation needs it), ECN only with TSO."""
    flags = TunOffload(0)
    if not offloads.csum:
        return flags
    flags |= TunOffload.CSUM
    for on, flag in ((offloads.tso4, TunOffload.TSO4), (offloads.tso6, TunOffload.TSO6),
                     (offloads.ecn and (offloads.tso4 or offloads.tso6), TunOffload.TSO_ECN),
                     (offloads.ufo, TunOffload.UFO), (offloads.uso4, TunOffload.USO4),
                     (offloads.uso6, TunOffload.USO6)):
        if on:
            flags |= flag
    return flags


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


class TapBackend(QueuedBackend):
    """A tap device in the server's network namespace (QEMU net/tap-linux.c, tap_open())."""

    def __init__(self, fd: int, ifname: str, vnet_hdr: bool, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.fd, self.ifname, self.vnet_hdr = fd, ifname, vnet_hdr
        self.offload: TunOffload | None = None
        """What TUNSETOFFLOAD last set (None: not set yet)."""

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
        tap = cls(fd, name, vnet_hdr, tx_queue_limit=tx_queue_limit)
        # No guest offloads until a driver takes them (QEMU's net_tap_fd_init()): a tap kept
        # from an earlier user may still have some on.
        tap.set_offload(NetOffloads())
        return tap

    def set_offload(self, offloads: NetOffloads) -> None:
        """TUNSETOFFLOAD, as QEMU's tap_fd_set_offload(): a kernel that refuses USO (before
        Linux 6.2), then UFO too, gets the rest; one that refuses even that is logged."""
        if self._closed:
            return
        wanted = tun_offload(offloads)
        uso = TunOffload.USO4 | TunOffload.USO6
        error: OSError | None = None
        for flags in dict.fromkeys((wanted, wanted & ~uso, wanted & ~uso & ~TunOffload.UFO)):
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, int(flags))
            except OSError as exc:
                error = exc
                continue
            self.offload = flags
            return
        log.warning("tap %s: cannot set offloads %s (TUNSETOFFLOAD): %s", self.ifname,
                    wanted, error)

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
            close_waking(self.fd)
