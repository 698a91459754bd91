"""A Pythonic owner of one libvfio-user context (``vfu_ctx_t *``) and its callbacks.

Every C-to-Python callback is a method of :class:`VfuContext` made a C entry point by one
decorator, :func:`c_callback` (pygit2's ``libgit2_callback``; STYLE 5): no Python
exception ever reaches C. A callback that fails returns the C error value with
``ffi.errno`` set to what the client should see; an expected refusal (a
:class:`GuestError`) is answered with its errno, anything else is a bug: stored on the
context, answered with EIO, and logged by the serving loop after ``vfu_run_ctx``
returns. (A bare ``def_extern`` would return 0 on an exception, which libvfio-user reads
as "0 bytes handled": a silent wrong answer.)
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from vfuserver.binding import check, ffi, lib
from vfuserver.devices.errors import GuestError
from vfuserver.devices.memory import Barriers, GuestMemory
from vfuserver.devices.pci import BarKind, PciFunction, Region, ResetKind
from vfuserver.sockfile import SocketFile, owner_only_umask, prepare_socket_path

SHARED_MEMORY_HINT = (
    "guest RAM is not shared with the device server: start QEMU with "
    "'-object memory-backend-memfd,id=mem,size=<RAM size>,share=on "
    "-machine q35,memory-backend=mem'"
)
"""The fix for DMA maps that arrive without a file descriptor (QEMU itself says nothing)."""

ATTACH_TIMEOUT = 5.0
"""Seconds a connected client may take to send each part of its VERSION handshake."""

CPU_BARRIERS = Barriers(lib.vfuserver_smp_mb, lib.vfuserver_smp_wmb, lib.vfuserver_smp_rmb)
"""The rings' barriers as real CPU fences (__atomic_thread_fence, in the cffi extension)."""

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

_P = ParamSpec("_P")
_R = TypeVar("_R")


class CallbackErrno(Exception):
    """Raised by a callback to fail on purpose: libvfio-user gets the C error value with
    ``errno`` (vfu_device_quiesce_cb_t's EBUSY: "quiet later"). Nothing is logged."""

    def __init__(self, errno_value: int) -> None:
        super().__init__(os.strerror(errno_value))
        self.errno = errno_value


def c_callback(name: str, *, error: int | None,
               ) -> Callable[[Callable[Concatenate[VfuContext, _P], _R]],
                             Callable[Concatenate[VfuContext, _P], _R]]:
    """Make the decorated :class:`VfuContext` method the C entry point ``name``.

    ``name`` is an ``extern "Python"`` of vfuserver/decl/libvfio-user.h whose first
    argument is the ``vfu_ctx_t *``; the method gets the context it belongs to (its
    private pointer) as ``self`` and the other C arguments as they are. ``error`` is the C
    error value (None for a void callback). When the method raises:

    * :class:`CallbackErrno`: ``error`` with its errno;
    * :class:`GuestError` (the client asked for something invalid): ``error`` with its
      errno, logged at debug level;
    * anything else, a bug: stored with :meth:`VfuContext.remember` for the serving loop
      to log (or re-raise, for a KeyboardInterrupt), ``error`` with EIO.

    The method itself is returned unchanged.
    """
    def register(method: Callable[Concatenate[VfuContext, _P], _R],
                 ) -> Callable[Concatenate[VfuContext, _P], _R]:
        def entry(ctx: Any, *args: _P.args, **kwargs: _P.kwargs) -> _R | int | None:
            context = _context_of(ctx)
            try:
                return method(context, *args, **kwargs)
            except CallbackErrno as refusal:
                ffi.errno = refusal.errno
            except GuestError as exc:
                context.log.debug("%s refused the client's request: %s", name, exc)
                ffi.errno = exc.errno
            except BaseException as exc:
                context.remember(exc)
                ffi.errno = errno.EIO
            return error

        ffi.def_extern(name=name, error=error, onerror=_last_resort)(entry)
        return method

    return register


def _context_of(ctx: Any) -> VfuContext:
    context: VfuContext = ffi.from_handle(lib.vfu_get_private(ctx))
    return context


def _last_resort(exc_type: type[BaseException], exc: BaseException,
                 tb: TracebackType | None) -> None:
    """cffi's onerror: only reached if :func:`c_callback`'s own wrapper fails."""
    ffi.errno = errno.EIO
    logging.getLogger("vfuserver").error("libvfio-user callback failed",
                                         exc_info=(exc_type, exc, tb))


class VfuContext:
    """One vfio-user device endpoint: a listening socket and the function behind it.

    Closing is idempotent and also happens on ``__exit__``; the socket file is removed.
    Errors: a libvfio-user call that fails raises the OSError subclass for its errno
    (:func:`~vfuserver.binding.check`), from the constructor, :meth:`attach` and
    :meth:`drain` alike.
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
        self._unused_maps: set[tuple[int, int]] = set()
        """DMA maps libvfio-user holds that :attr:`memory` lacks, as (iova, size): without
        an fd (firmware ROM) or refused. Known, so their unmap is no surprise."""
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

    def attach(self) -> None:
        """One non-blocking ``vfu_attach_ctx``: returns once a client is attached.

        Errors: OSError with libvfio-user's errno (:func:`~vfuserver.binding.check`);
        BlockingIOError (EAGAIN) when no client is waiting.
        """
        check(lib.vfu_attach_ctx(self._ctx), "vfu_attach_ctx")

    def drain(self, fd: int, limit: int, polled: bool) -> int:
        """Handle up to ``limit`` whole messages queued on ``fd``: how many were handled.

        Stops at a partial message (vfu_run_ctx would block the whole loop on it) or an
        empty queue; ``polled``: the fd just polled readable (empty then means EOF).
        Errors: OSError with the errno of vfu_run_ctx (or of the peek at the socket),
        via :func:`~vfuserver.binding.check`: ENOTCONN once the client is gone, EBUSY
        while a deferred quiesce holds a request (:attr:`quiesce_done`).
        """
        return int(check(lib.vfuserver_drain(self._ctx, fd, limit, polled), "vfu_run_ctx"))

    def trigger(self, vector: int) -> bool:
        """Signal interrupt ``vector``; False if the client gave no eventfd for it."""
        return bool(lib.vfu_irq_trigger(self._ctx, vector) == 0)

    def quiesce_complete(self) -> None:
        """The function is quiet: libvfio-user runs the request it held back."""
        event, self.quiesce_done = self.quiesce_done, None
        if event is None or self.closed:
            return
        try:
            check(lib.vfu_device_quiesced(self._ctx, 0), "vfu_device_quiesced")
        finally:
            event.set()

    def remember(self, exc: BaseException) -> None:
        """Keep the first unexpected exception of a callback for the loop to log."""
        if self.pending_error is None:
            self.pending_error = exc

    def report_callback_error(self) -> None:
        """Log the exception a callback stored (a bug; the client got EIO), once the C
        call it happened in has returned; one that is not an Exception (KeyboardInterrupt,
        SystemExit) is re-raised here instead, outside C."""
        exc, self.pending_error = self.pending_error, None
        if exc is None:
            return
        if not isinstance(exc, Exception):
            raise exc
        self.log.error("bug in a device callback (the client got EIO): %r", exc, exc_info=exc)

    def close(self) -> None:
        """Destroy the context (idempotent); the socket file is removed.

        ``vfu_destroy_ctx`` ends a client's session as a disconnect does: every DMA map
        goes through the unregister callback (which forgets it in :attr:`memory`), then
        the function is reset (LOST_CONNECTION). A bug in those callbacks is logged here.
        """
        ctx, self._ctx = self._ctx, ffi.NULL
        if ctx == ffi.NULL:
            return
        lib.vfu_destroy_ctx(ctx)
        # libvfio-user unmapped every region: nothing may still point into them
        self.memory.clear()
        self._unused_maps.clear()
        # libvfio-user of this vintage never unlinks the socket it bound
        if self._socket_file is not None:
            self._socket_file.remove()
        self.report_callback_error()

    def __enter__(self) -> VfuContext:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- libvfio-user's callbacks -------------------------------------------------------

    @c_callback("vfuserver_region_cb", error=-1)
    def _on_region_access(self, index: int, buf: Any, count: int, offset: int,
                          is_write: bool) -> int:
        """vfu_region_access_cb_t: ``count`` bytes at ``offset`` of region ``index``."""
        region = self._regions[index]
        if is_write:
            region.write(offset, ffi.buffer(buf, count)[:])
            return count
        data = region.read(offset, count)
        if len(data) != count:
            raise RuntimeError(f"region {index} read returned {len(data)} of {count} bytes")
        ffi.memmove(buf, data, count)
        return count

    @c_callback("vfuserver_log_cb", error=None)
    def _on_log(self, level: int, msg: Any) -> None:
        """vfu_log_fn_t: libvfio-user's own messages, at the matching logging level."""
        text = ffi.string(msg).decode(errors="replace")
        py_level = _SYSLOG_TO_LOGGING.get(
            level, logging.ERROR if level < lib.LOG_ERR else logging.DEBUG)
        if text.startswith("no fd for interrupt") or _CLIENT_COMMAND_FAILED.match(text):
            # the client has not wired that vector (yet), or a request of the client was
            # refused (it got the errno): the client's business, not a server error
            py_level = logging.DEBUG
        self.log.log(py_level, "libvfio-user: %s", text)

    @c_callback("vfuserver_reset_cb", error=-1)
    def _on_reset(self, reset_type: int) -> int:
        """vfu_reset_cb_t: the client reset the device, or went away."""
        kind = _RESET_KINDS.get(reset_type, ResetKind.DEVICE)
        self.log.info("device reset (%s)", kind.value)
        self.function.reset(kind)
        return 0

    @c_callback("vfuserver_quiesce_cb", error=-1)
    def _on_quiesce(self) -> int:
        """vfu_device_quiesce_cb_t: libvfio-user wants the device quiet (before DMA map and
        unmap and reset).

        The virtio models are synchronous and run on the loop's thread, so they are
        always quiet here. A function may defer instead: its ``quiesce(done)`` returns
        False and calls ``done()`` once quiet; until then the serving loop waits on
        :attr:`quiesce_done`, and libvfio-user, told EBUSY, holds the request.
        """
        quiesce = getattr(self.function, "quiesce", None)
        if quiesce is None or quiesce(self.quiesce_complete):
            return 0
        self.quiesce_done = trio.Event()
        raise CallbackErrno(errno.EBUSY)  # vfu_run_ctx answers EBUSY until quiesce_complete()

    @c_callback("vfuserver_dma_register_cb", error=None)
    def _on_dma_register(self, info: Any) -> None:
        """vfu_dma_register_cb_t: the client mapped guest memory (a RAM block or ROM)."""
        iova, size = _dma_range(info)
        writable = bool(info.prot & lib.PROT_WRITE)
        if info.vaddr == ffi.NULL:
            self._unused_maps.add((iova, size))
            if writable:
                # Guest RAM arrives writable; firmware ROM arrives read-only without an fd
                # even when RAM is shared, so only the writable case is the misconfiguration.
                self.log.error("DMA map [%#x, +%#x) arrived without a file descriptor: %s",
                               iova, size, SHARED_MEMORY_HINT)
            else:
                self.log.debug("read-only DMA map [%#x, +%#x) without fd (firmware) ignored",
                               iova, size)
            return
        if any(known.iova == iova and known.size == size for known in self.memory):
            # libvfio-user takes an exact repeat of a map (same file, offset, protection)
            # as the map it has (dma_controller_add_region) and registers it again; it
            # unregisters it once, so the device keeps the one map it knows.
            self.log.debug("DMA map [%#x, +%#x) repeated", iova, size)
            return
        backing = ffi.buffer(ffi.cast("char *", info.vaddr), size)
        try:
            self.memory.add(iova, backing, writable=writable)
        except ValueError as exc:  # libvfio-user refuses overlaps itself: a bug if reached
            self._unused_maps.add((iova, size))
            self.log.error("DMA map [%#x, +%#x) refused: %s", iova, size, exc)
            return
        self.log.debug("DMA map [%#x, +%#x) %s", iova, size, "rw" if writable else "ro")

    @c_callback("vfuserver_dma_unregister_cb", error=None)
    def _on_dma_unregister(self, info: Any) -> None:
        """vfu_dma_unregister_cb_t: a map goes away (DMA_UNMAP, a disconnect, a reset, or
        vfu_destroy_ctx); libvfio-user unmaps its memory once this returns."""
        iova, size = _dma_range(info)
        if (iova, size) in self._unused_maps:
            self._unused_maps.remove((iova, size))
            return
        try:
            self.memory.remove(iova)
        except KeyError:
            self.log.warning("DMA unmap of unknown map at %#x", iova)


def _dma_range(info: Any) -> tuple[int, int]:
    """A vfu_dma_info_t's guest range: (iova, size in bytes)."""
    return int(ffi.cast("uintptr_t", info.iova.iov_base)), int(info.iova.iov_len)


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
