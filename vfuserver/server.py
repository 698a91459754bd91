"""The trio serving loop: one task owns each device context and its poll fd (STYLE 6)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
from collections.abc import Sequence
from typing import Protocol

import trio

from vfuserver.context import NOTHING, PARTIAL, VfuContext

MESSAGES_PER_TURN = 64
"""Messages handled back to back before yielding to the other devices' tasks."""

_NO_CLIENT = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


async def serve_device(context: VfuContext, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve clients on ``context`` one after the other, until cancelled."""
    task_status.started()
    while True:
        await _attach(context)
        context.log.info("client attached on %s", context.socket_path)
        await _run_client(context)
        context.log.info("client detached from %s", context.socket_path)


async def _attach(context: VfuContext) -> None:
    """Wait for a client and complete its handshake without freezing the event loop.

    After the non-blocking accept, libvfio-user reads the client's VERSION message with
    blocking calls: that part runs in a worker thread (cffi releases the GIL), bounded
    by the socket timeouts set on the listening socket.
    """
    context.bound_handshake()
    while True:
        await trio.lowlevel.wait_readable(context.poll_fd())
        err = await trio.to_thread.run_sync(context.attach)
        if err == 0:
            return
        if err in _NO_CLIENT:
            continue
        context.log.warning("client failed to attach: %s", os.strerror(err))
        if err in _OUT_OF_RESOURCES:
            await trio.sleep(0.1)  # the listening socket stays readable: do not spin


async def _run_client(context: VfuContext) -> None:
    fd = context.poll_fd()
    while True:
        await trio.lowlevel.wait_readable(fd)
        handled = 0
        first = True
        while True:
            state = context.queued(fd)
            if state == PARTIAL or (state == NOTHING and not first):
                break
            first = False
            result = context.run_once()
            _report_callback_error(context)
            if result == 0:
                break
            if result < 0:
                if not _handle_run_error(context, -result, fd):
                    return
                break
            handled += 1
            if handled % MESSAGES_PER_TURN == 0:
                await trio.lowlevel.checkpoint()


def _handle_run_error(context: VfuContext, err: int, fd: int) -> bool:
    """Deal with vfu_run_ctx failing; False once the client is gone."""
    if err == errno.ENOTCONN:
        return False  # libvfio-user reset the device and closed the connection
    if err == errno.EINTR:
        return True
    if err == errno.EBUSY:
        # Our quiesce callback always answers "quiesced now"; libvfio-user still
        # reports a quiesce in progress: complete it so the request goes on.
        context.log.warning("libvfio-user reported a pending quiesce; completing it")
        try:
            context.quiesced(0)
        except OSError as exc:
            context.log.error("vfu_device_quiesced: %s", exc)
        return True
    context.log.warning("dropping the client after an error from vfu_run_ctx: %s",
                        os.strerror(err))
    # Shut the connection down ourselves: the next vfu_run_ctx sees EOF and cleans up.
    try:
        with socket.socket(fileno=os.dup(fd)) as conn:
            conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


def _report_callback_error(context: VfuContext) -> None:
    exc = context.take_pending_error()
    if exc is not None:
        context.log.error("bug in a device callback (the client got EIO): %r", exc,
                          exc_info=exc)


async def serve(devices: Sequence[Servable], *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run every device until SIGINT or SIGTERM; each device closes itself on the way out."""
    log = logging.getLogger("vfuserver")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for device in devices:
                await nursery.start(device.run)
            task_status.started()
            async for signum in signals:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


class Servable(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...
