"""Fixtures of the end-to-end layer: a real QEMU boots a real Linux guest against a real
vfuserver, in a private network namespace per test.

Run them with ``.venv/bin/python -m pytest tests/e2e -m e2e``. They are skipped only where they
cannot run at all (not root, no /dev/net/tun, no iproute2); a failing get-qemu.sh or
make-test-guest.sh is an error. On failure, the consoles and server logs are printed in the
"Captured stdout teardown" section.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .rig import (
    TAP,
    Guests,
    NamespaceNames,
    NetNamespace,
    Servers,
    Tools,
    find_vfuserver,
    unusable_machine_reason,
)


@pytest.fixture(scope="session")
def e2e_tools() -> Tools:
    """QEMU and the test guest (fetched and built on first use, then cached)."""
    reason = unusable_machine_reason()
    if reason is not None:
        pytest.skip(f"end-to-end tests cannot run on this machine: {reason}")
    return Tools.prepare()


@pytest.fixture(scope="session")
def netns_names() -> NamespaceNames:
    return NamespaceNames()


@pytest.fixture
def netns(e2e_tools: Tools, netns_names: NamespaceNames) -> Iterator[NetNamespace]:
    """A fresh network namespace with tap vfutap0 at 10.0.2.1/24; always deleted."""
    ns = NetNamespace(netns_names.next())
    try:
        ns.create()
        ns.add_tap(TAP)
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def vfuserver_exe() -> Path:
    exe = find_vfuserver()
    if exe is None:
        pytest.fail("no vfuserver console script next to the test Python or on PATH "
                    "(pip install -e . into the venv)")
    return exe


@pytest.fixture
def servers(netns: NetNamespace, vfuserver_exe: Path, tmp_path: Path) -> Iterator[Servers]:
    """Starts vfuserver in the test's namespace: servers.start(*extra_args)."""
    started = Servers(vfuserver_exe, tmp_path, netns)
    try:
        yield started
    finally:
        started.stop_all()
        for server in started.started:
            print(f"=== {' '.join(server.command)}: exit status {server.returncode}, "
                  f"log {server.log_path}\n{server.log}")


@pytest.fixture
def guests(e2e_tools: Tools, netns: NetNamespace, tmp_path: Path) -> Iterator[Guests]:
    """Boots the test guest in the test's namespace: guests.boot(plan, ...)."""
    booted = Guests(e2e_tools, tmp_path, netns)
    yield booted
    for run in booted.runs:
        print(run.describe())
