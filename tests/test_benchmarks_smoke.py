"""The benchmarks must not rot: ``python -m benchmarks --smoke`` runs every section briefly.

Where the end-to-end machinery cannot run (not root, no /dev/net/tun), the guest section
must say it skipped and why; every other section must produce rows of numbers.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.rig import unusable_machine_reason

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("region", "inprocess", "guest", "disk", "scale", "hostile")

pytestmark = [
    pytest.mark.e2e,  # the guest section boots a real guest under QEMU
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the benchmarks compile C with gcc"),
]


def numbers(value: Any) -> list[float]:
    """Every number in a JSON value."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return []


def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    results = json.loads(out.read_text())
    assert results["smoke"] is True
    assert set(results["sections"]) == set(SECTIONS)
    assert results["machine"]["cpus"] >= 1

    skip_guest = unusable_machine_reason()
    for name in SECTIONS:
        section = results["sections"][name]
        if name in ("guest", "disk") and skip_guest is not None:
            assert section["status"] == "skipped"
            assert any(skip_guest in note for note in section["notes"])
            continue
        assert section["status"] in ("ok", "partial"), (name, section["notes"])
        assert section["rows"], (name, section["notes"])
        for row in section["rows"]:
            values = numbers(row)
            assert values, (name, row)
            assert all(math.isfinite(v) for v in values), (name, row)

    region = results["sections"]["region"]
    for row in region["rows"]:
        assert row["vfuserver"]["ops_per_s"] > 0 and row["c"]["ops_per_s"] > 0
    assert region["floor"] and all(f["ops_per_s"] > 0 for f in region["floor"].values())
    assert {row["profile"] for row in region["rows"]} == {"modern", "transitional"}
    assert results["sections"]["inprocess"]["profile"]["by_cumulative"]
    # a target is met or missed whenever it was measured, and says why when it was not
    targets = {target["key"]: target for target in results["targets"]}
    for target in targets.values():
        if target["measured"] is None:
            assert target["met"] is None, target
            assert target["detail"].startswith("not measured: "), target
        else:
            assert isinstance(target["met"], bool), target
            op, limit = target["threshold"].split()[:2]
            compare = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__}[op]
            assert target["met"] == compare(float(target["measured"]), float(limit)), target
        assert target["target"] in proc.stdout
    # a section that ran in full measured what its targets need
    complete = {name for name in SECTIONS if results["sections"][name]["status"] == "ok"}
    for key, section_name in (("legacy-access-cross", "region"), ("legacy-notify-cross", "region"),
                              ("legacy-access-same", "region"), ("legacy-notify-same", "region"),
                              ("rss-per-device", "scale"),  # scale: 8 devices when smoked
                              ("idle-cpu", "scale")):
        if section_name in complete:
            assert targets[key]["measured"] is not None, targets[key]
    if skip_guest is not None:
        assert targets["guest-ping"]["detail"] == (
            f"not measured: no guest rows: skipped: {skip_guest}")
    assert "### Targets" in proc.stdout
