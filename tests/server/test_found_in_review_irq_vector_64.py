"""Review finding: an interrupt for vector >= 64 raised from another thread while the
serving thread is inside vfu_run_ctx is lost (vfuserver_trigger returns EINVAL)."""
from __future__ import annotations

import os
import select
import threading
from pathlib import Path

from tests.server.conftest import ScratchFunction, ScratchRegion, attached_session
from vfuserver.context import VfuContext
from vfuserver.devices.pci import Bar, BarKind
from vfuserver.protocol import vfio_user as vu


class BlockingRegion(ScratchRegion):
    def __init__(self) -> None:
        super().__init__(4096)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, offset: int, data: bytes) -> None:
        self.entered.set()
        self.release.wait(10)


class ManyVectors(ScratchFunction):
    msix_vectors = 65   # a 64-queue virtio-blk: queues + config

    def __init__(self) -> None:
        super().__init__("many")
        self.bar0: BlockingRegion = BlockingRegion()
        self.config.bars.clear()
        self.config.add_bar(Bar(0, 4096, BarKind.MEM32, self.bar0))


def fired(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def test_vector_64_is_not_lost_when_the_serving_thread_is_busy(tmp_path: Path) -> None:
    fn = ManyVectors()
    with VfuContext(str(tmp_path / "m.sock"), fn) as context:
        client, thread, _ = attached_session(context)
        efd63, efd64 = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        client.set_irqs(vu.PciIrq.MSIX, 63, [efd63, efd64])
        client.post_write(vu.PciRegion.BAR0, 0, b"\0\0\0\0")   # the callback blocks
        assert fn.bar0.entered.wait(5)
        ok63 = context.trigger(63)    # from "the event loop" (another thread)
        ok64 = context.trigger(64)
        fn.bar0.release.set()
        got63, got64 = fired(efd63, 2), fired(efd64, 2)
        client.close()
        thread.join(10)
        print("trigger(63)", ok63, "fired", got63, "| trigger(64)", ok64, "fired", got64)
        assert got63
        assert ok64 and got64, "vector 64 lost"


def test_the_interrupts_counter_counts_what_reached_the_client(tmp_path: Path) -> None:
    """fast_path's ``interrupts``: every vector signalled to an eventfd of the client, from
    the serving thread or another one; a vector the client gave no eventfd for is not."""
    fn = ManyVectors()
    with VfuContext(str(tmp_path / "c.sock"), fn) as context:
        client, thread, _ = attached_session(context)
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        client.set_irqs(vu.PciIrq.MSIX, 0, efds)
        assert context.native.counters()["interrupts"] == 0
        assert [context.trigger(v) for v in (0, 0, 1, 5)] == [True, True, True, False]
        client.post_write(vu.PciRegion.BAR0, 0, b"\0\0\0\0")   # the serving thread is busy
        assert fn.bar0.entered.wait(5)
        assert context.trigger(1)    # left pending, raised by the serving thread
        fn.bar0.release.set()
        signalled = 0
        while signalled < 4:
            ready, _, _ = select.select(efds, [], [], 2)
            if not ready:
                break
            signalled += sum(os.eventfd_read(fd) for fd in ready)
        client.close()
        thread.join(10)
        assert signalled == context.native.counters()["interrupts"] == 4
