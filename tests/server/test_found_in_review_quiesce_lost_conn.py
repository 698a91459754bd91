"""Review finding (latent: no shipped function defers its quiesce): a client that leaves
while the function's quiesce is deferred. libvfio-user holds the lost-connection reset
(VFU_CTX_PENDING_CTX_RESET); _wait_quiesced runs it (irqs_reset and detach, outside
irq_lock), then vfuserver_serve is entered again although no client is attached."""
from __future__ import annotations

from typing import Any

import trio

from tests.server.test_server import SlowQuiesceFunction, in_thread
from vfuserver.client import Client
from vfuserver.protocol import vfio_user as vu


async def test_client_leaves_during_deferred_quiesce(serve: Any, nursery: trio.Nursery,
                                                     caplog: Any) -> None:
    slow = SlowQuiesceFunction()
    context = await serve(slow, "slow")
    nursery.start_soon(slow.finish_quiesces)

    def first() -> None:
        with Client(context.socket_path) as client:
            client.read(vu.PciRegion.CONFIG, 0, 2)

    await in_thread(first)
    await trio.sleep(1.0)

    def second() -> bytes:
        with Client(context.socket_path, timeout=3) as client:
            return client.read(vu.PciRegion.CONFIG, 0, 2)

    try:
        result = await in_thread(second)
    except OSError as exc:
        result = repr(exc).encode()
    print("second client:", result)
    print("\n".join(r.getMessage() for r in caplog.records if r.levelname != "DEBUG")[-1500:])
    assert result == b"\xf4\x1a"
