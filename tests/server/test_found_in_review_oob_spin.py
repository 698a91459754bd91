"""Review finding: one byte of out-of-band data (AF_UNIX MSG_OOB, Linux >= 5.15) keeps
the connection POLLIN while recv(MSG_PEEK) says EAGAIN: the serving thread spins."""
from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

from tests.server.conftest import ScratchFunction, attached_session
from vfuserver.context import VfuContext
from vfuserver.protocol import vfio_user as vu


def test_oob_byte_does_not_make_the_serving_thread_spin(tmp_path: Path) -> None:
    with VfuContext(str(tmp_path / "o.sock"), ScratchFunction()) as context:

        def serve() -> float:
            """The serving loop, then the CPU time its thread used."""
            context.serve_client()
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            return usage.ru_utime + usage.ru_stime

        client, thread, cpu = attached_session(context, serve)
        assert client.read(vu.PciRegion.CONFIG, 0, 2) == b"\xf4\x1a"
        before = int(context.native.dev.wakeups)
        client.sock.send(b"!", socket.MSG_OOB)
        time.sleep(1.0)
        wakeups = int(context.native.dev.wakeups) - before
        client.close()
        thread.join(10)
        print(f"wakeups in 1 s: {wakeups}, serving thread CPU: {cpu[0]:.2f} s")
        assert wakeups < 100
