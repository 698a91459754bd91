"""A change asked for right after the VM went away: set-profile and device-del wait for a
client that has hung up to be detached, instead of refusing it as attached.

The serving thread detaches a client as soon as it reads the end of the stream; an
operator's script that shuts the VM down and changes the device at once must not depend on
how soon that thread ran. Here the thread is held deterministically: the test takes the
device lock, which the thread needs for the reset that ends the session
(vfuserver_reset_cb), so the client stays attached, hung up, until the test lets go.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.server.control_helpers import execute, start_controller
from vfuserver.client import Client
from vfuserver.config import parse_config
from vfuserver.control.client import ServerError
from vfuserver.control.controller import Controller
from vfuserver.protocol import vfio_user as vu


def hold(lock: Any, taken: threading.Event, release: threading.Event) -> None:
    with lock:
        taken.set()
        release.wait(10)


def attached_client(socket_path: Path) -> Client:
    """A client that has read from the device (off the event loop, which serves it)."""
    client = Client(str(socket_path), timeout=10)
    assert client.read(vu.PciRegion.CONFIG, 0, 2) == b"\xf4\x1a"
    return client


async def served(tmp_path: Path, nursery: trio.Nursery) -> tuple[Controller, Path]:
    config = parse_config("[server]\ncontrol = 'ctl.sock'\n"
                          "[[device]]\nname = 'net0'\nsocket = 'net0.sock'\n",
                          path=tmp_path / "d.toml")
    return await start_controller(nursery, config), tmp_path / "ctl.sock"


COMMANDS = [
    pytest.param("set-profile", {"device": "net0", "profile": "transitional"},
                 id="set-profile"),
    pytest.param("device-del", {"name": "net0"}, id="device-del"),
]


@pytest.mark.parametrize(("command", "arguments"), COMMANDS)
async def test_a_change_waits_for_a_client_that_hung_up(
        command: str, arguments: dict[str, str], tmp_path: Path,
        nursery: trio.Nursery) -> None:
    controller, control = await served(tmp_path, nursery)
    device: Any = controller.running("net0")
    client = await trio.to_thread.run_sync(attached_client, tmp_path / "net0.sock")
    taken, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(device.context.lock, taken, release))
    holder.start()
    try:
        assert await trio.to_thread.run_sync(taken.wait, 10)
        client.close()  # the VM is gone; the serving thread cannot end the session yet
        with trio.fail_after(10):
            while not device.context.client_hung_up():
                await trio.sleep(0.005)
        assert device.client_attached
        result: list[Any] = []

        async def change() -> None:
            result.append(await execute(control, command, **arguments))

        nursery.start_soon(change)
        await trio.sleep(0.2)
        assert result == [] and device.client_attached  # waiting, not refused
    finally:
        release.set()
        await trio.to_thread.run_sync(holder.join)
    with trio.fail_after(10):
        while not result:
            await trio.sleep(0.005)
    assert result == [{}]
    names = [entry["name"] for entry in await execute(control, "query-devices")]
    if command == "set-profile":
        assert controller.running("net0").profile == "transitional"  # type: ignore[union-attr]
    else:
        assert names == []


@pytest.mark.parametrize(("command", "arguments"), COMMANDS)
async def test_a_connected_client_still_refuses_the_change(
        command: str, arguments: dict[str, str], tmp_path: Path,
        nursery: trio.Nursery) -> None:
    controller, control = await served(tmp_path, nursery)
    client = await trio.to_thread.run_sync(attached_client, tmp_path / "net0.sock")
    try:
        with pytest.raises(ServerError, match="has a client attached"):
            await execute(control, command, **arguments)
        assert await trio.to_thread.run_sync(client.read, vu.PciRegion.CONFIG, 0, 2) == \
            b"\xf4\x1a"  # still served
    finally:
        client.close()
    assert controller.running("net0") is not None
