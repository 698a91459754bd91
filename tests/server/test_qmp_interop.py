"""QEMU's own QMP tools against a real control socket: the qemu.qmp library's QMPClient and
its qmp-shell, unchanged, as an operator would point them at the server.

The server runs in-process (real ServedDevice objects over the real libvfio-user); the
asyncio client runs in a worker thread, qmp-shell as a process.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import trio
from qemu.qmp import ExecuteError, QMPClient

from tests.server.control_helpers import (
    VENDOR_DEVICE_MODERN,
    VENDOR_DEVICE_TRANSITIONAL,
    ids_of,
    spec,
    start_controller,
)
from vfuserver import __version__
from vfuserver.config import ServerConfig

QMP_SHELL = Path(sys.executable).with_name("qmp-shell")  # qemu.qmp's console script


async def test_qemu_qmp_client_lists_devices_and_switches_a_profile(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    config = ServerConfig(control=str(control), devices=[
        spec(tmp_path, "net0"), spec(tmp_path, "net1", profile="transitional")])
    await start_controller(nursery, config)

    async def session() -> dict[str, Any]:
        client = QMPClient("test")
        await client.connect(str(control))  # greeting and qmp_capabilities
        try:
            seen: dict[str, Any] = {"greeting": client.greeting._asdict()}  # type: ignore[union-attr]
            seen["devices"] = await client.execute("query-devices")
            seen["set"] = await client.execute("set-profile",
                                               {"device": "net0", "profile": "transitional"})
            seen["profiles"] = await client.execute("query-profiles")
            seen["commands"] = await client.execute("query-commands")
            try:
                await client.execute("set-profile", {"device": "net9", "profile": "modern"})
            except ExecuteError as exc:
                seen["refused"] = (exc.error_class, str(exc))
        finally:
            await client.disconnect()
        return seen

    seen = await trio.to_thread.run_sync(lambda: asyncio.run(session()))
    major, minor, micro = (int(part) for part in __version__.split("."))
    assert seen["greeting"] == {"QMP": {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": f"vfuserver {__version__}"},
        "capabilities": []}}
    assert [(d["name"], d["profile"], d["state"]) for d in seen["devices"]] == [
        ("net0", "modern", "running"), ("net1", "transitional", "running")]
    assert seen["set"] == {}
    assert [p["current"] for p in seen["profiles"]] == ["transitional", "transitional"]
    assert {"qmp_capabilities", "query-devices", "set-profile", "device-add",
            "device-del"} <= {c["name"] for c in seen["commands"]}
    assert seen["refused"] == ("DeviceNotFound", "no device named 'net9'")
    # what a VM now sees on net0's socket
    assert await ids_of(tmp_path / "net0.sock") == VENDOR_DEVICE_TRANSITIONAL


async def test_qmp_shell_runs_commands_piped_on_stdin(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    config = ServerConfig(control=str(control), devices=[spec(tmp_path, "net0")])
    await start_controller(nursery, config)
    assert await ids_of(tmp_path / "net0.sock") == VENDOR_DEVICE_MODERN

    commands = b"query-devices\nset-profile device=net0 profile=transitional\nquery-profiles\n"
    env = {**os.environ, "HOME": str(tmp_path)}  # its ~/.qmp-shell_history
    with trio.fail_after(60):
        result = await trio.run_process([str(QMP_SHELL), str(control)], stdin=commands,
                                        capture_stdout=True, capture_stderr=True, env=env)
    output = result.stdout.decode()
    assert result.stderr == b"", result.stderr
    assert f"Connected to QEMU {__version__}" in output  # the greeting's version
    # after each "(QEMU) " prompt, the reply as one JSON line
    replies = [json.loads(line.rsplit("(QEMU) ", 1)[-1])
               for line in output.splitlines() if line.startswith("(QEMU) {")]
    assert len(replies) == 3, output
    [device] = replies[0]["return"]
    assert (device["name"], device["profile"]) == ("net0", "modern")
    assert replies[1] == {"return": {}}
    assert replies[2]["return"][0]["current"] == "transitional"
    assert config.devices[0].profile == "transitional"
    assert await ids_of(tmp_path / "net0.sock") == VENDOR_DEVICE_TRANSITIONAL
