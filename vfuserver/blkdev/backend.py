"""The virtio-blk device's backend over a raw image: a bounded pool of worker threads.

The device model calls :meth:`ImageBackend.submit` synchronously from a libvfio-user
callback, on whatever thread serves the device; submit only queues the request and wakes
the trio loop (``TrioToken.run_sync_soon``, safe from any thread). One task per request
runs :meth:`RawImage.execute` on a worker thread (``trio.to_thread.run_sync`` under a
:class:`trio.CapacityLimiter`: at most ``workers`` requests touch the disk at once, the
rest wait their turn), so disk I/O never blocks the event loop and requests of one queue
finish in whatever order the disk finishes them. Finished requests are handed back in
batches to the ``complete`` callable given to :meth:`ImageBackend.run`: the one place the
trio side touches the device model.
"""

from __future__ import annotations

import errno
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from vfuserver.blkdev.raw import IoRequest, RawImage
from vfuserver.protocol.virtio_blk import RequestType

log = logging.getLogger("vfuserver.blkdev")

DEFAULT_WORKERS = 16
"""Requests on the disk at once: enough to keep an NVMe queue busy from one guest queue,
few enough that a guest cannot make the server spawn threads without bound."""

Complete = Callable[[list[IoRequest]], None]


class BackendClosedError(OSError):
    """The backend no longer takes requests (the device is shutting down)."""


@dataclass
class ImageStats:
    """What the backend did, for the operator."""

    submitted: int = 0
    completed: int = 0
    errors: int = 0
    """Requests that finished with an errno."""
    peak_in_flight: int = 0


class ImageBackend:
    """A :class:`~vfuserver.devices.virtio_blk.BlockBackend` over a :class:`RawImage`."""

    def __init__(self, image: RawImage, *, workers: int = DEFAULT_WORKERS) -> None:
        self.image = image
        self.size = image.size
        self.block_size = image.block_size
        self.read_only = image.read_only
        self.limiter = trio.CapacityLimiter(workers)
        self.stats = ImageStats()
        self._submitted: deque[IoRequest] = deque()
        """Requests submitted, not yet started; appended from any thread."""
        self._finished: list[IoRequest] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._work = trio.Event()
        self._done = trio.Event()
        self._in_flight = 0
        self._closed = False

    def submit(self, request: IoRequest) -> None:
        """Queue ``request`` and wake the loop; BackendClosedError once not running."""
        token = self._token
        if token is None or self._closed:
            raise BackendClosedError(errno.ESHUTDOWN, "the disk backend is not running")
        self._submitted.append(request)
        try:
            token.run_sync_soon(self._wake, idempotent=True)
        except trio.RunFinishedError:
            raise BackendClosedError(errno.ESHUTDOWN, "the event loop has ended") from None

    def _wake(self) -> None:
        self._work.set()

    async def run(self, complete: Complete, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run requests and hand them to ``complete`` as they finish, until cancelled.

        Cancelling waits for the requests on the disk (a worker thread cannot be
        interrupted) but completes none of them: the device is going away.
        """
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._completer, complete)
            task_status.started()
            while True:
                await self._work.wait()
                self._work = trio.Event()
                while self._submitted:
                    nursery.start_soon(self._execute, self._submitted.popleft())

    async def _execute(self, request: IoRequest) -> None:
        self.stats.submitted += 1
        self._in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
        try:
            await trio.to_thread.run_sync(self.image.execute, request, limiter=self.limiter)
        except Exception:  # a bug in execute: the guest still gets its answer
            log.exception("disk request %s failed", RequestType(request.type).name)
            request.error = errno.EIO
        finally:
            self._in_flight -= 1
        if request.error:
            self.stats.errors += 1
        self._finished.append(request)
        self._done.set()

    async def _completer(self, complete: Complete) -> None:
        """Finished requests go back in batches: everything that finished while the loop
        was busy costs one call (one flush of each used ring, one interrupt)."""
        while True:
            await self._done.wait()
            self._done = trio.Event()
            batch, self._finished = self._finished, []
            self.stats.completed += len(batch)
            try:
                complete(batch)
            except Exception:
                log.exception("bug while completing %d disk requests", len(batch))

    def close(self) -> None:
        """Refuse new requests and close the image (idempotent)."""
        self._closed = True
        self.image.close()
