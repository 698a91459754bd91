"""Misbehaving clients of one device never hold another (issue 12; benchmarks/hostile.py).

A real ``vfuserver run --config`` process serves devices a and b. Each scenario has a
client of a misbehave while a probe reads b's config space; it fails if b stops answering,
if a is not served again afterwards, if the server dies, or if a scenario leaks a file
descriptor or a thread. The figures (latencies, RSS) are the ``hostile`` benchmark's.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks.common import vfuserver_cli
from benchmarks.hostile import (
    SCENARIOS,
    ServerUnderTest,
    connect_cycles,
    run_scenario,
    served_again,
    two_device_server,
    wait_closed,
)
from tests.server.conftest import until
from vfuserver.client import Client, VfioUserError
from vfuserver.context import ATTACH_TIMEOUT, LIBRARY_LOG_BURST
from vfuserver.protocol import vfio_user as vu

ARGV = vfuserver_cli(log_level="info")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerUnderTest]:
    with two_device_server(tmp_path_factory.mktemp("hostile"), ARGV) as running:
        connect_cycles(running, 20)  # the first sessions start the thread cache
        yield running


@pytest.mark.parametrize("name", [*SCENARIOS, "connect-cycles"])
def test_misbehaving_client_holds_nothing_but_itself(server: ServerUnderTest, name: str) -> None:
    outcome = run_scenario(server, name, sessions=200)
    assert outcome.fds[1] == outcome.fds[0], f"fds {outcome.fds} ({server.process.log[-2000:]})"
    assert outcome.threads[1] <= outcome.threads[0] + 1


def test_dropped_clients_are_logged_with_the_reason(server: ServerUnderTest) -> None:
    log = server.process.log
    for reason in ("closed the connection in the middle of a message",
                   "more than the vfio-user maximum"):
        assert reason in log, reason
    assert "Traceback" not in log


def test_a_silent_client_is_disconnected_after_the_attach_timeout(
        tmp_path: Path) -> None:


    with two_device_server(tmp_path, ARGV) as running:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(running.a))
            assert wait_closed(sock, ATTACH_TIMEOUT + 5)
        served_again(running)
        assert "sent no VERSION within" in running.process.log


async def test_a_client_cannot_flood_the_log(serve_net: Any,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # Found by a hostile client: every access out of a region's bounds made libvfio-user
    # log an ERROR line, about 11,000 lines for one sweep of the regions.
    served = await serve_net()
    caplog.set_level(logging.INFO)

    def sweep() -> int:
        refused = 0
        with Client(served.context.socket_path) as client:
            for offset in range(3 * LIBRARY_LOG_BURST):
                with pytest.raises(VfioUserError) as raised:
                    client.read(vu.PciRegion.CONFIG, 0x10000 + offset, 4)
                refused += raised.value.errno == errno.EINVAL
        return refused

    assert await trio.to_thread.run_sync(sweep) == 3 * LIBRARY_LOG_BURST  # each one told
    lines = [r for r in caplog.records if "out of bounds region access" in r.getMessage()]
    assert len(lines) == LIBRARY_LOG_BURST


async def test_a_probe_of_the_socket_is_no_error(serve_net: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    # Found trying the server as an operator: a second server checking whether the socket
    # is in use (a connect, then close) made the first log two ERROR lines.
    served = await serve_net()
    caplog.set_level(logging.DEBUG)
    probes = 3 * LIBRARY_LOG_BURST  # and a client probing in a loop cannot flood the log
    def seen() -> int:  # probes logged or counted as suppressed
        suppressed: int = served.context.client_log.suppressed
        return suppressed + sum(
            "closed the connection during its VERSION handshake" in r.getMessage()
            for r in caplog.records)

    async def probe_once(count: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(served.context.socket_path)
        await until(lambda: seen() == count)

    for done in range(1, probes + 1):
        await probe_once(done)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert served.context.client_log.suppressed == probes - LIBRARY_LOG_BURST

    def next_client() -> bytes:
        with Client(served.context.socket_path) as client:
            return client.read(vu.PciRegion.CONFIG, 0, 2)

    assert await trio.to_thread.run_sync(next_client) == b"\xf4\x1a"  # served as ever
