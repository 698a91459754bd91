"""The server setting poll-max-ns (QEMU's IOThread name and unit): the config file's
``[server] poll-max-ns``, ``vfuserver run --poll-max-ns``, and the serving threads it
reaches.

Whether the value got there is read off the native device each serving thread uses
(``poll_max_ns`` of its struct vfuserver_dev), and off the thread's own counter: ``polled``
counts the messages its adaptive polling found (serve.c vfuserver_wait). With poll-max-ns
= 0 the thread never polls, so that count stays 0; with the largest value the window grows
(doubling from 4 µs) until it covers the client's pace, and polling finds every message
after that (with the default, none of these paced reads is found by polling).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.server.control_helpers import execute, run_cli, server_process, start_controller
from vfuserver.cli import build_parser
from vfuserver.client import Client
from vfuserver.config import (
    DEFAULT_POLL_MAX_NS,
    MAX_POLL_MAX_NS,
    ConfigError,
    ServerConfig,
    parse_config,
)
from vfuserver.devices.virtio_pci import MODERN_BAR, Layout
from vfuserver.protocol import vfio_user as vu
from vfuserver.spec import default_mac

READS = 200
"""Back-to-back register reads per client: far more than the window needs to grow."""
GAP = 0.001
"""Seconds between paced reads: beyond the default ceiling, far below 1 s."""
PACED_READS = 40
GROW_READS = 12
"""Reads before a 1 s ceiling's window (4 µs doubling) covers GAP, with room to spare."""


# --- the config file -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    pytest.param("", DEFAULT_POLL_MAX_NS, id="no-server-table"),
    pytest.param("[server]\ncontrol = 'c.sock'\n", DEFAULT_POLL_MAX_NS, id="default"),
    pytest.param("[server]\npoll-max-ns = 0\n", 0, id="off"),
    pytest.param("[server]\npoll-max-ns = 0x4000\n", 0x4000, id="hex"),
    pytest.param("[server]\npoll-max-ns = 1_000_000_000\n", MAX_POLL_MAX_NS, id="ceiling"),
])
def test_config_poll_max_ns(text: str, value: int, tmp_path: Path) -> None:
    assert parse_config(text, path=tmp_path / "d.toml").poll_max_ns == value


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("poll-max-ns = true", "poll-max-ns must be an integer (ns), not bool",
                 id="bool"),
    pytest.param("poll-max-ns = '32768'", "poll-max-ns must be an integer (ns), not str",
                 id="string"),
    pytest.param("poll-max-ns = 32768.0", "poll-max-ns must be an integer (ns), not float",
                 id="float"),
    pytest.param("poll-max-ns = -1",
                 "poll-max-ns must be 0..1000000000 ns (0 turns polling off), not -1",
                 id="negative"),
    pytest.param("poll-max-ns = 1_000_000_001",
                 "poll-max-ns must be 0..1000000000 ns (0 turns polling off), not 1000000001",
                 id="above-ceiling"),
])
def test_config_poll_max_ns_errors(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "d.toml"
    with pytest.raises(ConfigError) as raised:
        parse_config(f"[server]\n{text}\n", path=path)
    assert str(raised.value) == f"{path}: [server] {message}"


def test_config_names_the_key_when_misspelt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key poll_max_ns \(known: control, "
                                          r"poll-max-ns\)"):
        parse_config("[server]\npoll_max_ns = 0\n", path=tmp_path / "d.toml")


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "value"), [
    pytest.param([], None, id="not-given"),
    pytest.param(["--poll-max-ns", "0"], 0, id="off"),
    pytest.param(["--poll-max-ns", "1000000000"], MAX_POLL_MAX_NS, id="ceiling"),
])
def test_cli_poll_max_ns(args: list[str], value: int | None) -> None:
    for what in (["--socket", "x.sock"], ["--config", "d.toml"]):
        assert build_parser().parse_args(["run", *what, *args]).poll_max_ns == value


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("-1", "poll-max-ns must be 0..1000000000 ns (0 turns polling off), not -1",
                 id="negative"),
    pytest.param("1000000001",
                 "poll-max-ns must be 0..1000000000 ns (0 turns polling off), not 1000000001",
                 id="above-ceiling"),
    pytest.param("1.5", "poll-max-ns must be an integer (ns), not '1.5'", id="float"),
    pytest.param("32k", "poll-max-ns must be an integer (ns), not '32k'", id="suffix"),
])
def test_cli_poll_max_ns_errors(text: str, message: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--socket", "x.sock", "--poll-max-ns", text])
    assert exited.value.code == 2
    assert f"argument --poll-max-ns: {message}" in capsys.readouterr().err


def test_help_says_the_command_line_wins(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "takes precedence over the file" in help_text
    assert "poll-max-ns = 32768" in help_text  # the config file's key, in the CONFIG part


# --- the serving threads -------------------------------------------------------------------------

def read_mac_back_to_back(socket_path: Path, gap: float = 0.0, reads: int = READS) -> bytes:
    """``reads`` reads of the virtio-net config's MAC (BAR4, the device structure), each
    sent ``gap`` seconds after the previous reply is in; the MAC, all of them alike."""
    with Client(str(socket_path), timeout=10) as client:
        macs = set()
        for _ in range(reads):
            macs.add(client.read(vu.PciRegion.BAR0 + MODERN_BAR, Layout.DEVICE, 6))
            if gap:
                time.sleep(gap)
    [mac] = macs
    return mac


async def served_reads(control: Path, socket_path: Path, name: str,
                       gap: float = 0.0, reads: int = READS) -> dict[str, int]:
    """A client's reads of device ``name`` (:func:`read_mac_back_to_back`), then the
    serving thread's counters as the control socket reports them (stats fast_path)."""
    assert await trio.to_thread.run_sync(read_mac_back_to_back, socket_path, gap, reads) \
        == default_mac(name)
    [entry] = await execute(control, "query-stats", device=name)
    counters: dict[str, int] = entry["stats"]["fast_path"]
    assert counters["messages"] >= reads  # this context's thread served them
    return counters


@pytest.mark.parametrize("poll_max_ns", [0, MAX_POLL_MAX_NS], ids=["off", "ceiling"])
async def test_the_setting_reaches_every_serving_thread(
        poll_max_ns: int, tmp_path: Path, nursery: trio.Nursery) -> None:
    """From the file to the thread of a configured device, of one added at runtime
    (device-add), and of the context a profile change builds.

    The client waits GAP between reads, far beyond the default ceiling (32768 ns) and far
    below the largest (1 s). Polling off: no read is found by polling. At the ceiling:
    the window doubles from 4 µs (serve.c VFUSERVER_POLL_GROW_START_NS) after each short
    sleep, so from the GROW_READS-th read on every read arrives while the thread polls;
    with the default instead, each 1 ms sleep resets the window and none does."""
    control = tmp_path / "ctl.sock"
    config = parse_config(
        f"[server]\ncontrol = 'ctl.sock'\npoll-max-ns = {poll_max_ns}\n"
        "[[device]]\nname = 'net0'\nsocket = 'net0.sock'\n", path=tmp_path / "d.toml")
    controller = await start_controller(nursery, config)
    await execute(control, "device-add", name="net1", socket=str(tmp_path / "net1.sock"))
    contexts = []

    async def polled(name: str) -> int:
        device: Any = controller.running(name)
        contexts.append(device.context)
        counters = await served_reads(control, tmp_path / f"{name}.sock", name, GAP,
                                      PACED_READS)
        return counters["polled"]

    found = [await polled("net0"), await polled("net1")]
    await execute(control, "set-profile", device="net0", profile="transitional")
    found.append(await polled("net0"))
    assert len({id(context) for context in contexts}) == 3  # set-profile built a new one
    assert [int(context.native.dev.poll_max_ns) for context in contexts] == [poll_max_ns] * 3
    if poll_max_ns == 0:
        assert found == [0, 0, 0]  # never polled: nothing can be found by polling
    else:
        assert all(count >= PACED_READS - GROW_READS for count in found), found


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    """`run --config FILE --poll-max-ns 0` with the file's ceiling the largest: no
    message is found by polling."""
    path = tmp_path / "d.toml"
    path.write_text(f"[server]\ncontrol = 'ctl.sock'\npoll-max-ns = {MAX_POLL_MAX_NS}\n"
                    "[[device]]\nname = 'net0'\nsocket = 'net0.sock'\n")
    control = tmp_path / "ctl.sock"
    with server_process(["--config", str(path), "--poll-max-ns", "0"],
                        tmp_path / "server.log", [control]):
        assert read_mac_back_to_back(tmp_path / "net0.sock") == default_mac("net0")
        result = run_cli("stats", "--json", "net0", control=control)
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry["stats"]["fast_path"]["messages"] >= READS
    assert entry["stats"]["fast_path"]["polled"] == 0


def test_a_server_config_without_the_key_keeps_the_default() -> None:
    assert ServerConfig().poll_max_ns == DEFAULT_POLL_MAX_NS == 32768
