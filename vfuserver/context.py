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

import enum
import errno
import logging
import os
import re
import select
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from vfuserver import dma_backing
from vfuserver.binding import check, ffi, lib
from vfuserver.config import DEFAULT_POLL_MAX_NS
from vfuserver.devices.errors import GuestError
from vfuserver.devices.memory import IOVA_LIMIT, Barriers, GuestMemory, NoLostPages
from vfuserver.devices.pci import BarKind, PciFunction, Region, ResetKind
from vfuserver.devices.virtio import RateLimitedLog
from vfuserver.native import NativeDevice
from vfuserver.sockfile import SocketFile, owner_only_umask, prepare_socket_path

SHARED_MEMORY_HINT = (
    "guest RAM is not shared with the device server: start QEMU with "
    "'-object memory-backend-memfd,id=mem,size=<RAM size>,share=on "
    "-machine q35,memory-backend=mem'"
)
"""The fix for DMA maps that arrive without a file descriptor (QEMU itself says nothing)."""

ATTACH_TIMEOUT = 5.0
"""Seconds a connected client may take to complete its VERSION handshake."""

MESSAGE_TIMEOUT = 5.0
"""Seconds a client may take to send the rest of a message it started; then it is dropped
(QEMU writes each message with one sendmsg)."""

REPLY_TIMEOUT = 5.0
"""Seconds a reply may wait for a client that does not read its socket; then it is dropped."""

LIBRARY_LOG_BURST = 30
"""libvfio-user messages (INFO and above) logged per device per minute; the rest are
counted in the next one logged ("N similar messages suppressed"). A session's attach and
detach write a handful."""

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
HANDSHAKE_HANGUPS = frozenset({errno.ENOMSG, errno.ECONNRESET, errno.EPIPE})
"""How a client that leaves during its VERSION handshake (a probe of the socket) fails it:
libvfio-user's ENOMSG for an end of stream, or a reset or broken pipe on its reply."""
_VERSION_EOF = re.compile(r"failed to (recv|receive|send) version: ({})$".format(
    "|".join(re.escape(os.strerror(code)) for code in sorted(HANDSHAKE_HANGUPS))))
"""libvfio-user's words for the same: the serving loop says what happened."""

class ServeResult(enum.IntEnum):
    """Why :meth:`VfuContext.serve_client` returned."""

    DETACHED = lib.VFUSERVER_SERVE_DETACHED
    """The client left, or was dropped (:attr:`VfuContext.drop_reason`)."""
    STOPPED = lib.VFUSERVER_SERVE_STOPPED
    """:meth:`VfuContext.stop_serving` was called."""


class DropReason(enum.IntEnum):
    """Why the serving thread cut a client off (vfuserver/csrc/serve.c)."""

    NONE = lib.VFUSERVER_DROP_NONE
    CLOSED_IN_MESSAGE = lib.VFUSERVER_DROP_CLOSED_IN_MESSAGE
    STALLED = lib.VFUSERVER_DROP_STALLED
    TOO_LARGE = lib.VFUSERVER_DROP_TOO_LARGE
    RUN_ERROR = lib.VFUSERVER_DROP_RUN_ERROR
    MALFORMED = lib.VFUSERVER_DROP_MALFORMED
    REPLY_TIMEOUT = lib.VFUSERVER_DROP_REPLY_TIMEOUT
    SPURIOUS = lib.VFUSERVER_DROP_SPURIOUS


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


def c_callback(name: str, *, error: int | None, locked: bool = True,
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
    * any other Exception, a bug: logged with its traceback, ``error`` with EIO;
    * a BaseException (KeyboardInterrupt, SystemExit): stored with
      :meth:`VfuContext.remember` and re-raised once the C call has returned, ``error``
      with EIO.

    ``locked``: the method runs under the context's :attr:`~VfuContext.lock` (it touches
    the device model, which other threads touch too). The method itself is returned
    unchanged.
    """
    def register(method: Callable[Concatenate[VfuContext, _P], _R],
                 ) -> Callable[Concatenate[VfuContext, _P], _R]:
        def entry(ctx: Any, *args: _P.args, **kwargs: _P.kwargs) -> _R | int | None:
            context = _context_of(ctx)
            try:
                if locked:
                    with context.lock:
                        return method(context, *args, **kwargs)
                return method(context, *args, **kwargs)
            except CallbackErrno as refusal:
                ffi.errno = refusal.errno
            except GuestError as exc:
                context.log.debug("%s refused the client's request: %s", name, exc)
                ffi.errno = exc.errno
            except Exception as exc:  # a bug: logged now, from whichever thread runs it
                context.log.error("bug in a device callback (the client got EIO): %r", exc,
                                  exc_info=exc)
                ffi.errno = errno.EIO
            except BaseException as exc:  # re-raised outside C (report_callback_error)
                context.remember(exc)
                ffi.errno = errno.EIO
            return error

        ffi.def_extern(name=name, error=error, onerror=_last_resort)(entry)
        return method

    return register


def _context_of(ctx: Any) -> VfuContext:
    dev = ffi.cast("struct vfuserver_dev *", lib.vfu_get_private(ctx))
    context: VfuContext = ffi.from_handle(dev.handle)
    return context


def _last_resort(exc_type: type[BaseException], exc: BaseException,
                 tb: TracebackType | None) -> None:
    """cffi's onerror: only reached if :func:`c_callback`'s own wrapper fails."""
    ffi.errno = errno.EIO
    logging.getLogger("vfuserver").error("libvfio-user callback failed",
                                         exc_info=(exc_type, exc, tb))


DATA_ARMED = 1
"""From :meth:`DataPath.run_data_path`: keep polling the data path's fd."""
DATA_AGAIN = 2
"""From :meth:`DataPath.run_data_path`: more to do; call again after the next message."""
DATA_TIMER = 4
"""From :meth:`DataPath.run_data_path`: call again after
:data:`~vfuserver.native.DATA_TIMER_NS` even if nothing else comes."""


class DataPath(Protocol):
    """A device's work that the serving thread runs while a client is attached, without
    the event loop: the kicks the fast path took (the model's, run first by the context),
    then this (transmit, and receive from a backend fd), as QEMU runs a virtio-net's
    transmit bottom half and its tap's input in the thread that serves the device."""

    def attach_data_path(self) -> int | None:
        """Event loop, before a serving thread starts: take over; the fd the serving
        thread polls for input (None: none)."""

    def run_data_path(self) -> int:
        """Serving thread, after the kicks, under the device lock: what is due.
        :data:`DATA_ARMED`, :data:`DATA_AGAIN` and :data:`DATA_TIMER` bits."""

    def detach_data_path(self) -> None:
        """Event loop, after the serving thread returned: the event loop's tasks take
        over again."""


class DeviceLock:
    """The lock of one device model: the serving thread's callbacks and the event loop's
    work on the device (frames, kicks) take it, so the model runs one thing at a time.

    Re-entrant. On the outermost release it calls :attr:`publish`, which copies what the
    fast path reads (device status, IO decode) to the native side: whatever changed the
    model, the fast path sees the new state before anyone else can take the lock; then
    :attr:`hand_over`. On the outermost acquisition it calls :attr:`take_back`. The two
    let a native engine hold part of the model's state between holders of the lock (a
    virtio-net's data run in C, vfuserver/netpath.py NetRun): whoever takes the lock sees
    the model as the engine left it.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self.publish: Callable[[], None] | None = None
        self.take_back: Callable[[], None] | None = None
        self.hand_over: Callable[[], object] | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1 and self.take_back is not None:
            try:
                self.take_back()
            except BaseException:
                self._depth -= 1
                self._lock.release()
                raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._depth == 1:
                if self.publish is not None:
                    self.publish()
                if self.hand_over is not None:
                    self.hand_over()
        finally:
            self._depth -= 1
            self._lock.release()


class VfuContext:
    """One vfio-user device endpoint: a listening socket and the function behind it.

    Closing is idempotent and also happens on ``__exit__``; the socket file is removed.
    ``poll_max_ns``: how long, at most, the serving thread polls the socket for the next
    message before it sleeps, in ns (QEMU's IOThread poll-max-ns; 0: never polls).
    Errors: a libvfio-user call that fails raises the OSError subclass for its errno
    (:func:`~vfuserver.binding.check`), from the constructor, :meth:`attach` and
    :meth:`drain` alike.
    """

    def __init__(self, socket_path: str, function: PciFunction, *,
                 memory: GuestMemory | None = None,
                 logger: logging.Logger | None = None,
                 lock: DeviceLock | None = None,
                 poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.function = function
        self.log = logger or logging.getLogger(f"vfuserver.{function.name}")
        self.client_log = RateLimitedLog(self.log, burst=LIBRARY_LOG_BURST)
        """For what a client can make happen as often as it likes (libvfio-user's
        messages about an access out of bounds, a connection closed during the handshake):
        limited per device, so it cannot flood the log."""
        self.memory = memory if memory is not None else GuestMemory()
        self.memory.barriers = CPU_BARRIERS
        self.lock = lock if lock is not None else DeviceLock()
        """Taken by every callback that reaches the model, and by whoever else works on
        the device (the event loop's frames and kicks)."""
        if isinstance(self.memory.lost, NoLostPages):
            # the count the SIGBUS guard keeps for these maps (C memory, as long as the
            # GuestMemory lives: a memory shared by successive contexts keeps its count)
            self.memory.lost = ffi.new("vfuserver_lost_pages_t *")
        check(lib.vfuserver_guard_install(), "sigaction(SIGBUS)")
        self._guard_slots: dict[int, int] = {}
        """SIGBUS guard slot of each map in :attr:`memory`, by iova."""
        self.pending_error: BaseException | None = None
        self.client_attached = False
        """Set by the serving loop while a client is attached."""
        self._data_thread: int | None = None
        self._deferred: list[int] = []  # interrupts raised during the data path's run
        self.data_path: DataPath | None = None
        """Run by the serving thread while a client is attached (None: kicks go to the
        event loop, :meth:`process_kicks`)."""
        self._quiesced = threading.Event()
        self._quiesce_pending = False
        self._regions: dict[int, Region] = {}
        self._unused_maps: set[tuple[int, int]] = set()
        """DMA maps libvfio-user holds that :attr:`memory` lacks, as (iova, size): without
        an fd (firmware ROM) or refused. Known, so their unmap is no surprise."""
        self._ctx: Any = ffi.NULL
        self._handle = ffi.new_handle(self)
        self.native = NativeDevice(self._handle, poll_max_ns=poll_max_ns,
                                   message_timeout=MESSAGE_TIMEOUT, reply_timeout=REPLY_TIMEOUT)
        self._dev = self.native.dev
        self._socket_file: SocketFile | None = None
        try:
            prepare_socket_path(self.socket_path)
            with owner_only_umask():  # libvfio-user binds the socket inside vfu_create_ctx
                self._ctx = check(
                    lib.vfu_create_ctx(lib.VFU_TRANS_SOCK, self.socket_path.encode(),
                                       lib.LIBVFIO_USER_FLAG_ATTACH_NB, self._dev,
                                       lib.VFU_DEV_TYPE_PCI),
                    f"vfu_create_ctx({self.socket_path})")
        except BaseException:
            self.native.close()
            raise
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
        self._listen_fd = self.poll_fd()  # what vfu_get_poll_fd gives without a connection
        fn.attach_interrupts(_VfuInterrupts(self))
        self._setup_fast_path()

    def _setup_fast_path(self) -> None:
        """Give the native side the function's fast registers and its ISR; from now on
        every release of :attr:`lock` publishes the state they depend on."""
        if self.native.install(self.function):
            self.lock.publish = self.native.publish
            with self.lock:
                pass  # publish the initial state: the fast path is on

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
        """The listening socket's fd (the connection's while a client is attached)."""
        return int(lib.vfu_get_poll_fd(self._ctx))

    def client_hung_up(self) -> bool:
        """Whether the attached client's session is ending: it closed its end of the
        connection (QEMU exited), or the serving thread has already read that and closed
        the connection, and the session is not over yet (the serving thread detaches the
        client as soon as it reads the end of the stream, unless a callback holds it)."""
        if not self.client_attached:
            return False
        fd = self.poll_fd()
        if fd == self._listen_fd:  # libvfio-user closed the connection (tran_sock_detach)
            return True
        # The fd is the serving thread's. Closed and not yet replaced by the listening
        # socket (libvfio-user's tran_sock_detach closes it first): POLLNVAL, the session
        # is ending. Closed and its number reused since: only a spurious wait or refusal.
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR
                             | select.POLLNVAL)
                   for _, events in poller.poll(0))

    @property
    def kick_fd(self) -> int:
        """An eventfd, readable when the fast path recorded kicks: :meth:`process_kicks`."""
        return self.native.kick_fd

    def attach(self) -> None:
        """One ``vfu_attach_ctx`` (blocking for the VERSION handshake once a client is
        accepted; :meth:`interrupt` cuts it short): returns once a client is attached.

        Errors: OSError with libvfio-user's errno (:func:`~vfuserver.binding.check`);
        BlockingIOError (EAGAIN) when no client is waiting; EINTR when interrupted.
        """
        check(lib.vfuserver_attach(self._ctx, self._dev), "vfu_attach_ctx")

    def interrupt(self) -> bool:
        """Cut short the blocking call the attaching or serving thread is in (it fails
        with EINTR); False if it is in none."""
        return bool(lib.vfuserver_interrupt(self._dev))

    def serve_client(self) -> ServeResult:
        """Serve the attached client on this thread until it leaves or is dropped, or
        :meth:`stop_serving` (vfuserver/csrc/serve.c; the GIL is released while it waits).

        Region accesses on the fast path never enter Python; all others run the model's
        callbacks on this thread, under :attr:`lock`. A deferred quiesce is waited for
        here. Why a dropped client was dropped is logged.
        """
        self._dev.drop_reason = lib.VFUSERVER_DROP_NONE
        try:
            return self._serve_client()
        finally:
            self._dev.serving = 0  # however it ended, the native loop is not running

    def _serve_client(self) -> ServeResult:
        while True:
            result = lib.vfuserver_serve(self._ctx, self._dev)
            self.report_callback_error()
            if result == lib.VFUSERVER_SERVE_REPORT:
                continue
            if result == lib.VFUSERVER_SERVE_QUIESCING:
                if self._wait_quiesced():
                    continue
                result = (lib.VFUSERVER_SERVE_STOPPED if self._dev.stop
                          else lib.VFUSERVER_SERVE_DETACHED)
            self._log_drop()
            return ServeResult(result)

    def stop_serving(self) -> None:
        """Make :meth:`serve_client` return STOPPED (from any thread; idempotent until
        :meth:`serve_client` is called again)."""
        if self.native.live:
            lib.vfuserver_stop(self._dev)
            self._quiesced.set()

    def rearm(self) -> None:
        """Clear a stop request before serving the next client."""
        self._dev.stop = 0
        self._quiesced.clear()

    @property
    def drop_reason(self) -> DropReason:
        return DropReason(self._dev.drop_reason)

    def _log_drop(self) -> None:
        reason = self.drop_reason
        dev = self._dev
        if reason is DropReason.NONE:
            return
        why = {
            DropReason.CLOSED_IN_MESSAGE: "it closed the connection in the middle of a message",
            DropReason.STALLED: f"it sent part of a message and nothing more for "
                                f"{MESSAGE_TIMEOUT:g} s",
            DropReason.TOO_LARGE: f"its message header announced {dev.drop_size} bytes, "
                                  f"more than the vfio-user maximum of "
                                  f"{lib.VFUSERVER_MAX_MESSAGE}",
            DropReason.RUN_ERROR: f"vfu_run_ctx failed: {os.strerror(dev.drop_errno)}",
            DropReason.MALFORMED: "it sent a header libvfio-user refuses without reading "
                                  "the message (not a command, or a size that cannot be)",
            DropReason.REPLY_TIMEOUT: f"a reply waited {REPLY_TIMEOUT:g} s for it to read "
                                      "its socket",
            DropReason.SPURIOUS: "its socket kept polling readable with nothing to read",
        }[reason]
        self.log.warning("client of %s dropped: %s; the device is reset for the next client",
                         self.socket_path, why)

    def _wait_quiesced(self) -> bool:
        """libvfio-user holds a request until the function is quiet (quiesce_complete);
        then it runs it. False if that ended the connection (or serving was stopped).
        The held request's callbacks take :attr:`lock` themselves."""
        self._quiesced.wait()
        self._quiesced.clear()
        if self._dev.stop or self.closed:
            return False
        result = lib.vfuserver_quiesced(self._ctx, self._dev)
        if result == 1:  # the held request ended the connection
            return False
        check(result, "vfu_device_quiesced")
        return True

    def start_data_path(self) -> None:
        """Before serve_client: the serving thread runs the kicks and :attr:`data_path`."""
        if self.data_path is not None and self.native.live:
            self.native.start_data_path(self.data_path.attach_data_path())

    def stop_data_path(self) -> None:
        """After serve_client: the event loop runs the kicks again, and what the serving
        thread had not run yet."""
        if self.data_path is not None and self.native.live:
            self.native.stop_data_path()
            self.data_path.detach_data_path()
        self.process_kicks()

    def request_data_run(self) -> None:
        """Have the serving thread run the data path soon (from any thread)."""
        self.native.request_data_run()

    @c_callback("vfuserver_data_cb", error=-1)
    def _on_data(self) -> int:
        """The serving thread's data path: the kicks, then :attr:`data_path`, under
        :attr:`lock` (the fast state is published once, after both)."""
        self._data_thread = threading.get_ident()
        try:
            self.process_kicks()
            return self.data_path.run_data_path() if self.data_path is not None else 0
        finally:
            self._data_thread = None
            self._raise_deferred()

    def defer_interrupt(self, vector: int) -> None:
        """Raise ``vector`` once the data path's run ends: the client (QEMU's main loop)
        wakes once for a transmit completion and the frame that answered it, as it
        would for its own virtio-net, instead of waking, and taking the CPU, mid-run."""
        if vector not in self._deferred:
            self._deferred.append(vector)

    def _raise_deferred(self) -> None:
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, []
        self.native.publish()  # what they announce first (the lock is still held)
        for vector in deferred:
            self.raise_published(vector)

    def raise_published(self, vector: int) -> None:
        """:meth:`trigger`, once what the interrupt announces is published; a vector the
        client gave no eventfd for is only logged (at debug level: its business)."""
        if not self.trigger(vector):
            self.log.debug("interrupt %d not raised: the client gave no eventfd for it",
                           vector)

    def in_data_path(self) -> bool:
        """Whether the caller runs inside the data path (which looks at what is due
        after the kicks: no need to ask for another call)."""
        return self._data_thread == threading.get_ident()

    def process_kicks(self) -> int:
        """Run the queue notifications the fast path recorded (the model, under
        :attr:`lock`); how many queues were kicked."""
        queues = self.native.take_kicks()
        if queues:
            with self.lock:
                for index in queues:
                    self.function.kick(index)  # type: ignore[attr-defined]
        return len(queues)

    def trigger(self, vector: int) -> bool:
        """Signal interrupt ``vector`` (from any thread); False if the client gave no
        eventfd for it."""
        return bool(lib.vfuserver_trigger(self._ctx, self._dev, vector) == 0)

    def quiesce_complete(self) -> None:
        """The function is quiet: the serving thread lets libvfio-user run the request
        it held back (from any thread)."""
        if self._quiesce_pending:
            self._quiesce_pending = False
            self._quiesced.set()

    def remember(self, exc: BaseException) -> None:
        """Keep the first unexpected exception of a callback for the loop to log."""
        if self.pending_error is None:
            self.pending_error = exc
        if self.native.live:
            self._dev.report = 1

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
        if self._ctx != ffi.NULL and self._dev.serving:
            # vfu_destroy_ctx under a running vfu_run_ctx would crash the process
            raise RuntimeError(f"{self.socket_path}: close() while a client is being served; "
                               "stop_serving() and wait for serve_client() first")
        ctx, self._ctx = self._ctx, ffi.NULL
        if ctx == ffi.NULL:
            return
        if self.lock.publish == self.native.publish:
            self.lock.publish = None
        lib.vfu_destroy_ctx(ctx)
        self.native.close()
        # libvfio-user unmapped every region: nothing may still point into them
        self.memory.clear()
        self._unused_maps.clear()
        for slot in self._guard_slots.values():
            lib.vfuserver_guard_remove(slot)
        self._guard_slots.clear()
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

    @c_callback("vfuserver_log_cb", error=None, locked=False)
    def _on_log(self, level: int, msg: Any) -> None:
        """vfu_log_fn_t: libvfio-user's own messages, at the matching logging level."""
        text = ffi.string(msg).decode(errors="replace")
        py_level = _SYSLOG_TO_LOGGING.get(
            level, logging.ERROR if level < lib.LOG_ERR else logging.DEBUG)
        if (text.startswith("no fd for interrupt") or _CLIENT_COMMAND_FAILED.match(text)
                or _VERSION_EOF.match(text)):
            # the client has not wired that vector (yet), or a request of the client was
            # refused (it got the errno): the client's business, not a server error
            py_level = logging.DEBUG
        if py_level >= logging.INFO:
            self.client_log.log(py_level, "libvfio-user: %s", text)
        else:
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

        The virtio models are synchronous and run under :attr:`lock`, so they are always
        quiet here. A function may defer instead: its ``quiesce(done)`` returns False and
        calls ``done()`` (from any thread) once quiet; libvfio-user, told EBUSY, holds the
        request, and the serving thread waits for ``done`` (other devices go on).
        """
        quiesce = getattr(self.function, "quiesce", None)
        if quiesce is None:
            return 0
        self._quiesce_pending = True
        if quiesce(self.quiesce_complete):
            self._quiesce_pending = False
            return 0
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
        vaddr = int(ffi.cast("uintptr_t", info.vaddr))
        mapping = int(ffi.cast("uintptr_t", info.mapping.iov_base))
        mapping_len = int(info.mapping.iov_len)
        vma: dma_backing.Mapping | None = None
        risk = None
        try:
            found = dma_backing.mapping_at(vaddr)
            risk = dma_backing.stall_risk(found)
            vma = found
        except OSError as exc:  # /proc unreadable: nothing to go by
            self.log.warning("DMA map [%#x, +%#x): cannot tell what file is behind it (%s); "
                             "its size is trusted and only the SIGBUS guard protects the "
                             "server", iova, size, exc)
        if risk is not None:
            self._unused_maps.add((iova, size))
            self.log.error("DMA map [%#x, +%#x) refused: %s. Give the VM its RAM from "
                           "memory-backend-memfd (QEMU's choice for vfio-user), or from a "
                           "file on tmpfs, hugetlbfs or a local disk", iova, size, risk)
            return
        usable = self._backed_size(iova, size, vaddr, mapping + mapping_len, vma)
        try:
            if usable == 0:
                raise ValueError("no byte of it is backed by its file")
            # libvfio-user refuses overlaps itself; a map past 2**64 it lets through
            self.memory.add(iova, ffi.buffer(ffi.cast("char *", info.vaddr), usable),
                            writable=writable)
        except ValueError as exc:
            self._unused_maps.add((iova, size))
            self.log.error("DMA map [%#x, +%#x) refused: %s", iova, size, exc)
            return
        slot = lib.vfuserver_guard_add(info.mapping.iov_base, mapping_len, info.page_size,
                                       (iova - (vaddr - mapping)) % IOVA_LIMIT,
                                       self.memory.lost)
        if slot < 0:
            self.log.warning("DMA map [%#x, +%#x) is not guarded against SIGBUS (%s): a "
                             "client that shrinks its file can kill the server",
                             iova, size, os.strerror(ffi.errno))
        else:
            self._guard_slots[iova] = slot
        self.log.debug("DMA map [%#x, +%#x) %s", iova, size, "rw" if writable else "ro")

    def _backed_size(self, iova: int, size: int, vaddr: int, mapping_end: int,
                     vma: dma_backing.Mapping | None) -> int:
        """How many bytes of the map at ``vaddr`` (in ``vma``; None: not found) are really
        there (beyond them an access is a SIGBUS or worse); the client's file is sealed
        against shrinking on the way (:func:`dma_backing.inspect`). Each shortfall is
        logged as the client's error."""
        mapped = min(size, mapping_end - vaddr)
        if mapped < size:
            # libvfio-user maps round_up(size) bytes from round_down(offset) of the file
            # (lib/dma.c dma_map_region): short by the offset's remainder in the page
            self.log.error("DMA map [%#x, +%#x) at a file offset that is not page-aligned: "
                           "libvfio-user maps only [%#x, +%#x) of it. The client must map "
                           "from page-aligned offsets (QEMU does)", iova, size, iova, mapped)
        if vma is None:
            return mapped
        try:
            backing = dma_backing.inspect(vma, vaddr)
        except OSError as exc:
            self.log.warning("DMA map [%#x, +%#x): cannot inspect the file behind it (%s); "
                             "its size is trusted and only the SIGBUS guard protects the "
                             "server (run it as root)", iova, size, exc)
            return mapped
        if not backing.sealed:
            self.log.debug("DMA map [%#x, +%#x): %s cannot be sealed against shrinking; "
                           "the SIGBUS guard covers it", iova, size, backing.name)
        backed = backing.backed(mapped)
        if backed < mapped:
            self.log.error(
                "DMA map [%#x, +%#x) is larger than what backs it: the client's file %s "
                "holds %#x bytes from offset %#x on; only [%#x, +%#x) is used. The client "
                "must map only what its file holds (QEMU maps whole RAM blocks)",
                iova, size, backing.name, max(0, backing.file_size - backing.offset),
                backing.offset, iova, backed)
        return backed

    @c_callback("vfuserver_dma_unregister_cb", error=None)
    def _on_dma_unregister(self, info: Any) -> None:
        """vfu_dma_unregister_cb_t: a map goes away (DMA_UNMAP, a disconnect, a reset, or
        vfu_destroy_ctx); libvfio-user unmaps its memory once this returns."""
        iova, size = _dma_range(info)
        if (iova, size) in self._unused_maps:
            self._unused_maps.remove((iova, size))
            return
        lib.vfuserver_guard_remove(self._guard_slots.pop(iova, -1))
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
        context = self._context
        if context.closed:
            return
        if context.in_data_path():
            context.defer_interrupt(vector)  # published and raised at the run's end
            return
        # the model raises it under its lock: what the interrupt announces (a status,
        # NEEDS_RESET) is published before the guest can look
        context.native.publish()
        context.raise_published(vector)

