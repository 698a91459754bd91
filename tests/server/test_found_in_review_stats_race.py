"""Review finding: counters are dicts that the serving threads grow (a new opcode/status
pair, a new legacy register) while the event loop iterates them (query-stats, and the
final stats line in ServedDevice.close). The owner's AdminStats is shared by every
device. RuntimeError: dictionary changed size during iteration."""
from __future__ import annotations

import sys
import threading
import time

from vfuserver.devices.admin import AdminStats


def test_as_dict_while_another_thread_counts() -> None:
    stats = AdminStats()
    stop = threading.Event()
    sys.setswitchinterval(0.005)  # the default

    def count() -> None:
        n = 0
        while not stop.is_set():
            stats.statuses[(n % 4099, n // 4099 % 8)] += 1  # new (opcode, status) pairs
            n += 1

    thread = threading.Thread(target=count)
    thread.start()
    errors = []
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                stats.as_dict()
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(0.005)
    assert not errors, errors
