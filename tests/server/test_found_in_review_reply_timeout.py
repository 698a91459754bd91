"""Review finding: a client that never reads its replies is not dropped when a whole
reply times out (sendmsg -> EAGAIN is treated as benign by serve.c); the reply is lost
and the thread keeps serving it, one SO_SNDTIMEO per message."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from tests.server.conftest import ScratchFunction, attached_session
from vfuserver.context import VfuContext
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
        time.sleep(4)
        still_serving = thread.is_alive()
        messages = int(context.native.dev.messages)
        time.sleep(1)
        later = int(context.native.dev.messages)
        print("serving:", still_serving, "drop:", context.drop_reason,
              "messages", messages, "->", later)
        client.sock.close()
        thread.join(20)
        assert not still_serving, "never dropped: replies are silently discarded"
