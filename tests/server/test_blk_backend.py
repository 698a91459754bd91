"""The disk backend on the trio loop: worker threads, bounds, out-of-order completion.

A real :class:`RawImage` on a real file; :class:`GatedImage` holds chosen requests on their
worker thread until the test opens their gate (the disk being slow for them), then does
the real I/O.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from vfuserver.blkdev.backend import BackendClosedError, ImageBackend
from vfuserver.blkdev.raw import IoRequest, RawImage
from vfuserver.devices.virtio_blk import BlockRequest
from vfuserver.protocol.virtio_blk import RequestType


class GatedImage(RawImage):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gates: dict[int, threading.Event] = {}

    def execute(self, request: IoRequest) -> None:
        gate = self.gates.get(request.offset)
        if gate is not None:
            gate.wait(10)
        super().execute(request)


@pytest.fixture
def image(tmp_path: Path) -> GatedImage:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 64)
    return GatedImage(str(path))


async def test_requests_complete_as_they_finish(image: GatedImage) -> None:
    backend = ImageBackend(image, workers=4)
    batches: list[list[int]] = []
    arrived = trio.Event()

    def complete(batch: list[IoRequest]) -> None:
        batches.append([request.offset for request in batch])
        arrived.set()

    slow = BlockRequest(RequestType.IN, 0, 512)
    fast = BlockRequest(RequestType.IN, 512, 512)
    image.gates[0] = threading.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, complete)
        backend.submit(slow)
        backend.submit(fast)
        with trio.fail_after(5):
            await arrived.wait()
        assert batches == [[512]]  # the later request first: the earlier one is on the disk
        assert bytes(fast.result) == bytes(range(256)) * 2
        arrived = trio.Event()
        image.gates[0].set()
        with trio.fail_after(5):
            await arrived.wait()
        assert batches == [[512], [0]] and bytes(slow.result)[:4] == bytes([0, 1, 2, 3])
        nursery.cancel_scope.cancel()
    backend.close()
    assert backend.stats.completed == 2 and backend.stats.errors == 0


async def test_workers_are_bounded(image: GatedImage) -> None:
    backend = ImageBackend(image, workers=2)
    done: list[IoRequest] = []
    gate = threading.Event()
    requests = [BlockRequest(RequestType.IN, 512 * i, 512) for i in range(5)]
    for request in requests:
        image.gates[request.offset] = gate
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, done.extend)
        for request in requests:
            backend.submit(request)
        with trio.fail_after(5):
            while backend.limiter.borrowed_tokens < 2:
                await trio.sleep(0.01)
        await trio.sleep(0.05)
        statistics = backend.limiter.statistics()
        gate.set()
        assert (statistics.borrowed_tokens, statistics.tasks_waiting) == (2, 3)
        with trio.fail_after(5):
            while len(done) < 5:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    backend.close()


async def test_submit_from_another_thread(image: GatedImage) -> None:
    backend = ImageBackend(image)
    done = trio.Event()
    request = BlockRequest(RequestType.FLUSH)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, lambda batch: done.set())
        # the integrator's native serving thread calls submit from outside trio
        await trio.to_thread.run_sync(backend.submit, request)
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    backend.close()
    assert request.error == 0


async def test_io_errors_are_reported_not_raised(image: GatedImage, tmp_path: Path) -> None:
    backend = ImageBackend(image)
    done = trio.Event()
    request = BlockRequest(RequestType.IN, 0, 512)
    image.close()  # the fd is gone: EBADF on the worker
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, lambda batch: done.set())
        backend.submit(request)
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert request.error != 0 and backend.stats.errors == 1


async def test_submit_before_run_or_after_close_is_refused(image: GatedImage) -> None:
    backend = ImageBackend(image)
    with pytest.raises(BackendClosedError, match="not running"):
        backend.submit(BlockRequest(RequestType.FLUSH))
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, lambda batch: None)
        backend.close()
        with pytest.raises(BackendClosedError):
            backend.submit(BlockRequest(RequestType.FLUSH))
        nursery.cancel_scope.cancel()
