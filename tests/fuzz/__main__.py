"""Run one fuzz target under atheris (libFuzzer), or write the seed corpus.

    python -m tests.fuzz TARGET [libFuzzer options] [CORPUS_DIR ...] [INPUT_FILE ...]
    python -m tests.fuzz --seeds            # (re)write tests/fuzz/corpus/<target>/seed-*
    python -m tests.fuzz --list

libFuzzer writes new inputs into the first corpus directory and a crash into
``-artifact_prefix``; given files instead of directories, it replays them (a finding's
reproducer). The exit status is non-zero on a finding.
"""

from __future__ import annotations

import logging
import sys

import atheris
from atheris.import_hook import instrument_imports

from tests.fuzz import targets


def write_seeds() -> None:
    for name in targets.TARGETS:
        directory = targets.CORPUS / name
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
        for label, data in targets.load(name).seeds().items():
            (directory / f"seed-{label}").write_bytes(data)


def main(argv: list[str]) -> None:
    if argv[1:2] == ["--list"]:
        print("\n".join(targets.TARGETS))
        return
    if argv[1:2] == ["--seeds"]:
        write_seeds()
        return
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        sys.exit(f"usage: python -m tests.fuzz {{{','.join(targets.TARGETS)}}} "
                 "[libFuzzer options] [corpus dirs]")
    name = argv.pop(1)
    # Findings are exceptions and broken invariants, never log lines; a guest's mistakes
    # are logged (rate-limited) by design and would only slow the run down.
    logging.disable(logging.CRITICAL)
    with instrument_imports(include=targets.INSTRUMENTED):
        target = targets.target_function(name)
    # libFuzzer runs argv[0] and the options again (through the shell) to merge or fork:
    # that must be this same target
    argv[0] = f"{sys.executable} -m tests.fuzz {name}"
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
