"""The trio serving loop: one task owns each device context and its poll fd (STYLE 6)."""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import outcome
import trio

from vfuserver.context import ATTACH_TIMEOUT, HANDSHAKE_HANGUPS, VfuContext

INTERRUPT_RETRY = 0.05
"""Seconds between attempts to cut short a thread's blocking call (a signal can arrive just
before the call starts)."""

_NO_CLIENT = (errno.EAGAIN, errno.EWOULDBLOCK)

_T = TypeVar("_T")


async def serve_device(context: VfuContext, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve clients on ``context`` one after the other, until cancelled.

    The event loop waits for a client; each attached client is then served by a thread of
    its own (:meth:`VfuContext.serve_client`, native code with the GIL released): what a
    client does, or fails to do, holds that thread only. The kicks the fast path records
    are run here, under the device lock. Cancelling stops the thread.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_kicks, context)
        task_status.started()
        while True:
            await _attach(context)
            context.client_attached = True
            context.log.info("client attached on %s", context.socket_path)
            try:
                context.rearm()
                context.start_data_path()
                try:
                    await _on_thread(context.serve_client, context.stop_serving)
                finally:
                    context.stop_data_path()
            finally:
                context.client_attached = False
            context.log.info("client detached from %s", context.socket_path)


async def _run_kicks(context: VfuContext) -> None:
    """The queue notifications the fast path recorded, run by the model (an ioeventfd's
    handler in QEMU: virtio_queue_host_notifier_read)."""
    while True:
        await trio.lowlevel.wait_readable(context.kick_fd)
        try:
            context.process_kicks()
        except Exception:
            context.log.exception("bug while processing a queue notification")


async def _attach(context: VfuContext) -> None:
    """Wait for a client and complete its handshake without freezing the event loop.

    After the accept, libvfio-user reads the client's VERSION with blocking calls: that
    runs on a thread, and a client that has not completed it after ATTACH_TIMEOUT is cut
    off (AF_UNIX sockets do not inherit the listener's SO_RCVTIMEO).
    """
    while True:
        await trio.lowlevel.wait_readable(context.poll_fd())
        timed_out = False

        def cut_off() -> None:
            nonlocal timed_out
            timed_out = True
            context.interrupt()

        try:
            await _on_thread(context.attach, context.interrupt, timeout=ATTACH_TIMEOUT,
                             on_timeout=cut_off)
        except OSError as exc:
            if exc.errno in _NO_CLIENT:
                continue
            if timed_out:
                context.log.warning("client on %s sent no VERSION within %g s: disconnected",
                                    context.socket_path, ATTACH_TIMEOUT)
                continue
            if exc.errno in HANDSHAKE_HANGUPS:
                context.client_log.log(
                    logging.INFO, "a client of %s closed the connection during its VERSION "
                    "handshake (a probe, such as another vfuserver checking whether the "
                    "socket is in use)", context.socket_path)
                continue
            context.log.warning("client failed to attach: %s", os.strerror(exc.errno or errno.EIO))
            await trio.sleep(0.1)  # the listening socket may stay readable: do not spin
        else:
            return


async def _on_thread(call: Callable[[], _T], stop: Callable[[], object], *,
                     timeout: float = math.inf,
                     on_timeout: Callable[[], object] | None = None) -> _T:
    """Run ``call`` on a thread of its own and wait for it. Cancellation calls ``stop``
    (and a timeout ``on_timeout``) until ``call`` returns; the thread is never abandoned.
    """
    finished = False

    async def watchdog() -> None:
        nudge = stop
        try:
            await trio.sleep(timeout)
            if on_timeout is not None:
                nudge = on_timeout
        finally:
            with trio.CancelScope(shield=True):
                while not finished:
                    nudge()
                    await trio.sleep(INTERRUPT_RETRY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog)
        try:
            # a limiter per call: one thread per attached client (the default holds 40);
            # the outcome leaves the nursery unwrapped (no ExceptionGroup around an OSError)
            result = await outcome.acapture(_in_own_thread, call)
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    return result.unwrap()


async def _in_own_thread(call: Callable[[], _T]) -> _T:
    return await trio.to_thread.run_sync(call, limiter=trio.CapacityLimiter(1))


class Servable(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


Service = Callable[..., Awaitable[object]]
"""A task started next to the devices with ``nursery.start(service)`` (the control socket)."""


class DeviceExistsError(ValueError):
    """A device of that name is already running."""


def describe_error(exc: BaseException) -> str:
    """One line for a log or a reply: the leaves of an exception group, joined."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(inner) for inner in exc.exceptions)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:  # "[Errno 2] ..." says nothing more
        text = text.removeprefix(f"[Errno {exc.errno}] ")
    return text


class _Running:
    """One device in a DeviceSet; also the task_status its run() reports to."""

    def __init__(self, name: str, device: Servable) -> None:
        self.name = name
        self.device = device
        self.scope = trio.CancelScope()
        self.is_started = False
        self.stopping = False
        self.start_error: BaseException | None = None
        self.settled = trio.Event()  # started, or ended before it could
        self.done = trio.Event()

    def started(self, value: object = None) -> None:
        self.is_started = True
        self.settled.set()


class DeviceSet:
    """The devices one server runs, by name: one nursery (serve()'s), a cancel scope each.

    Devices come and go while the server runs; one that fails is logged, with its name and
    the reason, and the others go on. :meth:`start` and :meth:`stop` work while
    :func:`serve` runs the set.
    """

    def __init__(self) -> None:
        self.log = logging.getLogger("vfuserver")
        self.errors: dict[str, str] = {}
        """Why each device that stopped on its own stopped (cleared when it starts again)."""
        self._running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()

    def __contains__(self, name: object) -> bool:
        return name in self._running

    def __len__(self) -> int:
        return len(self._running)

    def get(self, name: str) -> Servable | None:
        entry = self._running.get(name)
        return entry.device if entry is not None else None

    def names(self) -> list[str]:
        return list(self._running)

    async def start(self, name: str, device: Servable) -> None:
        """Run ``device`` until stopped or the server stops; returns once it serves (its
        socket exists). What its run() raised before that is raised here (the device
        has closed itself)."""
        if self._nursery is None:
            raise RuntimeError("devices can only be started while serve() runs the set")
        if name in self._running:
            raise DeviceExistsError(f"device {name} is already running")
        entry = _Running(name, device)
        self._running[name] = entry
        self.errors.pop(name, None)
        self._notify()
        self._nursery.start_soon(self._run, entry, name=f"vfuserver device {name}")
        await entry.settled.wait()
        if entry.start_error is not None:
            raise entry.start_error

    async def stop(self, name: str) -> None:
        """Stop the device ``name`` and wait until it has closed itself (KeyError: none)."""
        entry = self._running[name]
        entry.stopping = True
        entry.scope.cancel()
        await entry.done.wait()

    async def wait_empty(self) -> None:
        while self._running:
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _run(self, entry: _Running) -> None:
        error: BaseException | None = None
        returned = False
        try:
            with entry.scope:
                await entry.device.run(task_status=entry)
                returned = True
        except Exception as exc:  # a device's failure stops that device only
            error = exc
        finally:
            if self._running.get(entry.name) is entry:
                del self._running[entry.name]
                self._notify()
            if not entry.is_started:
                entry.start_error = error or RuntimeError(
                    f"device {entry.name} stopped before serving")
            elif error is not None:
                reason = describe_error(error)
                self.errors[entry.name] = reason
                self.log.error("device %s failed: %s; the other devices go on", entry.name,
                               reason)
                self.log.debug("device %s failed", entry.name, exc_info=error)
            elif returned and not entry.stopping:
                self.errors[entry.name] = "stopped on its own"
                self.log.warning("device %s stopped on its own", entry.name)
            entry.settled.set()
            entry.done.set()

    def _attach(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery


async def serve(devices: Mapping[str, Servable] | None = None, *,
                device_set: DeviceSet | None = None, services: Sequence[Service] = (),
                stop_when_empty: bool = False,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                ) -> signal.Signals | None:
    """Run ``devices`` (and any started into ``device_set`` later) until SIGINT, SIGTERM or
    SIGHUP (the terminal it ran in went away: a clean stop, sockets removed, where the
    default action would end the process on the spot; under nohup it stays ignored).

    Each device runs in a cancel scope of its own; a device that fails to start or fails
    later is logged and the others go on. ``services`` (the control socket) start once the
    devices serve; ``task_status.started()`` follows, when every socket exists. With
    ``stop_when_empty``, the server also stops once no device is left (nothing could add
    one). Returns the signal that stopped it, or None when it ran out of devices. Each
    device closes itself on the way out.
    """
    log = logging.getLogger("vfuserver")
    device_set = device_set if device_set is not None else DeviceSet()
    stopped_by: list[signal.Signals] = []
    stop_signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's stays ignored
        stop_signals.append(signal.SIGHUP)
    with trio.open_signal_receiver(*stop_signals) as signals:
        async with trio.open_nursery() as nursery:
            device_set._attach(nursery)

            async def watch_signals() -> None:
                async for signum in signals:
                    stopped_by.append(signal.Signals(signum))
                    log.info("%s received: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch_signals)
            for name, device in (devices or {}).items():
                try:
                    await device_set.start(name, device)
                except Exception as exc:
                    log.error("device %s failed to start: %s; the other devices go on",
                              name, describe_error(exc))
            for service in services:
                await nursery.start(service)
            task_status.started()
            if stop_when_empty:
                await device_set.wait_empty()
                log.error("no device left to serve: stopping")
                nursery.cancel_scope.cancel()
        device_set._attach(None)
    return stopped_by[0] if stopped_by else None
