"""The serving thread's timers expire on time: its timer slack is 1 ns, as QEMU's threads'
(util/qemu-timer.c init_clocks). With Linux's default 50 µs, the 150 µs transmit timer
(DATA_TIMER) and the poll backoff of serve.c's ppoll could fire a third late, and a
guest's next frame, left without notifications, waited that much longer."""
from __future__ import annotations

import threading
from pathlib import Path

from tests.server.conftest import ScratchFunction, attached_session
from vfuserver.context import VfuContext
from vfuserver.protocol import vfio_user as vu


def timer_slack_ns(tid: int) -> int:
    """A thread's timer slack (proc(5): /proc/pid/timerslack_ns, Linux 4.6; a thread's
    id names it there too, though /proc/pid/task/tid has no such file)."""
    return int(Path(f"/proc/{tid}/timerslack_ns").read_text())


def test_the_serving_thread_takes_a_timer_slack_of_1_ns(tmp_path: Path) -> None:
    with VfuContext(str(tmp_path / "s.sock"), ScratchFunction()) as context:
        slack: list[int] = []

        def serve() -> object:
            # a thread reads its own timerslack_ns without CAP_SYS_NICE (another's needs
            # it); prctl's value stays on the thread after the serving loop returns
            tid = threading.get_native_id()
            slack.append(timer_slack_ns(tid))
            result = context.serve_client()
            slack.append(timer_slack_ns(tid))
            return result

        client, thread, _ = attached_session(context, serve)
        try:
            assert client.read(vu.PciRegion.CONFIG, 0, 2) == b"\xf4\x1a"
        finally:
            client.close()
            thread.join(10)
        assert not thread.is_alive()
        inherited, serving = slack
        assert inherited > 1  # the process's own (50 µs unless someone changed it)
        assert serving == 1
