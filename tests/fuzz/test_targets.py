"""CI for the fuzz targets: the kept corpus replays cleanly, and each target fuzzes briefly
under atheris (libFuzzer) without a finding. The long runs are `make fuzz`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import targets

BRIEF_RUNS = 2000
BRIEF_SECONDS = 10


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_corpus_replays_without_a_finding(name: str) -> None:
    inputs = sorted((targets.CORPUS / name).iterdir())
    assert inputs, f"no corpus for {name}"
    target = targets.target_function(name)
    try:
        for path in inputs:
            target(path.read_bytes())
    finally:
        close = getattr(target, "close", None)
        if close is not None:
            close()


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_brief_fuzzing_finds_nothing(name: str, tmp_path: Path) -> None:
    new_inputs = tmp_path / "new"
    new_inputs.mkdir()
    # the kept corpus is read, never written: new inputs go to tmp_path
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", name, f"-runs={BRIEF_RUNS}",
         f"-max_total_time={BRIEF_SECONDS}", "-timeout=10", f"-artifact_prefix={tmp_path}/",
         str(new_inputs), str(targets.CORPUS / name)],
        capture_output=True, text=True, timeout=BRIEF_SECONDS + 60,
        cwd=Path(__file__).resolve().parents[2])
    log = result.stderr
    assert result.returncode == 0, f"finding in {name}:\n{log[-4000:]}"
    done = re.search(r"Done (\d+) runs", log)
    assert done is not None, log[-2000:]
    assert int(done.group(1)) > 0
