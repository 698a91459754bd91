"""protocol/ is sans-IO: it imports construct and the standard library, nothing else.

import-linter's contracts forbid named packages; this is the allow-list they cannot express:
every import statement of every module under protocol/, read from the source (STYLE 1).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
ALLOWED = {"construct", "vfuserver"} | set(sys.stdlib_module_names)
"""construct, the standard library, and (vfuserver.protocol) the package itself."""


def imported(module: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(module.read_text(), str(module))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("module", sorted(PROTOCOL.glob("*.py")), ids=lambda p: p.name)
def test_protocol_imports_only_construct_and_the_standard_library(module: Path) -> None:
    wrong = [(line, name) for line, name in imported(module)
             if name.split(".")[0] not in ALLOWED
             or (name.startswith("vfuserver") and not name.startswith("vfuserver.protocol"))]
    assert not wrong, f"{module.name} imports outside construct and the standard library: {wrong}"


def test_the_check_sees_a_third_party_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("import numpy\nfrom vfuserver.devices import pci\nimport struct\n")
    assert [name for _, name in imported(module)] == ["numpy", "vfuserver.devices", "struct"]
