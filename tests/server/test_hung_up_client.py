"""A change asked for right after the VM went away: set-profile and device-del wait for a
client that has hung up to be detached, instead of refusing it as attached.

The serving thread detaches a client as soon as it reads the end of the stream; an
operator's script that shuts the VM down and changes the device at once must not depend on
how soon that thread ran. Here the thread is held deterministically: the test takes the
device lock, which the thread needs for the reset that ends the session
(vfuserver_reset_cb), so the client stays attached, hung up, until the test lets go.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.server.conftest import ScratchFunction, attached_session, until
from tests.server.control_helpers import execute, start_controller
from vfuserver.client import Client
from vfuserver.config import parse_config
from vfuserver.context import VfuContext
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


@asynccontextmanager
async def hung_up_session(controller: Controller, tmp_path: Path) -> AsyncIterator[Any]:
    """net0's client hung up while the test holds the device lock: the serving thread
    cannot end the session (its reset callback waits for the lock) until the block ends."""
    device: Any = controller.running("net0")
    client = await trio.to_thread.run_sync(attached_client, tmp_path / "net0.sock")
    taken, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(device.context.lock, taken, release))
    holder.start()
    try:
        assert await trio.to_thread.run_sync(taken.wait, 10)
        client.close()  # the VM is gone; the serving thread cannot end the session yet
        await until(lambda: device.session_ending)
        assert device.client_attached
        yield device
    finally:
        release.set()
        await trio.to_thread.run_sync(holder.join)


@pytest.mark.parametrize(("command", "arguments"), COMMANDS)
async def test_a_change_waits_for_a_client_that_hung_up(
        command: str, arguments: dict[str, str], tmp_path: Path,
        nursery: trio.Nursery) -> None:
    controller, control = await served(tmp_path, nursery)
    result: list[Any] = []
    async with hung_up_session(controller, tmp_path) as device:

        async def change() -> None:
            result.append(await execute(control, command, **arguments))

        nursery.start_soon(change)
        await until(controller._lock.locked)  # the command is in: it holds the lock
        # it cannot end while the session does not (the test holds that): waiting, not
        # refused (a refusal would have failed change() and the test)
        assert result == [] and device.client_attached
    await until(lambda: result)
    assert result == [{}]
    names = [entry["name"] for entry in await execute(control, "query-devices")]
    if command == "set-profile":
        assert controller.running("net0").profile == "transitional"  # type: ignore[union-attr]
    else:
        assert names == []


async def test_a_session_that_does_not_end_is_refused_saying_so(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Not detached within HUNG_UP_DETACH_SECONDS (a request still held): refused, with
    what to do; "shut the VM down" would be no help, it is down."""
    controller, control = await served(tmp_path, nursery)
    async with hung_up_session(controller, tmp_path):
        [profile] = await execute(control, "query-profiles", device="net0")
        assert profile["changeable"]  # once the session has ended
        with pytest.raises(ServerError, match=re.escape(
                "device net0: its client has gone (QEMU exited) but the session has not "
                "ended yet (a request is still in progress): try again in a moment")):
            await execute(control, "set-profile", device="net0", profile="transitional")
    assert controller.running("net0").profile == "modern"  # type: ignore[union-attr]


def test_a_connection_closed_before_the_detach_is_a_session_ending(tmp_path: Path) -> None:
    """The serving thread has read the end of the stream and libvfio-user closed the
    connection (vfu_get_poll_fd gives the listening socket again), but the event loop
    has not marked the client detached yet."""
    with VfuContext(str(tmp_path / "c.sock"), ScratchFunction()) as context:
        listening = context.poll_fd()
        client, thread, _ = attached_session(context)
        context.client_attached = True  # what serve_device does around serve_client
        assert client.read(vu.PciRegion.CONFIG, 0, 2) == b"\xf4\x1a"
        assert not context.client_hung_up()  # connected
        client.close()
        thread.join(10)
        assert not thread.is_alive() and context.poll_fd() == listening
        assert context.client_hung_up()
        context.client_attached = False
        assert not context.client_hung_up()


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
