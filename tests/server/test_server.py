"""The serving loop against a real libvfio-user, driven by a real vfio-user client."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.server.conftest import ScratchFunction
from vfuserver.client import Client, VfioUserError
from vfuserver.context import ATTACH_TIMEOUT, DropReason, ServeResult, VfuContext
from vfuserver.devices.pci import ResetKind
from vfuserver.protocol import vfio_user as vu
from vfuserver.server import serve_device


def in_thread(fn: Any, *args: Any) -> Any:
    return trio.to_thread.run_sync(fn, *args)


async def test_version_negotiation(serve: Any) -> None:
    context = await serve(ScratchFunction())

    def session() -> tuple[tuple[int, int], dict[str, Any]]:
        with Client(context.socket_path) as client:
            return client.server_version, client.server_capabilities

    version, caps = await in_thread(session)
    assert version[0] == 0
    assert caps["max_data_xfer_size"] == vu.MAX_DATA_XFER_SIZE
    assert caps["max_msg_fds"] >= 1


async def test_bad_version_is_refused_and_next_client_served(serve: Any) -> None:
    context = await serve(ScratchFunction())

    def bad() -> None:
        with Client(context.socket_path, negotiate=False) as client, \
                pytest.raises((VfioUserError, ConnectionError)):
            client.request(vu.Command.VERSION, vu.build_version(7, 0, None))

    await in_thread(bad)

    def good() -> bytes:
        with Client(context.socket_path) as client:
            return client.read(vu.PciRegion.CONFIG, 0, 4)

    assert await in_thread(good) == bytes.fromhex("f41aff10")


async def test_device_region_and_irq_info(serve: Any) -> None:
    context = await serve(ScratchFunction())

    def session() -> tuple[Any, dict[int, Any], dict[int, Any]]:
        with Client(context.socket_path) as client:
            info = client.device_info()
            regions = {i: client.region_info(i) for i in range(info.num_regions)}
            irqs = {i: client.irq_info(i) for i in range(info.num_irqs)}
            return info, regions, irqs

    info, regions, irqs = await in_thread(session)
    assert info.flags & vu.DeviceFlags.PCI and info.flags & vu.DeviceFlags.RESET
    assert info.num_regions >= vu.PciRegion.VGA
    config = regions[vu.PciRegion.CONFIG]
    # the config region is readable and writable (libvfio-user 0b28d205 left its flags 0)
    assert config.size == 256 and config.flags == vu.RegionFlags.READ | vu.RegionFlags.WRITE
    bar0 = regions[vu.PciRegion.BAR0]
    assert bar0.size == 4096 and not bar0.flags & vu.RegionFlags.MMAP
    assert regions[vu.PciRegion.BAR1].size == 0
    assert irqs[vu.PciIrq.INTX].count == 1 and irqs[vu.PciIrq.MSIX].count == 2
    assert irqs[vu.PciIrq.MSIX].flags & vu.IrqInfoFlags.EVENTFD


async def test_region_access_and_out_of_range_is_einval(serve: Any) -> None:
    function = ScratchFunction()
    context = await serve(function)

    def session() -> bytes:
        with Client(context.socket_path) as client:
            client.write(vu.PciRegion.BAR0, 0x10, b"\x01\x02\x03\x04")
            for region, offset, count in [(vu.PciRegion.BAR0, 4094, 4),
                                          (vu.PciRegion.BAR0, 1 << 40, 4),
                                          (vu.PciRegion.BAR1, 0, 4),
                                          (vu.PciRegion.CONFIG, 254, 4),
                                          (42, 0, 4)]:
                with pytest.raises(VfioUserError) as raised:
                    client.read(region, offset, count)
                assert raised.value.errno == errno.EINVAL, (region, offset)
            return client.read(vu.PciRegion.BAR0, 0x10, 4)

    assert await in_thread(session) == b"\x01\x02\x03\x04"
    assert function.bar0.data[0x10:0x14] == b"\x01\x02\x03\x04"


async def test_guest_error_from_a_model_is_answered_with_its_errno(serve: Any) -> None:
    function = ScratchFunction()
    context = await serve(function)

    def session() -> int | None:
        with Client(context.socket_path) as client:
            # a config write past the end is refused by our model with EINVAL
            with pytest.raises(VfioUserError) as raised:
                client.write(vu.PciRegion.CONFIG, 255, b"\x00\x00")
            return raised.value.errno

    assert await in_thread(session) == errno.EINVAL


async def test_bug_in_a_model_gives_eio_and_the_server_goes_on(
        serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    function = ScratchFunction()

    def broken_read(offset: int, size: int) -> bytes:
        raise ZeroDivisionError("model bug")

    function.bar0.read = broken_read  # type: ignore[method-assign]
    context = await serve(function)

    def session() -> bytes:
        with Client(context.socket_path) as client:
            with pytest.raises(VfioUserError) as raised:
                client.read(vu.PciRegion.BAR0, 0, 4)
            assert raised.value.errno == errno.EIO
            return client.read(vu.PciRegion.CONFIG, 0, 2)

    assert await in_thread(session) == b"\xf4\x1a"
    assert any("model bug" in r.getMessage() or (r.exc_info and "model bug" in str(r.exc_info[1]))
               for r in caplog.records)


class CallbackBug(ZeroDivisionError):
    """What a bug in a model raises inside a libvfio-user callback."""


class BuggyFunction(ScratchFunction):
    """A function whose ``broken`` step raises a bug (from inside the C callback)."""

    def __init__(self, broken: str) -> None:
        super().__init__(f"buggy-{broken}")
        self.broken = broken

    def quiesce(self, done: Any) -> bool:
        if self.broken == "quiesce":
            raise CallbackBug("quiesce bug")
        return True

    def reset(self, kind: ResetKind) -> None:
        if self.broken == "reset":
            raise CallbackBug("reset bug")
        super().reset(kind)


def bar0_write(client: Client) -> None:
    client.write(vu.PciRegion.BAR0, 0, b"\x01")


@pytest.mark.parametrize(("broken", "request_"), [
    pytest.param("region write", bar0_write, id="region-write"),
    pytest.param("reset", Client.reset, id="reset"),
    pytest.param("quiesce", Client.reset, id="quiesce"),  # libvfio-user quiesces first
])
async def test_bug_in_any_callback_gives_the_client_eio_and_is_logged(
        serve: Any, caplog: pytest.LogCaptureFixture, broken: str, request_: Any) -> None:
    function = BuggyFunction(broken)

    def broken_write(offset: int, data: bytes) -> None:
        raise CallbackBug("region write bug")

    if broken == "region write":
        function.bar0.write = broken_write  # type: ignore[method-assign]
    context = await serve(function)

    def session() -> int | None:
        with Client(context.socket_path) as client:
            with pytest.raises(VfioUserError) as raised:
                request_(client)
            return raised.value.errno

    assert await in_thread(session) == errno.EIO
    bugs = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], CallbackBug)]
    assert bugs and bugs[0].levelname == "ERROR"
    assert f"{broken} bug" in str(bugs[0].exc_info[1])  # type: ignore[index]


class Interrupted(BaseException):
    """Not an Exception: must not be swallowed as a logged bug."""


async def test_base_exception_in_a_callback_is_raised_once_c_has_returned(
        tmp_path: Path) -> None:
    function = ScratchFunction()

    def interrupted_read(offset: int, size: int) -> bytes:
        raise Interrupted

    function.bar0.read = interrupted_read  # type: ignore[method-assign]

    def session(path: str) -> int | None:
        with Client(path) as client, pytest.raises(VfioUserError) as raised:
            client.read(vu.PciRegion.BAR0, 0, 4)
        return raised.value.errno

    errnos: list[int | None] = []
    with VfuContext(str(tmp_path / "i.sock"), function) as context, \
            pytest.raises(BaseExceptionGroup) as raised, trio.fail_after(ATTACH_TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_device, context)
            errnos.append(await in_thread(session, context.socket_path))
            await trio.sleep_forever()  # until serve_device re-raises it
    assert raised.group_contains(Interrupted)
    assert errnos == [errno.EIO]


def test_attach_raises_oserror_and_serve_client_returns_when_the_client_leaves(
        tmp_path: Path) -> None:
    with VfuContext(str(tmp_path / "e.sock"), ScratchFunction()) as context:
        with pytest.raises(BlockingIOError):  # EAGAIN: nobody is connecting
            context.attach()
        served: list[ServeResult] = []
        with Client(context.socket_path, negotiate=False) as client:
            caps = {"max_msg_fds": 16, "max_data_xfer_size": vu.MAX_DATA_XFER_SIZE}
            version = client.send(vu.Command.VERSION, vu.build_version(0, 0, caps))
            context.attach()  # the VERSION message is already queued
            client.receive(version, vu.Command.VERSION)
            thread = threading.Thread(target=lambda: served.append(context.serve_client()))
            thread.start()
            read = client.send(vu.Command.REGION_READ,
                               vu.REGION_ACCESS.pack(0, vu.PciRegion.CONFIG, 2))
            reply = client.receive(read, vu.Command.REGION_READ)
            assert reply[vu.REGION_ACCESS.size:] == b"\xf4\x1a"
        thread.join(10)  # the client hung up: libvfio-user reset the device, detached
        assert served == [ServeResult.DETACHED] and context.drop_reason is DropReason.NONE


async def test_disconnect_then_second_client(serve: Any) -> None:
    function = ScratchFunction()
    context = await serve(function)

    def session(value: bytes) -> bytes:
        with Client(context.socket_path) as client:
            before = client.read(vu.PciRegion.BAR0, 0, 4)
            client.write(vu.PciRegion.BAR0, 0, value)
            return before

    await in_thread(session, b"abcd")
    await trio.sleep(0.05)
    assert await in_thread(session, b"efgh") == b"abcd"
    assert ResetKind.LOST_CONNECTION in function.resets


async def test_device_reset_reaches_the_function(serve: Any) -> None:
    function = ScratchFunction()
    context = await serve(function)

    def session() -> None:
        with Client(context.socket_path) as client:
            client.reset()

    await in_thread(session)
    assert function.resets[0] is ResetKind.DEVICE


async def test_silent_client_does_not_stall_another_device(serve: Any) -> None:
    first = await serve(ScratchFunction("first"), "first")
    second = await serve(ScratchFunction("second"), "second")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(first.socket_path)  # connects, never sends VERSION
    try:
        await trio.sleep(0.1)  # the first device is now inside its handshake

        def busy_session() -> float:
            started = time.monotonic()
            with Client(second.socket_path) as client:
                for _ in range(200):
                    client.read(vu.PciRegion.BAR0, 0, 4)
            return time.monotonic() - started

        elapsed = await in_thread(busy_session)
        # served while the silent handshake is still pending, not after it timed out
        assert elapsed < ATTACH_TIMEOUT
    finally:
        silent.close()

    def first_session() -> bytes:
        with Client(first.socket_path) as client:
            return client.read(vu.PciRegion.CONFIG, 0, 2)

    assert await in_thread(first_session) == b"\xf4\x1a"


async def test_half_sent_message_does_not_stall_and_stream_stays_in_sync(serve: Any) -> None:
    first = await serve(ScratchFunction("first"), "first")
    second = await serve(ScratchFunction("second"), "second")
    first_client = await in_thread(Client, first.socket_path)
    try:
        msg = vu.HEADER.pack(77, vu.Command.REGION_READ, 32, 0, 0) + vu.REGION_ACCESS.pack(
            0, vu.PciRegion.CONFIG, 4)
        first_client.sock.sendall(msg[:20])  # header and part of the body, then a pause

        def other() -> bytes:
            with Client(second.socket_path) as client:
                return client.read(vu.PciRegion.CONFIG, 0, 2)

        with trio.fail_after(ATTACH_TIMEOUT):
            assert await in_thread(other) == b"\xf4\x1a"
        first_client.sock.sendall(msg[20:])
        reply = await in_thread(first_client.receive, 77, vu.Command.REGION_READ)
        assert reply[16:20] == bytes.fromhex("f41aff10")
        assert await in_thread(first_client.read, vu.PciRegion.CONFIG, 2, 2) == b"\xff\x10"
    finally:
        first_client.close()


async def test_socket_file_is_private_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "p.sock"
    with VfuContext(str(path), ScratchFunction()) as context:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert context.socket_path == str(path)
    assert not path.exists()


def test_close_leaves_a_socket_file_that_is_no_longer_ours(tmp_path: Path) -> None:
    path = tmp_path / "taken.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        with VfuContext(str(path), ScratchFunction()):
            # an operator removed our file and another server now serves on the path
            path.unlink()
            other.bind(str(path))
            other.listen(1)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a killed server leaves
    with VfuContext(str(path), ScratchFunction()):
        assert path.exists()


def test_live_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with VfuContext(str(path), ScratchFunction()):
        with pytest.raises(FileExistsError, match="held by a running server"):
            VfuContext(str(path), ScratchFunction())
        assert path.exists()


def test_regular_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "file.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        VfuContext(str(path), ScratchFunction())
    assert path.read_text() == "precious"


class SlowQuiesceFunction(ScratchFunction):
    """A function with work in flight: each quiesce is deferred until
    :meth:`finish_quiesce` (the test) or :meth:`finish_quiesces` (0.2 s later) ends it."""

    def __init__(self, name: str = "slow") -> None:
        super().__init__(name)
        self.pending: list[Any] = []

    def quiesce(self, done: Any) -> bool:
        self.pending.append(done)
        return False

    async def quiesce_requested(self) -> None:
        """Until a quiesce request is held (quiesce runs on the serving thread: polled)."""
        while not self.pending:
            await trio.sleep(0.01)

    def finish_quiesce(self) -> None:
        """The work in flight ends: the last held request goes on."""
        self.pending.pop()()

    async def finish_quiesces(self) -> None:
        """The work in flight ends 0.2 s after each request (a task for a nursery)."""
        while True:
            await self.quiesce_requested()
            await trio.sleep(0.2)
            self.finish_quiesce()


async def test_deferred_quiesce_holds_the_request_not_the_loop(serve: Any) -> None:
    slow = SlowQuiesceFunction()
    context = await serve(slow, "slow")
    other = await serve(ScratchFunction("other"), "other")
    reset_returned = threading.Event()

    def reset_session() -> bytes:
        with Client(context.socket_path, timeout=60) as client:
            client.reset()  # libvfio-user quiesces the device before a reset
            reset_returned.set()
            return client.read(vu.PciRegion.BAR0, 0, 4)

    def other_session() -> bytes:
        with Client(other.socket_path) as client:
            return client.read(vu.PciRegion.CONFIG, 0, 2)

    async with trio.open_nursery() as inner:
        results: dict[str, bytes] = {}

        async def run_reset() -> None:
            results["reset"] = await in_thread(reset_session)

        inner.start_soon(run_reset)
        with trio.fail_after(10):
            await slow.quiesce_requested()
            # while the function holds the request, the other device is served ...
            assert await in_thread(other_session) == b"\xf4\x1a"
        assert not reset_returned.is_set()  # ... and the reset waits for the function
        assert slow.resets == []
        slow.finish_quiesce()
    assert results["reset"] == bytes(4)
    assert slow.resets == [ResetKind.DEVICE]


@pytest.mark.parametrize("flags, size", [
    pytest.param(vu.HeaderFlags.REPLY, 32, id="reply-type"),
    pytest.param(0xC | vu.HeaderFlags.NO_REPLY, 32, id="reserved-type"),
    pytest.param(0, 8, id="size-below-header"),
    pytest.param(0, vu.MAX_DATA_XFER_SIZE + 64, id="size-beyond-any-request"),
])
async def test_header_libvfio_user_rejects_drops_the_client_not_the_stream(
        serve: Any, flags: int, size: int) -> None:
    """libvfio-user refuses such a header without reading the body behind it
    (get_request_header, is_valid_header): the body would be parsed as the next messages.
    Found by the vfio-user fuzz target (tests/fuzz/live_context.py)."""
    context = await serve(ScratchFunction("first"), "first")
    # the body is itself a well-formed message: a command register write
    inner = vu.HEADER.pack(9, vu.Command.REGION_WRITE, 34, 0, 0) + vu.REGION_ACCESS.pack(
        4, vu.PciRegion.CONFIG, 2) + b"\x07\x00"

    def bad_session() -> bytes:
        with Client(context.socket_path) as client:
            client.sock.sendall(vu.HEADER.pack(5, vu.Command.REGION_READ, size, flags, 0)
                                + inner)
            return client.sock.recv(64)

    assert await in_thread(bad_session) == b""  # dropped: no reply, no message from the body

    def next_session() -> bytes:
        with Client(context.socket_path) as client:
            return client.read(vu.PciRegion.CONFIG, 4, 2)

    assert await in_thread(next_session) == b"\x00\x00"  # the command write never happened
