"""Review finding: when libvfio-user detaches inside a *successful* vfu_run_ctx (the reply
to a client that has gone fails with ECONNRESET: do_reply resets the context and returns
0), serve.c goes on using the closed connection fd. If the number is reused meanwhile
(any fd another thread opens: another device's accepted client, an SCM_RIGHTS fd...), the
serving thread peeks, polls and finally shutdown()s and drains that foreign socket."""
from __future__ import annotations

import threading
from pathlib import Path

from tests.server.conftest import ScratchFunction, ScratchRegion, attached_session
from vfuserver.context import DropReason, VfuContext
from vfuserver.devices.pci import Bar, BarKind
from vfuserver.protocol import vfio_user as vu


class SlowRead(ScratchRegion):
    def __init__(self) -> None:
        super().__init__(4096)
        self.entered = threading.Event()
        self.release = threading.Event()

    def read(self, offset: int, size: int) -> bytes:
        self.entered.set()
        self.release.wait(10)
        return bytes(size)


class SlowFunction(ScratchFunction):
    def __init__(self) -> None:
        super().__init__("slow")
        self.bar0: SlowRead = SlowRead()
        self.config.bars.clear()
        self.config.add_bar(Bar(0, 4096, BarKind.MEM32, self.bar0))


def test_client_gone_during_reply_leaves_no_stale_fd(tmp_path: Path) -> None:
    fn = SlowFunction()
    with VfuContext(str(tmp_path / "s.sock"), fn) as context:
        client, thread, results = attached_session(context)
        client.send(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0, vu.PciRegion.BAR0, 4))
        assert fn.bar0.entered.wait(5)
        client.close()              # gone before the reply
        fn.bar0.release.set()
        thread.join(10)
        print(results, context.drop_reason, int(context.native.dev.drop_errno))
        assert context.drop_reason is DropReason.NONE   # fails: RUN_ERROR / EBADF
