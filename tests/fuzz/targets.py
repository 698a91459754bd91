"""The fuzz targets by name, as "module:class" strings: importing them is left to the
runner, which must import them inside atheris's instrumentation hook."""

from __future__ import annotations

import importlib
from pathlib import Path

from tests.fuzz.harness import FuzzTarget

TARGETS = {
    "vfio-user": "tests.fuzz.live_context:LiveContextTarget",
    "rings": "tests.fuzz.rings:RingsTarget",
    "admin": "tests.fuzz.admin_commands:AdminTarget",
    "legacy-bar0": "tests.fuzz.legacy_bar0:LegacyBar0Target",
    "modern-bar": "tests.fuzz.modern_bar:ModernBarTarget",
    "net-path": "tests.fuzz.net_path:NetPathTarget",
    "net-run": "tests.fuzz.net_run:NetRunTarget",
}

CORPUS = Path(__file__).parent / "corpus"
"""tests/fuzz/corpus/<target>/: seeds and the inputs worth keeping (small, in the repo)."""

INSTRUMENTED = ["vfuserver", "tests.fuzz", "tests.devices"]
"""Packages whose Python code atheris instruments for coverage (the device models and
formats are vfuserver.devices and vfuserver.protocol)."""


def load(name: str) -> type[FuzzTarget]:
    """The target class ``name`` (KeyError for an unknown name)."""
    module_name, _, class_name = TARGETS[name].partition(":")
    target: type[FuzzTarget] = getattr(importlib.import_module(module_name), class_name)
    return target


def target_function(name: str) -> FuzzTarget:
    """A new instance of target ``name``: call it with one input."""
    return load(name)()
