"""Review finding: a client that never reads its replies is not dropped when a whole
reply times out (sendmsg -> EAGAIN is treated as benign by serve.c); the reply is lost
and the thread keeps serving it, one SO_SNDTIMEO per message."""
from __future__ import annotations

import threading
from pathlib import Path

from tests.server.conftest import ScratchFunction, attached_session
from vfuserver.context import DropReason, VfuContext
from vfuserver.protocol import vfio_user as vu


def test_client_that_never_reads_is_dropped(tmp_path: Path) -> None:
    with VfuContext(str(tmp_path / "r.sock"), ScratchFunction()) as context:
        context.native.dev.reply_timeout_ms = 100
        client, thread, _ = attached_session(context)
        client.sock.settimeout(None)
        payload = vu.REGION_ACCESS.pack(0, vu.PciRegion.CONFIG, 4)

        def flood() -> None:
            try:
                for _ in range(20000):
                    client.send(vu.Command.REGION_READ, payload)
            except OSError:
                pass

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        # each reply that cannot be sent within reply_timeout_ms drops the client: well
        # within this bound even on a loaded machine (the thread only ends once dropped)
        thread.join(20)
        dropped = not thread.is_alive()
        client.sock.close()
        thread.join(20)
        assert dropped, "never dropped: replies are silently discarded"
        assert context.drop_reason == DropReason.REPLY_TIMEOUT
