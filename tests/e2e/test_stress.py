"""Two loaded boots at once of the stress plan, with every used ring watched from outside.

The short version of ``python -m benchmarks --only stress`` (which runs 60 boots): both
boots at the same time with two CPU hogs on the host, 1000 flood pings, 64 MiB each way
checked by sha256, 100 flood pings; ring_watch (benchmarks/c/ring_watch.c) maps each guest's
RAM through QEMU's memfd and checks that every used ring index and element in memory is
what the device journalled, and that the guest never consumed more than memory published.
Before the fix for "id N is not a head!" the watcher saw used.idx read 0 for tens of
microseconds 70-110 times per boot (CPython's struct.pack_into zeroes before it stores).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import stress
from benchmarks.cbuild import BuildError
from benchmarks.common import Settings

from .rig import Tools

pytestmark = pytest.mark.e2e


def test_two_loaded_boots_break_no_queue(e2e_tools: Tools, tmp_path: Path) -> None:
    settings = Settings(stress_boots=2, stress_parallel=2, stress_hogs=2, stress_mib=64,
                        stress_watch=True)
    try:
        section = stress.run(settings, tmp_path)
    except BuildError as exc:
        pytest.fail(f"ring_watch did not build: {exc}")
    assert section.status != "skipped", section.notes
    assert sum(row["boots"] for row in section.rows) == 2
    failures = {row["config"]: row["failures"] for row in section.rows if row["failed"]}
    assert not failures, "\n".join(stress.markdown(section))
    for path in sorted(tmp_path.glob("stress-*-ring-watch.log")):
        summary = next(line for line in path.read_text().splitlines() if "summary" in line)
        assert "events=0" in summary.split(), summary
        published = [int(n) for n in re.findall(r"-q[01]\.journal:published=(\d+)", summary)]
        # both data queues carried the transfers (64 MiB at <= 64 KiB a buffer each way)
        assert len(published) == 2 and min(published) > 1000, summary
