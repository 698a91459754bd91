"""The control plane: many devices in one server, the control socket and its commands, the
CLI on top, --persist and sd_notify readiness.

Servers run in-process (Controller.run in the test's trio loop, real ServedDevice objects,
the real libvfio-user) where a test looks inside, and as `vfuserver run --config ...`
processes where the CLI, restarts or $NOTIFY_SOCKET are exercised.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomlkit
import trio

from tests.server.control_helpers import (
    VENDOR_DEVICE_MODERN,
    VENDOR_DEVICE_TRANSITIONAL,
    RawSession,
    ServerProcess,
    execute,
    ids_of,
    read_ids,
    request,
    run_cli,
    server_process,
    spec,
    start_controller,
)
from vfuserver.cli import _socket_device, build_parser
from vfuserver.client import Client
from vfuserver.config import ConfigError, ServerConfig, load_config, parse_config
from vfuserver.control.client import ControlUnreachable, ServerError
from vfuserver.control.client import execute as client_execute
from vfuserver.control.controller import Controller, package_version
from vfuserver.control.qmp import MAX_MESSAGE
from vfuserver.control.server import ControlServer
from vfuserver.persist import render_config
from vfuserver.protocol import vfio_user as vu
from vfuserver.sdnotify import Notifier
from vfuserver.server import DeviceSet, serve
from vfuserver.spec import default_mac, format_mac

DGRAM_THAT_CANNOT_BIND = ("dgram,local.type=unix,local.path=/nonexistent/vfu/l.sock,"
                          "remote.type=unix,remote.path=/nonexistent/vfu/r.sock")


def config_text(tmp_path: Path, *devices: dict[str, str], control: str = "ctl.sock") -> str:
    return tomlkit.dumps({"server": {"control": control}, "device": list(devices)})


# --- in-process: queries, profiles, many devices, add/remove, failures ------------------------

async def test_query_devices_and_profiles(tmp_path: Path, nursery: trio.Nursery) -> None:
    image = tmp_path / "disk0.img"
    image.write_bytes(bytes(1 << 20))
    config = ServerConfig(control=str(tmp_path / "ctl.sock"), devices=[
        spec(tmp_path, "net0"),
        spec(tmp_path, "net1", profile="transitional", mac="52:54:00:00:00:01",
             netdev="none"),
        spec(tmp_path, "disk0", type="virtio-blk", profile="transitional", image=str(image),
             serial="d0"),
    ])
    await start_controller(nursery, config)

    devices = await execute(config.control or "", "query-devices")
    assert devices == [
        {"name": "net0", "type": "virtio-net", "socket": str(tmp_path / "net0.sock"),
         "profile": "modern", "mac": format_mac(default_mac("net0")), "netdev": "none",
         "state": "running", "client-attached": False},
        {"name": "net1", "type": "virtio-net", "socket": str(tmp_path / "net1.sock"),
         "profile": "transitional", "mac": "52:54:00:00:00:01", "netdev": "none",
         "state": "running", "client-attached": False},
        {"name": "disk0", "type": "virtio-blk", "socket": str(tmp_path / "disk0.sock"),
         "profile": "transitional", "image": str(image), "readonly": False, "direct": False,
         "serial": "d0", "queues": 1, "state": "running", "client-attached": False},
    ]
    profiles = await execute(config.control or "", "query-profiles")
    assert profiles == [
        {"device": "net0", "type": "virtio-net", "current": "modern",
         "available": ["modern", "transitional"], "changeable": True},
        {"device": "net1", "type": "virtio-net", "current": "transitional",
         "available": ["modern", "transitional"], "changeable": True},
        {"device": "disk0", "type": "virtio-blk", "current": "transitional",
         "available": ["modern", "transitional"], "changeable": True},
    ]
    one = await execute(config.control or "", "query-profiles", device="net1")
    assert one == profiles[1:2]
    assert await ids_of(tmp_path / "disk0.sock") == bytes.fromhex("f41a0110")  # 1af4:1001
    await execute(config.control or "", "set-profile", device="disk0", profile="modern")
    assert await ids_of(tmp_path / "disk0.sock") == bytes.fromhex("f41a4210")  # 1af4:1042
    with pytest.raises(ServerError) as raised:
        await execute(config.control or "", "query-profiles", device="net9")
    assert raised.value.error_class == "DeviceNotFound"

    stats = await execute(config.control or "", "query-stats")
    assert [(entry["device"], entry["type"]) for entry in stats] == [
        ("net0", "virtio-net"), ("net1", "virtio-net"), ("disk0", "virtio-blk")]
    assert {"virtio_blk", "backend"} <= set(stats[2]["stats"])
    assert stats[2]["stats"]["virtio_blk"]["read_ops"] == 0
    assert {"virtio_net", "backend"} <= set(stats[0]["stats"])
    assert stats[0]["stats"]["backend"]["tx_frames"] == 0
    assert "legacy" in stats[1]["stats"]  # the transitional presentation's counters
    assert await execute(config.control or "", "query-stats", device="net0") == stats[:1]
    names = {c["name"] for c in await execute(config.control or "", "query-commands")}
    assert {"query-devices", "query-profiles", "set-profile", "query-stats", "device-add",
            "device-del"} <= names


async def test_set_profile_without_client_changes_what_a_client_sees(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    config = ServerConfig(control=str(tmp_path / "ctl.sock"), devices=[spec(tmp_path, "net0")])
    await start_controller(nursery, config)
    sock = tmp_path / "net0.sock"
    assert await ids_of(sock) == VENDOR_DEVICE_MODERN

    assert await execute(config.control or "", "set-profile", device="net0",
                         profile="transitional") == {}
    assert await ids_of(sock) == VENDOR_DEVICE_TRANSITIONAL
    [profile] = await execute(config.control or "", "query-profiles", device="net0")
    assert profile["current"] == "transitional"
    assert config.devices[0].profile == "transitional"  # the definition follows

    assert await execute(config.control or "", "set-profile", device="net0",
                         profile="modern") == {}
    assert await ids_of(sock) == VENDOR_DEVICE_MODERN
    with pytest.raises(ServerError) as raised:
        await execute(config.control or "", "set-profile", device="net0", profile="legacy")
    assert raised.value.error_class == "GenericError"
    assert "unknown profile" in raised.value.desc


async def test_set_profile_with_a_client_attached_is_refused(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    config = ServerConfig(control=str(tmp_path / "ctl.sock"), devices=[spec(tmp_path, "net0")])
    await start_controller(nursery, config)
    sock = str(tmp_path / "net0.sock")
    client = await trio.to_thread.run_sync(Client, sock)
    try:
        # one round trip: the server has finished attaching the client
        first = await trio.to_thread.run_sync(client.read, vu.PciRegion.CONFIG, 0, 4)
        assert first == VENDOR_DEVICE_MODERN
        [device] = await execute(config.control or "", "query-devices")
        assert device["client-attached"] is True
        [profile] = await execute(config.control or "", "query-profiles")
        assert profile["changeable"] is False

        with pytest.raises(ServerError) as raised:
            await execute(config.control or "", "set-profile", device="net0",
                          profile="transitional")
        assert raised.value.error_class == "GenericError"
        assert "client attached" in raised.value.desc
        assert "shut the VM down" in raised.value.desc

        [profile] = await execute(config.control or "", "query-profiles")
        assert profile["current"] == "modern"
        assert config.devices[0].profile == "modern"
        # the attached client goes on with the same device
        again = await trio.to_thread.run_sync(client.read, vu.PciRegion.CONFIG, 0, 4)
        assert again == VENDOR_DEVICE_MODERN
    finally:
        client.close()
    await trio.sleep(0.1)
    assert await ids_of(sock) == VENDOR_DEVICE_MODERN


async def test_sixty_four_devices_in_one_process_all_answer(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    config = ServerConfig(devices=[spec(tmp_path, f"d{i}") for i in range(64)])
    controller = await start_controller(nursery, config)
    assert len(controller.device_set) == 64

    def sessions() -> list[bytes]:
        return [read_ids(tmp_path / f"d{i}.sock") for i in range(64)]

    with trio.fail_after(60):
        assert await trio.to_thread.run_sync(sessions) == [VENDOR_DEVICE_MODERN] * 64


async def test_add_and_remove_devices_at_runtime(tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    config = ServerConfig(control=str(control), devices=[spec(tmp_path, "net0")])
    await start_controller(nursery, config)
    sock = tmp_path / "net1.sock"
    assert not sock.exists()

    added = await execute(control, "device-add", name="net1", socket=str(sock),
                          profile="transitional", mac="52:54:00:ab:cd:ef")
    assert added == {"name": "net1", "type": "virtio-net", "socket": str(sock),
                     "profile": "transitional",
                     "mac": "52:54:00:ab:cd:ef", "netdev": "none", "state": "running",
                     "client-attached": False}
    assert sock.is_socket()
    assert await ids_of(sock) == VENDOR_DEVICE_TRANSITIONAL
    assert [d["name"] for d in await execute(control, "query-devices")] == ["net0", "net1"]

    for duplicate, words in [({"name": "net1", "socket": str(tmp_path / "x.sock")}, "taken"),
                             ({"name": "net2", "socket": str(sock)}, "already device net1"),
                             ({"name": "net2", "socket": "rel.sock"}, "absolute"),
                             ({"name": "bad name", "socket": str(tmp_path / "y.sock")},
                              "not valid"),
                             ({"name": "net2", "socket": str(tmp_path / "z.sock"),
                               "netdev": "tap,bogus=1"}, "unknown or unsupported option")]:
        with pytest.raises(ServerError) as raised:
            await execute(control, "device-add", **duplicate)
        assert words in raised.value.desc, raised.value.desc

    assert await execute(control, "device-del", name="net1") == {}
    assert not sock.exists()
    assert [d["name"] for d in await execute(control, "query-devices")] == ["net0"]
    with pytest.raises(ServerError) as raised:
        await execute(control, "device-del", name="net1")
    assert raised.value.error_class == "DeviceNotFound"

    # the name and the socket are free again; the first device was served all along
    await execute(control, "device-add", name="net1", socket=str(sock))
    assert await ids_of(sock) == VENDOR_DEVICE_MODERN
    assert await ids_of(tmp_path / "net0.sock") == VENDOR_DEVICE_MODERN


async def test_remove_device_with_a_client_attached_needs_force(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    config = ServerConfig(control=str(control), devices=[spec(tmp_path, "net0")])
    await start_controller(nursery, config)
    client = await trio.to_thread.run_sync(Client, str(tmp_path / "net0.sock"))
    try:
        await trio.to_thread.run_sync(client.read, vu.PciRegion.CONFIG, 0, 4)
        with pytest.raises(ServerError) as raised:
            await execute(control, "device-del", name="net0")
        assert "client attached" in raised.value.desc
        assert await execute(control, "device-del", name="net0", force=True) == {}
        assert not (tmp_path / "net0.sock").exists()
    finally:
        client.close()


async def test_failing_devices_are_reported_and_the_others_serve(
        tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    (tmp_path / "held.sock").write_text("a regular file holds this path\n")
    control = tmp_path / "ctl.sock"
    config = ServerConfig(control=str(control), devices=[
        spec(tmp_path, "net0"),
        spec(tmp_path, "held"),
        spec(tmp_path, "badnet", netdev=DGRAM_THAT_CANNOT_BIND),
        spec(tmp_path, "net1"),
    ])
    await start_controller(nursery, config)

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("held" in m and "is not a socket" in m for m in errors), errors
    assert any("badnet" in m and "cannot bind /nonexistent/vfu/l.sock" in m
               for m in errors), errors
    assert (tmp_path / "held.sock").read_text() == "a regular file holds this path\n"

    devices = {d["name"]: d for d in await execute(control, "query-devices")}
    assert [devices[n]["state"] for n in ("net0", "held", "badnet", "net1")] == [
        "running", "failed", "failed", "running"]
    assert "is not a socket" in devices["held"]["error"]
    assert "cannot bind" in devices["badnet"]["error"]
    assert await ids_of(tmp_path / "net0.sock") == VENDOR_DEVICE_MODERN
    assert await ids_of(tmp_path / "net1.sock") == VENDOR_DEVICE_MODERN
    with pytest.raises(ServerError) as raised:
        await execute(control, "query-stats", device="held")
    assert raised.value.error_class == "DeviceNotActive"

    # a failing add-device is reported too, and defines nothing
    with pytest.raises(ServerError) as raised:
        await execute(control, "device-add", name="net2", socket=str(tmp_path / "net2.sock"),
                      netdev=DGRAM_THAT_CANNOT_BIND)
    assert "cannot bind" in raised.value.desc
    assert "net2" not in {d["name"] for d in await execute(control, "query-devices")}
    # a failed device's definition can be removed
    assert await execute(control, "device-del", name="held") == {}


class _FailsLater:
    """A device that serves, then fails with a host error (a tap deleted under it)."""

    def __init__(self) -> None:
        self.fail = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await self.fail.wait()
        raise OSError(5, "tap vfutap9 failed: File descriptor in bad state")


class _Serves:
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


async def test_device_set_a_device_failing_later_does_not_stop_the_others(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    device_set = DeviceSet()
    failing = _FailsLater()
    await nursery.start(lambda task_status: serve(
        {"bad": failing, "good": _Serves()}, device_set=device_set, task_status=task_status))
    assert device_set.names() == ["bad", "good"]
    failing.fail.set()
    with trio.fail_after(5):
        while "bad" in device_set:
            await trio.sleep(0.001)
    assert device_set.names() == ["good"]
    assert device_set.errors == {"bad": "tap vfutap9 failed: File descriptor in bad state"}
    assert any("device bad failed: tap vfutap9" in r.getMessage() for r in caplog.records)
    await device_set.stop("good")
    assert len(device_set) == 0
    assert "good" not in device_set.errors  # stopped on request: not an error


# --- the control socket: malformed messages, permissions --------------------------------------

async def test_malformed_messages_get_errors_and_the_server_goes_on(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """The framing and request checks are tests/control/test_qmp.py's; here the controller's
    argument checks, and a real server riding out bad input."""
    control = tmp_path / "ctl.sock"
    config = ServerConfig(control=str(control), devices=[spec(tmp_path, "net0")])
    await start_controller(nursery, config)
    cases: list[tuple[bytes, str, str]] = [
        (b"not json", "GenericError", "JSON parse error"),
        (b"[" * 60_000, "GenericError", "JSON nesting depth limit exceeded"),
        (b'{"execute": "query-devices", "bogus": 1}', "GenericError", "'bogus' is unexpected"),
        (b'{"execute": "format-disk"}', "CommandNotFound", "format-disk has not been found"),
        (b'{"execute": "set-profile", "arguments": {"device": "net0"}}', "GenericError",
         "Parameter 'profile' is missing"),
        (b'{"execute": "set-profile", "arguments": {"device": 0, "profile": "modern"}}',
         "GenericError", "Invalid parameter type for 'device', expected: string"),
        (b'{"execute": "device-del", "arguments": {"name": "net0", "force": "yes"}}',
         "GenericError", "Invalid parameter type for 'force', expected: boolean"),
        (b'{"execute": "query-devices", "arguments": {"device": "net0"}}', "GenericError",
         "Parameter 'device' is unexpected"),
        (b'{"execute": "set-profile", "arguments": {"device": "net9", "profile": "modern"}}',
         "DeviceNotFound", "no device named 'net9'"),
        (b'{"execute": "query-stats", "arguments": {"device": 7}}', "GenericError",
         "Invalid parameter type for 'device', expected: string"),
        (b"x" * (MAX_MESSAGE + 5000), "GenericError", f"longer than {MAX_MESSAGE} bytes"),
    ]

    def session() -> list[dict[str, Any]]:
        with RawSession(control) as raw:
            replies = []
            for line, _, _ in cases:
                raw.send(line)
                replies.append(raw.receive())
            raw.send(b"")  # blank lines are skipped, not answered
            raw.send(b'{"execute": "query-devices", "id": {"seq": 7}}')
            replies.append(raw.receive())
            return replies

    replies = await trio.to_thread.run_sync(session)
    for (line, error_class, words), reply in zip(cases, replies, strict=False):
        assert reply["error"]["class"] == error_class, (line[:60], reply)
        assert words in reply["error"]["desc"], (line[:60], reply)
        assert set(reply) == {"error"}
    last = replies[-1]
    assert last["id"] == {"seq": 7}
    assert [d["name"] for d in last["return"]] == ["net0"]
    # the device was served all along, and a new connection is served too
    assert await ids_of(tmp_path / "net0.sock") == VENDOR_DEVICE_MODERN
    reply = await request(control, {"execute": "query-devices", "id": 1})
    assert reply["id"] == 1 and reply["return"][0]["state"] == "running"


async def test_a_client_that_disconnects_mid_line_does_not_disturb(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    await start_controller(nursery, ServerConfig(control=str(control)))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(control))
        sock.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-dev')

    def last_line_without_newline() -> list[bytes]:
        with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rb") as file:
            sock.settimeout(10)
            sock.connect(str(control))
            sock.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-devices"}')
            sock.shutdown(socket.SHUT_WR)
            return file.readlines()

    greeting, negotiated, reply = await trio.to_thread.run_sync(last_line_without_newline)
    assert "QMP" in json.loads(greeting)
    assert json.loads(negotiated) == {"return": {}}
    assert reply == b'{"return": []}\r\n'


async def test_control_socket_is_owner_only_and_removed_on_exit(tmp_path: Path) -> None:
    control = tmp_path / "ctl.sock"
    async with trio.open_nursery() as nursery:
        await start_controller(nursery, ServerConfig(control=str(control)))
        mode = os.stat(control).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        nursery.cancel_scope.cancel()
    assert not control.exists()


async def test_peers_of_another_uid_are_refused(tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    controller = Controller(ServerConfig())
    # The test cannot connect as another user (the socket is 0600): the server is told
    # its owner is someone else instead, so this process is the foreign peer.
    server = ControlServer(str(control), controller, owner_uid=os.geteuid() + 4242)
    await nursery.start(server.run)
    with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rb") as file:
        sock.connect(str(control))
        sock.settimeout(10)
        refusal = await trio.to_thread.run_sync(file.readline)  # instead of the greeting
        assert await trio.to_thread.run_sync(file.read) == b""  # then it hangs up
    reply = json.loads(refusal)
    assert reply["error"]["class"] == "GenericError"
    assert "permission denied" in reply["error"]["desc"]
    # a QMP client hears no greeting: the server cannot be used
    with pytest.raises(ControlUnreachable, match="cannot reach the server"):
        await execute(control, "query-devices")


async def test_control_socket_of_a_running_server_is_not_taken_over(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    await start_controller(nursery, ServerConfig(control=str(control)))
    with pytest.raises(OSError, match="held by a running server"):
        await Controller(ServerConfig(control=str(control))).run()
    assert await execute(control, "query-devices") == []


# --- the config file ----------------------------------------------------------------------------

def test_config_round_trip_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(config_text(
        tmp_path,
        {"name": "net0", "socket": "net0.sock"},
        {"name": "net1", "socket": "/run/x/net1.sock", "profile": "transitional",
         "mac": "52:54:00:00:00:02",
         "netdev": "stream,server=on,addr.type=unix,addr.path=/tmp/a,,b.sock"},
    ))
    config = load_config(path)
    assert config.control == str(tmp_path / "ctl.sock")
    assert config.devices[0].socket == str(tmp_path / "net0.sock")
    assert config.devices[0].mac == default_mac("net0")
    assert config.devices[1].netdev.addr.path == "/tmp/a,b.sock"  # type: ignore[union-attr]
    text = render_config(config)  # a new file: every key spelled out, paths absolute
    again = parse_config(text)
    assert again.devices == config.devices and again.control == config.control
    assert render_config(again) == text


def test_blk_config_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text("[[device]]\nname = 'disk0'\nsocket = 'd.sock'\ntype = 'virtio-blk'\n"
                    "image = 'images/d.img'\nreadonly = true\ndirect = true\n"
                    "serial = 'SN1'\nqueues = 4\n")
    [disk] = load_config(path).devices
    assert (disk.type, disk.image, disk.readonly, disk.direct, disk.serial, disk.mac,
            disk.queues) == ("virtio-blk", str(tmp_path / "images/d.img"), True, True, "SN1",
                             b"", 4)
    text = render_config(load_config(path))
    assert "image = " in text and "mac" not in text and "netdev" not in text
    assert parse_config(text).devices == [disk]


@pytest.mark.parametrize(("text", "words"), [
    pytest.param("[[device]]\nname = 'a'\n", "socket is required", id="no-socket"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\nprofile = 'legacy'\n",
                 "unknown profile", id="profile"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\nmac = '01:00:00:00:00:00'\n",
                 "multicast", id="mac"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\nnetdev = 'vde'\n",
                 "unknown backend", id="netdev"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ncolor = 'red'\n", "unknown key color",
                 id="unknown-key"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 1\n", "socket must be a string",
                 id="type"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\n[[device]]\nname = 'a'\n"
                 "socket = 't'\n", "already taken", id="duplicate-name"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\n[[device]]\nname = 'b'\n"
                 "socket = 's'\n", "already device a's", id="duplicate-socket"),
    # found trying the server: the second device failed at start-up, "tap ... is busy:
    # another process (a QEMU, another vfuserver) has it open"
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\nnetdev = 'tap,ifname=t0'\n"
                 "[[device]]\nname = 'b'\nsocket = 't'\nnetdev = 'tap,ifname=t0'\n",
                 "tap t0 is already device a's; give each device its own tap",
                 id="duplicate-tap"),

    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ntype = 'virtio-blk'\n",
                 "needs a disk image", id="blk-without-image"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ntype = 'virtio-blk'\nimage = 'i'\n"
                 "mac = '52:54:00:00:00:01'\n", "virtio-net settings", id="blk-with-mac"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\nimage = 'i'\n",
                 "add type virtio-blk", id="net-with-image"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ntype = 'virtio-blk'\nimage = 'i'\n"
                 "readonly = 'yes'\n", "readonly must be a boolean", id="readonly-not-bool"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ntype = 'virtio-blk'\nimage = 'i'\n"
                 "serial = 'a-serial-longer-than-20'\n", "at most 20", id="long-serial"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ntype = 'virtio-blk'\nimage = 'i'\n"
                 "queues = 0\n", "0 request queues: choose 1..64", id="no-queues"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ntype = 'virtio-blk'\nimage = 'i'\n"
                 "queues = '2'\n", "queues must be an integer", id="queues-not-int"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\nqueues = 2\n", "add type virtio-blk",
                 id="net-with-queues"),
    pytest.param("[[device]]\nname = 'a'\nsocket = 's'\ntype = 'virtio-gpu'\n",
                 "unknown device type 'virtio-gpu'", id="device-type"),
    pytest.param("[server]\nsocket = 'x'\n", "unknown key socket", id="server-key"),
    pytest.param("[devices]\n", "unknown table", id="table"),
    pytest.param("[[device]\n", "not valid TOML", id="syntax"),
])
def test_config_errors_name_the_problem(text: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(text, path=tmp_path / "d.toml")


def test_taps_the_kernel_names_are_each_their_own() -> None:
    for netdev in ("tap", "tap,ifname=vfu%d"):  # no name, or a template (tun_set_iff)
        text = (f"[[device]]\nname = 'a'\nsocket = 's'\nnetdev = '{netdev}'\n"
                f"[[device]]\nname = 'b'\nsocket = 't'\nnetdev = '{netdev}'\n")
        assert [d.name for d in parse_config(text).devices] == ["a", "b"]


# --- sd_notify ----------------------------------------------------------------------------------

def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"vfuserver-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(5)
        assert Notifier(f"@{name}").notify(READY=1, STATUS="serving 1 of 1 devices")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 1 of 1 devices"
    assert not Notifier(None).notify(READY=1)
    assert not Notifier("/nonexistent/notify").notify(READY=1)  # logged, not raised


def test_ready_is_notified_once_every_socket_exists(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    path = tmp_path / "devices.toml"
    path.write_text(config_text(tmp_path, *({"name": f"n{i}", "socket": f"n{i}.sock"}
                                            for i in range(8))))
    sockets = [tmp_path / f"n{i}.sock" for i in range(8)] + [tmp_path / "ctl.sock"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(notify))
        receiver.settimeout(30)
        with server_process(["--config", str(path)], tmp_path / "server.log",
                            env={"NOTIFY_SOCKET": str(notify)}) as server:
            message = receiver.recv(4096).decode()
            present = [p.is_socket() for p in sockets]
            fields = dict(line.split("=", 1) for line in message.splitlines())
            assert fields["READY"] == "1"
            assert fields["STATUS"].startswith("serving 8 of 8 devices")
            assert all(present), present
            assert server.stop() == 0
            stopping = receiver.recv(4096).decode()
            assert "STOPPING=1" in stopping.splitlines()


# --- `vfuserver run` and the CLI ----------------------------------------------------------------

def test_cli_against_a_running_server(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    control = tmp_path / "ctl.sock"
    path.write_text(config_text(
        tmp_path, {"name": "net0", "socket": "net0.sock"},
        {"name": "net1", "socket": "net1.sock", "netdev": DGRAM_THAT_CANNOT_BIND}))
    with server_process(["--config", str(path)], tmp_path / "server.log",
                        [control, tmp_path / "net0.sock"]) as server:
        listed = run_cli("profile", "list", control=control)
        assert (listed.returncode, listed.stdout) == (
            0, "net0 modern modern,transitional\nnet1 modern modern,transitional\n")
        status = run_cli("status", control=control)
        assert status.returncode == 0
        lines = status.stdout.splitlines()
        assert lines[0] == f"net0 running modern detached {tmp_path / 'net0.sock'}"
        assert lines[1].startswith(f"net1 failed modern - {tmp_path / 'net1.sock'} cannot bind")
        as_json = run_cli("status", "--json", control=control)
        assert [d["name"] for d in json.loads(as_json.stdout)] == ["net0", "net1"]
        by_env = run_cli("profile", "list", "net0", env={"VFUSERVER_CONTROL": str(control)})
        assert by_env.stdout == "net0 modern modern,transitional\n"
        stats = run_cli("stats", "net0", control=control)
        assert "net0 backend.tx_dropped 0" in stats.stdout.splitlines()

        added = run_cli("device", "add", "net2", "--socket", str(tmp_path / "net2.sock"),
                        "--profile", "transitional", control=control)
        assert (added.returncode, added.stdout, added.stderr) == (0, "", "")
        assert read_ids(tmp_path / "net2.sock") == VENDOR_DEVICE_TRANSITIONAL
        profile_set = run_cli("profile", "set", "net2", "modern", control=control)
        assert (profile_set.returncode, profile_set.stderr) == (0, "")
        assert read_ids(tmp_path / "net2.sock") == VENDOR_DEVICE_MODERN
        removed = run_cli("device", "remove", "net2", control=control)
        assert removed.returncode == 0 and not (tmp_path / "net2.sock").exists()

        refused = run_cli("device", "remove", "net9", control=control)
        assert refused.returncode == 1
        assert refused.stderr == "vfuserver: no device named 'net9'\n"
        usage = run_cli("profile", "set", "net0", "legacy", control=control)
        assert usage.returncode == 2
        assert run_cli("status").returncode == 2
        assert "VFUSERVER_CONTROL" in run_cli("status").stderr
        gone = run_cli("status", control=tmp_path / "nobody.sock")
        assert gone.returncode == 3 and "cannot reach the server" in gone.stderr
        assert server.stop() == 0
    assert not control.exists()
    assert run_cli("status", control=control).returncode == 3


def test_run_socket_shortcut_with_a_control_socket(tmp_path: Path) -> None:
    control, sock = tmp_path / "ctl.sock", tmp_path / "one.sock"
    with server_process(["--socket", str(sock), "--name", "one", "--profile", "transitional",
                         "--control", str(control)], tmp_path / "server.log",
                        [control, sock]) as server:
        assert run_cli("profile", "list", control=control).stdout == (
            "one transitional modern,transitional\n")
        assert read_ids(sock) == VENDOR_DEVICE_TRANSITIONAL
        assert server.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda signum: signal.Signals(signum).name)
def test_a_stop_signal_ends_the_server_cleanly(tmp_path: Path, signum: int) -> None:
    # Found trying the server as an operator: SIGHUP (its terminal closed) ended it on the
    # spot, without a word and with its sockets left behind.
    control, sock = tmp_path / "ctl.sock", tmp_path / "one.sock"
    with server_process(["--socket", str(sock), "--control", str(control)],
                        tmp_path / "server.log", [control, sock]) as server:
        assert server.process is not None
        server.process.send_signal(signum)
        assert server.process.wait(20) == 0
        assert f"{signal.Signals(signum).name} received: shutting down" in server.log
    assert not sock.exists() and not control.exists()


def test_under_nohup_sighup_stays_ignored(tmp_path: Path) -> None:
    control, sock = tmp_path / "ctl.sock", tmp_path / "one.sock"
    server = ServerProcess(["--socket", str(sock), "--control", str(control)],
                           tmp_path / "server.log")
    server.command = ["nohup", *server.command]
    try:
        server.start([control, sock])
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.wait(2)
        assert "SIGHUP" not in server.log
    finally:
        assert server.stop() == 0


def test_run_socket_serves_a_disk(tmp_path: Path) -> None:
    control, sock, image = tmp_path / "ctl.sock", tmp_path / "disk.sock", tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    with server_process(["--socket", str(sock), "--device", "virtio-blk", "--image", str(image),
                         "--readonly", "--serial", "SN1", "--profile", "transitional",
                         "--control", str(control)], tmp_path / "server.log",
                        [control, sock]) as server:
        assert read_ids(sock) == bytes.fromhex("f41a0110")  # 1af4:1001
        [device] = json.loads(run_cli("status", "--json", control=control).stdout)
        assert (device["name"], device["type"], device["readonly"], device["serial"]) == (
            "disk0", "virtio-blk", True, "SN1")
        assert server.stop() == 0
    assert "type virtio-blk, profile transitional, image " in (
        tmp_path / "server.log").read_text()


async def test_device_add_a_disk_at_runtime(tmp_path: Path, nursery: trio.Nursery) -> None:
    control = tmp_path / "ctl.sock"
    config = ServerConfig(control=str(control), devices=[])
    await start_controller(nursery, config)
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    added = await execute(control, "device-add", name="disk1", socket=str(tmp_path / "d.sock"),
                          type="virtio-blk", image=str(image), direct=True, queues=2)
    assert (added["type"], added["image"], added["direct"], added["queues"]) == (
        "virtio-blk", str(image), True, 2)
    assert await ids_of(tmp_path / "d.sock") == bytes.fromhex("f41a4210")  # 1af4:1042
    with pytest.raises(ServerError) as raised:
        await execute(control, "device-add", name="disk2", socket=str(tmp_path / "e.sock"),
                      type="virtio-blk", image="rel.img")
    assert "absolute" in raised.value.desc
    with pytest.raises(ServerError) as raised:
        await execute(control, "device-add", name="disk3", socket=str(tmp_path / "f.sock"),
                      type="virtio-blk", image=str(tmp_path / "missing.img"))
    assert "cannot open disk image" in raised.value.desc


@pytest.mark.parametrize("args", [
    pytest.param(["--persist", "--socket", "x.sock"], id="persist-without-config"),
    pytest.param(["--config", "d.toml", "--profile", "modern"], id="config-and-device-option"),
    pytest.param(["--config", "d.toml", "--socket", "x.sock"], id="config-and-socket"),
    pytest.param([], id="nothing-to-serve"),
    pytest.param(["--socket", "x.sock", "--device", "virtio-blk"], id="blk-without-image"),
    pytest.param(["--socket", "x.sock", "--image", "d.img"], id="image-without-blk"),
    pytest.param(["--socket", "x.sock", "--device", "virtio-blk", "--image", "d.img",
                  "--netdev", "tap,ifname=tap0"], id="blk-with-netdev"),
    pytest.param(["--socket", "x.sock", "--device", "virtio-blk", "--image", "d.img",
                  "--serial", "é"], id="serial-not-ascii"),
    pytest.param(["--config", "d.toml", "--image", "d.img"], id="config-and-image"),
    pytest.param(["--socket", "x.sock", "--device", "virtio-blk", "--image", "d.img",
                  "--queues", "0"], id="no-queues"),
    pytest.param(["--socket", "x.sock", "--queues", "2"], id="queues-without-blk"),
])
def test_run_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = run_cli("run", *args)
    assert result.returncode == 2, result.stderr


def test_run_exits_1_when_no_device_can_be_served(tmp_path: Path) -> None:
    (tmp_path / "held.sock").write_text("")
    result = run_cli("run", "--socket", str(tmp_path / "held.sock"))
    assert result.returncode == 1
    assert "device net0: cannot serve" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[[device]]\nname = 'a'\n")
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 1 and "socket is required" in result.stderr


# --- --persist ----------------------------------------------------------------------------------

def _running_state(control: Path) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = client_execute(str(control), "query-devices", timeout=10)
    return devices


def test_persist_writes_back_what_runs_and_a_restart_reproduces_it(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    control = tmp_path / "ctl.sock"
    path.write_text("# operator's comment\n" + config_text(
        tmp_path, {"name": "net0", "socket": "net0.sock"},
        {"name": "net1", "socket": "net1.sock", "mac": "52:54:00:00:00:01"}))
    os.chmod(path, 0o640)
    args = ["--config", str(path), "--persist"]
    stream = tmp_path / "peer,1.sock"
    stream_netdev = f"stream,server=on,addr.type=unix,addr.path={str(stream).replace(',', ',,')}"
    with server_process(args, tmp_path / "server-1.log", [control]) as server:
        assert run_cli("device", "add", "net2", "--socket", str(tmp_path / "net2.sock"),
                       "--mac", "52:54:00:00:00:02", "--netdev", stream_netdev,
                       control=control).returncode == 0
        assert run_cli("device", "remove", "net1", control=control).returncode == 0
        assert run_cli("profile", "set", "net0", "transitional",
                       control=control).returncode == 0
        before = _running_state(control)
        assert server.stop() == 0

    written = load_config(path)
    assert [(d.name, d.socket, d.profile, format_mac(d.mac), str(d.netdev))
            for d in written.devices] == [
        (d["name"], d["socket"], d["profile"], d["mac"], d["netdev"]) for d in before]
    assert written.devices[1].netdev.addr.path == str(stream)  # type: ignore[union-attr]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    with server_process(args, tmp_path / "server-2.log", [control]):
        assert _running_state(control) == before
        assert read_ids(tmp_path / "net0.sock") == VENDOR_DEVICE_TRANSITIONAL


def test_persist_keeps_the_operator_s_comments_and_order(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    control = tmp_path / "ctl.sock"
    path.write_text(
        "# host A's devices\n\n[server]\ncontrol = 'ctl.sock'  # next to this file\n\n"
        "# the uplink\n[[device]]\nname = 'net0'\nsocket = 'net0.sock'  # relative\n\n"
        "# the spare\n[[device]]\nname = 'net1'\nsocket = 'net1.sock'\n\n"
        "# the lab\n[[device]]\nname = 'lab'   # keep\nsocket = 'lab.sock'\n\n# the end\n")
    with server_process(["--config", str(path), "--persist"], tmp_path / "server.log",
                        [control]) as server:
        assert run_cli("profile", "set", "lab", "transitional",
                       control=control).returncode == 0
        assert run_cli("device", "add", "net2", "--socket", str(tmp_path / "net2.sock"),
                       "--mac", "52:54:00:00:00:02", control=control).returncode == 0
        assert run_cli("device", "remove", "net1", control=control).returncode == 0
        assert server.stop() == 0
    assert path.read_text() == (
        "# host A's devices\n\n[server]\ncontrol = 'ctl.sock'  # next to this file\n\n"
        "# the uplink\n[[device]]\nname = 'net0'\nsocket = 'net0.sock'  # relative\n\n"
        "# the lab\n[[device]]\nname = 'lab'   # keep\nsocket = 'lab.sock'\n"
        'profile = "transitional"\n\n# the end\n\n'
        f'[[device]]\nname = "net2"\nsocket = "{tmp_path / "net2.sock"}"\n'
        'profile = "modern"\nmac = "52:54:00:00:00:02"\nnetdev = "none"\n')


def test_without_persist_the_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    control = tmp_path / "ctl.sock"
    text = config_text(tmp_path, {"name": "net0", "socket": "net0.sock"})
    path.write_text(text)
    with server_process(["--config", str(path)], tmp_path / "server.log", [control]):
        assert run_cli("device", "remove", "net0", control=control).returncode == 0
    assert path.read_text() == text


# --- contrib/systemd ----------------------------------------------------------------------------

SYSTEMD = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


@pytest.mark.parametrize(("unit", "environment"), [
    pytest.param("vfuserver.service", {}, id="service"),
    pytest.param("vfuserver@.service", {"PROFILE": "transitional", "NETDEV": "none",
                                        "VFUSERVER_ARGS": "--mac 52:54:00:00:01:00"},
                 id="template"),
    pytest.param("vfuserver@.service", {"PROFILE": "modern", "NETDEV": "none",
                                        "VFUSERVER_ARGS": "--device virtio-blk --image "
                                                          "/var/lib/vfuserver/net0.img"},
                 id="template-disk"),
])
def test_systemd_units_run_what_the_cli_accepts(unit: str, environment: dict[str, str]) -> None:
    text = (SYSTEMD / unit).read_text()
    assert "Type=notify" in text.splitlines()
    [exec_start] = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    words = exec_start.removeprefix("ExecStart=").replace("%i", "net0").split()
    assert words[0] == "/usr/local/bin/vfuserver"
    argv: list[str] = []
    for word in words[1:]:  # systemd: ${VAR} is one word, $VAR splits at whitespace
        if word.startswith("${"):
            argv.append(environment[word[2:-1]])
        elif word.startswith("$"):
            argv += environment[word[1:]].split()
        else:
            argv.append(word)
    args = build_parser().parse_args(argv)
    assert args.command == "run" and args.control.startswith("/run/vfuserver/")
    if unit == "vfuserver.service":
        assert (args.config, args.persist) == ("/etc/vfuserver/devices.toml", True)
    else:
        spec = _socket_device(args)  # the checks `run` makes of the options' mix
        assert (spec.socket, spec.name, spec.profile) == (
            "/run/vfuserver/net0.sock", "net0", environment["PROFILE"])
        if "--image" in argv:  # under /var/lib/vfuserver: the unit's StateDirectory
            assert (spec.type, spec.image) == ("virtio-blk", "/var/lib/vfuserver/net0.img")
            assert "StateDirectory=vfuserver" in text.splitlines()
    example = parse_config((SYSTEMD / "devices.toml.example").read_text())
    assert [d.name for d in example.devices] == ["net0", "net1"]


def test_a_control_socket_path_too_long_is_enametoolong(tmp_path: Path) -> None:
    # Python raises "AF_UNIX path too long" with no errno: the error must still carry one.
    path = tmp_path / ("c" * 120 + ".sock")
    server = ControlServer(str(path), Controller(ServerConfig()))
    with pytest.raises(OSError, match="holds at most 107; choose a shorter one") as err:
        server.bind()
    assert err.value.errno == errno.ENAMETOOLONG


@pytest.mark.parametrize(("version", "numbers"), [
    ("0.2", (0, 2, 0)), ("0.2.0rc1", (0, 2, 0)), ("1.0.0.dev3", (1, 0, 0)),
    ("0.1.0+local", (0, 1, 0)), ("3", (3, 0, 0))])
def test_the_greeting_version_of_any_pep440_version(version: str,
                                                   numbers: tuple[int, int, int]) -> None:
    got = package_version(version)
    assert (got.major, got.minor, got.micro) == numbers
    assert got.package == f"vfuserver {version}"
