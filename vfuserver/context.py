"""A Pythonic owner of one libvfio-user context (``vfu_ctx_t *``) and its callbacks.

Every C-to-Python callback is an ``@ffi.def_extern`` with ``error=-1`` (where it returns
a value) and an ``onerror`` handler: no Python exception ever reaches C. A callback
that fails sets ``ffi.errno`` to what the client should see and, for anything that is
not an expected guest error, stores the exception on its context; the serving loop
logs it after ``vfu_run_ctx`` returns (STYLE 5).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
from types import TracebackType
from typing import Any

import trio

from vfuserver.binding import check, ffi, lib
from vfuserver.devices.errors import GuestError, GuestMemoryError
from vfuserver.devices.memory import Barriers, GuestMemory
from vfuserver.devices.pci import BarKind, PciFunction, Region, ResetKind
from vfuserver.sockfile import SocketFile, owner_only_umask
from vfuserver.sockfile import prepare_socket_path as prepare_socket_path  # control.py's import

SHARED_MEMORY_HINT = (
    "guest RAM is not shared with the device server: start QEMU with "
    "'-object memory-backend-memfd,id=mem,size=<RAM size>,share=on "
    "-machine q35,memory-backend=mem'"
)
"""The fix for DMA maps that arrive without a file descriptor (QEMU itself says nothing)."""

ATTACH_TIMEOUT = 5.0

CPU_BARRIERS = Barriers(lib.vfuserver_smp_mb, lib.vfuserver_smp_wmb, lib.vfuserver_smp_rmb)
"""The rings' barriers as real CPU fences (__atomic_thread_fence, in the cffi extension)."""
"""Seconds a connected client may take to send each part of its VERSION handshake."""

_SYSLOG_TO_LOGGING = {
    lib.LOG_ERR: logging.ERROR,
    lib.LOG_WARNING: logging.WARNING,
    lib.LOG_NOTICE: logging.INFO,
    lib.LOG_INFO: logging.INFO,
    lib.LOG_DEBUG: logging.DEBUG,
}

_CLIENT_COMMAND_FAILED = re.compile(r"msg0x[0-9a-f]+: cmd \d+ failed")

_RESET_KINDS = {
    lib.VFU_RESET_DEVICE: ResetKind.DEVICE,
    lib.VFU_RESET_LOST_CONN: ResetKind.LOST_CONNECTION,
    lib.VFU_RESET_PCI_FLR: ResetKind.FLR,
}


class VfuContext:
    """One vfio-user device endpoint: a listening socket and the function behind it.

    Closing is idempotent and also happens on ``__exit__``; the socket file is removed.
    """

    def __init__(self, socket_path: str, function: PciFunction, *,
                 memory: GuestMemory | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.function = function
        self.log = logger or logging.getLogger(f"vfuserver.{function.name}")
        self.memory = memory if memory is not None else GuestMemory()
        self.memory.barriers = CPU_BARRIERS
        self.pending_error: BaseException | None = None
        self.client_attached = False
        """Set by the serving loop while a client is attached."""
        self.quiesce_done: trio.Event | None = None
        """Set while a deferred quiesce is pending (see :meth:`_on_quiesce`)."""
        self._regions: dict[int, Region] = {}
        self._ctx: Any = ffi.NULL
        self._handle = ffi.new_handle(self)
        self._socket_file: SocketFile | None = None
        prepare_socket_path(self.socket_path)
        with owner_only_umask():  # libvfio-user binds the socket inside vfu_create_ctx
            self._ctx = check(
                lib.vfu_create_ctx(lib.VFU_TRANS_SOCK, self.socket_path.encode(),
                                   lib.LIBVFIO_USER_FLAG_ATTACH_NB, self._handle,
                                   lib.VFU_DEV_TYPE_PCI),
                f"vfu_create_ctx({self.socket_path})")
        try:
            self._socket_file = SocketFile.at(self.socket_path)
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------

    def _setup(self) -> None:
        ctx, fn = self._ctx, self.function
        level = lib.LOG_DEBUG if self.log.isEnabledFor(logging.DEBUG) else lib.LOG_INFO
        check(lib.vfu_setup_log(ctx, lib.vfuserver_log_cb, level), "vfu_setup_log")
        check(lib.vfu_pci_init(ctx, lib.VFU_PCI_TYPE_CONVENTIONAL, lib.PCI_HEADER_TYPE_NORMAL,
                               0), "vfu_pci_init")
        # Config space is emulated by the function (ALWAYS_CB). Declaring the region
        # also fixes this libvfio-user's vfu_pci_init, which leaves the config region's
        # flags at 0 so GET_REGION_INFO reports it neither readable nor writable.
        self._add_region(lib.VFU_PCI_DEV_CFG_REGION_IDX, fn.config.size, fn.config_region(),
                         lib.VFU_REGION_FLAG_RW | lib.VFU_REGION_FLAG_ALWAYS_CB)
        for bar in fn.bars():
            flags = lib.VFU_REGION_FLAG_RW
            if bar.kind is not BarKind.IO:
                flags |= lib.VFU_REGION_FLAG_MEM
            # Never mmap-able: QEMU then posts memory-BAR writes (no reply wait).
            self._add_region(lib.VFU_PCI_DEV_BAR0_REGION_IDX + bar.index, bar.size, bar.region,
                             flags)
        if fn.intx:
            # INTx: QEMU asserts the line on the eventfd and deasserts it at the guest's
            # next BAR access; the ISR says why. No unmask hook is needed: an interrupt
            # raised meanwhile just asserts the line again.
            check(lib.vfu_setup_device_nr_irqs(ctx, lib.VFU_DEV_INTX_IRQ, 1), "INTx irqs")
        if fn.msix_vectors:
            check(lib.vfu_setup_device_nr_irqs(ctx, lib.VFU_DEV_MSIX_IRQ, fn.msix_vectors),
                  "MSI-X irqs")
        check(lib.vfu_setup_device_reset_cb(ctx, lib.vfuserver_reset_cb), "reset callback")
        lib.vfu_setup_device_quiesce_cb(ctx, lib.vfuserver_quiesce_cb)
        check(lib.vfu_setup_device_dma(ctx, lib.vfuserver_dma_register_cb,
                                       lib.vfuserver_dma_unregister_cb), "DMA callbacks")
        check(lib.vfu_realize_ctx(ctx), "vfu_realize_ctx")
        fn.attach_interrupts(_VfuInterrupts(self))

    def _add_region(self, index: int, size: int, region: Region, flags: int) -> None:
        self._regions[index] = region
        check(lib.vfu_setup_region(self._ctx, index, size,
                                   lib.vfuserver_region_trampoline(index), flags, ffi.NULL, 0,
                                   -1, 0), f"vfu_setup_region({index})")

    # -- the loop's primitives ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return bool(self._ctx == ffi.NULL)

    def poll_fd(self) -> int:
        """The fd to wait on: the listening socket, or the connection once attached.

        libvfio-user replaces it inside attach and after a disconnect: query it again
        after each of those.
        """
        return int(lib.vfu_get_poll_fd(self._ctx))

    def bound_handshake(self) -> None:
        """Bound the blocking VERSION handshake inside ``vfu_attach_ctx``.

        Linux copies SO_RCVTIMEO/SO_SNDTIMEO from a listening socket to the sockets it
        accepts, so a client that connects and stays silent fails the handshake after
        ATTACH_TIMEOUT instead of holding the attach forever.
        """
        _set_socket_timeouts(self.poll_fd(), ATTACH_TIMEOUT)

    def attach(self) -> int:
        """One non-blocking ``vfu_attach_ctx``: 0 attached, else the errno (EAGAIN: none)."""
        if lib.vfu_attach_ctx(self._ctx) == 0:
            return 0
        return int(ffi.errno)

    def drain(self, fd: int, limit: int, polled: bool) -> int:
        """Handle up to ``limit`` whole messages queued on ``fd``: how many, or -errno.

        Stops at a partial message (vfu_run_ctx would block the whole loop on it) or an
        empty queue; ``polled``: the fd just polled readable (empty then means EOF).
        """
        return int(lib.vfuserver_drain(self._ctx, fd, limit, polled))

    def _on_quiesce(self) -> bool:
        """libvfio-user wants the device quiet (before DMA map/unmap and reset).

        The virtio models are synchronous and run on the loop's thread, so they are
        always quiet here. A function may defer instead: its ``quiesce(done)`` returns
        False and calls ``done()`` once quiet; until then the serving loop waits on
        :attr:`quiesce_done` and libvfio-user holds the request.
        """
        quiesce = getattr(self.function, "quiesce", None)
        if quiesce is None or quiesce(self.quiesce_complete):
            return True
        self.quiesce_done = trio.Event()
        return False

    def quiesce_complete(self) -> None:
        """The function is quiet: libvfio-user runs the request it held back."""
        event, self.quiesce_done = self.quiesce_done, None
        if event is None or self.closed:
            return
        try:
            check(lib.vfu_device_quiesced(self._ctx, 0), "vfu_device_quiesced")
        finally:
            event.set()

    def trigger(self, vector: int) -> bool:
        """Signal interrupt ``vector``; False if the client gave no eventfd for it."""
        return bool(lib.vfu_irq_trigger(self._ctx, vector) == 0)

    def remember(self, exc: BaseException) -> None:
        """Keep the first unexpected exception of a callback for the loop to log."""
        if self.pending_error is None:
            self.pending_error = exc

    def take_pending_error(self) -> BaseException | None:
        err, self.pending_error = self.pending_error, None
        return err

    def close(self) -> None:
        """Destroy the context (idempotent); the socket file is removed."""
        ctx, self._ctx = self._ctx, ffi.NULL
        if ctx == ffi.NULL:
            return
        self.memory.clear()
        lib.vfu_destroy_ctx(ctx)
        # libvfio-user of this vintage never unlinks the socket it bound
        if self._socket_file is not None:
            self._socket_file.remove()

    def __enter__(self) -> VfuContext:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- callback bodies (called from the def_extern functions below) --------------------

    def _on_dma_register(self, info: Any) -> None:
        iova, size = int(ffi.cast("uintptr_t", info.iova.iov_base)), int(info.iova.iov_len)
        writable = bool(info.prot & lib.PROT_WRITE)
        if info.vaddr == ffi.NULL:
            if writable:
                # Guest RAM arrives writable; firmware ROM arrives read-only without an fd
                # even when RAM is shared, so only the writable case is the misconfiguration.
                self.log.error("DMA map [%#x, +%#x) arrived without a file descriptor: %s",
                               iova, size, SHARED_MEMORY_HINT)
            else:
                self.log.debug("read-only DMA map [%#x, +%#x) without fd (firmware) ignored",
                               iova, size)
            return
        backing = ffi.buffer(ffi.cast("char *", info.vaddr), size)
        self.memory.add(iova, backing, writable=writable)
        self.log.debug("DMA map [%#x, +%#x) %s", iova, size, "rw" if writable else "ro")

    def _on_dma_unregister(self, info: Any) -> None:
        iova = int(ffi.cast("uintptr_t", info.iova.iov_base))
        if info.vaddr == ffi.NULL:
            return
        try:
            self.memory.remove(iova)
        except KeyError:
            self.log.warning("DMA unmap of unknown map at %#x", iova)

    def _on_reset(self, kind: ResetKind) -> None:
        self.log.info("device reset (%s)", kind.value)
        self.function.reset(kind)


class _VfuInterrupts:
    """The function's interrupt sink over ``vfu_irq_trigger``."""

    def __init__(self, context: VfuContext) -> None:
        self._context = context

    def trigger(self, vector: int) -> None:
        if not self._context.closed:
            self._context.trigger(vector)


def _set_socket_timeouts(fd: int, seconds: float) -> None:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.settimeout(None)  # keep the fd's blocking mode as libvfio-user set it
        timeval = int(seconds).to_bytes(8, "little") + int(
            (seconds % 1) * 1e6).to_bytes(8, "little")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    finally:
        sock.close()


# -- C entry points -------------------------------------------------------------------------


def _context_of(ctx: Any) -> VfuContext:
    context: VfuContext = ffi.from_handle(lib.vfu_get_private(ctx))
    return context


def _region_onerror(exc_type: type[BaseException], exc: BaseException,
                    tb: TracebackType | None) -> None:
    ffi.errno = errno.EIO
    logging.getLogger("vfuserver").error("region callback failed", exc_info=(exc_type, exc, tb))


@ffi.def_extern(error=-1, onerror=_region_onerror)  # type: ignore[untyped-decorator]
def vfuserver_region_cb(handle: Any, index: int, buf: Any, count: int, offset: int,
                        is_write: bool) -> int:
    context: VfuContext = ffi.from_handle(handle)
    region = context._regions[index]
    try:
        if is_write:
            region.write(offset, ffi.buffer(buf, count)[:])
        else:
            data = region.read(offset, count)
            if len(data) != count:
                raise RuntimeError(f"region {index} read returned {len(data)} of {count} bytes")
            ffi.memmove(buf, data, count)
    except GuestError as exc:
        # expected: the guest asked for something invalid; it gets the errno
        context.log.debug("region %d %s at %#x+%d refused: %s", index,
                          "write" if is_write else "read", offset, count, exc)
        ffi.errno = exc.errno
        return -1
    except Exception as exc:
        context.remember(exc)
        ffi.errno = errno.EIO
        return -1
    return count


@ffi.def_extern(onerror=_region_onerror)  # type: ignore[untyped-decorator]
def vfuserver_log_cb(ctx: Any, level: int, msg: Any) -> None:
    context = _context_of(ctx)
    text = ffi.string(msg).decode(errors="replace")
    py_level = _SYSLOG_TO_LOGGING.get(
        level, logging.ERROR if level < lib.LOG_ERR else logging.DEBUG)
    if text.startswith("no fd for interrupt") or _CLIENT_COMMAND_FAILED.match(text):
        # the client has not wired that vector (yet), or a request of the client was
        # refused (it got the errno): the client's business, not a server error
        py_level = logging.DEBUG
    context.log.log(py_level, "libvfio-user: %s", text)


@ffi.def_extern(error=-1, onerror=_region_onerror)  # type: ignore[untyped-decorator]
def vfuserver_reset_cb(ctx: Any, reset_type: int) -> int:
    context = _context_of(ctx)
    try:
        context._on_reset(_RESET_KINDS.get(reset_type, ResetKind.DEVICE))
    except Exception as exc:
        context.remember(exc)
        ffi.errno = errno.EIO
        return -1
    return 0


@ffi.def_extern(error=-1, onerror=_region_onerror)  # type: ignore[untyped-decorator]
def vfuserver_quiesce_cb(ctx: Any) -> int:
    context = _context_of(ctx)
    try:
        if context._on_quiesce():
            return 0
    except Exception as exc:
        context.remember(exc)
        ffi.errno = errno.EIO
        return -1
    ffi.errno = errno.EBUSY  # vfu_run_ctx answers EBUSY until quiesce_complete()
    return -1


@ffi.def_extern(onerror=_region_onerror)  # type: ignore[untyped-decorator]
def vfuserver_dma_register_cb(ctx: Any, info: Any) -> None:
    context = _context_of(ctx)
    try:
        context._on_dma_register(info)
    except (ValueError, GuestMemoryError) as exc:
        context.log.error("DMA map refused: %s", exc)
    except Exception as exc:
        context.remember(exc)


@ffi.def_extern(onerror=_region_onerror)  # type: ignore[untyped-decorator]
def vfuserver_dma_unregister_cb(ctx: Any, info: Any) -> None:
    context = _context_of(ctx)
    try:
        context._on_dma_unregister(info)
    except Exception as exc:
        context.remember(exc)
