"""The serving thread's own answers to fast-path region accesses are libvfio-user's, byte
for byte.

vfuserver/csrc/serve.c ``vfuserver_direct`` reads a whole REGION_READ or REGION_WRITE the
fast path takes and sends the reply itself, without vfu_run_ctx. The same script of raw
messages goes over a real socket to a transitional virtio-net served by the real serving
loop twice: with those direct answers, and with every message handed to libvfio-user (whose
region callback runs the same fast path). The replies (every byte), what happened to file
descriptors sent along, the device state and the counters afterwards must be equal, and
the direct path must have answered exactly the messages it is meant to.

The script has every fast register of the legacy BAR (under a running legacy driver) and of
the modern BAR (under a running modern driver), and the near misses: another width or
offset, a msg_size one byte off either way, count 0, No_reply, flags and error_no that are
not a plain command's, file descriptors attached, two messages in one send, one message in
two sends, IO decode off. After each step a config-space read fences the replies. Then
the ways a reply can fail (a client that does not read, one that shut its receiving
side) and a request libvfio-user holds for a deferred quiesce.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.devices.legacy_driver import Rig
from tests.server.conftest import attached_session
from tests.server.test_fast_path import legacy_running, modern_running, state
from vfuserver.client import Client
from vfuserver.context import DropReason, ServeResult, VfuContext
from vfuserver.devices.virtio_pci import MODERN_BAR, Layout
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.virtio_legacy import Register
from vfuserver.protocol.virtio_pci import CommonCfgRegister as Common

READ, WRITE = vu.Command.REGION_READ, vu.Command.REGION_WRITE
NO_REPLY = vu.HeaderFlags.NO_REPLY
LEGACY = vu.PciRegion.BAR0
MODERN = vu.PciRegion.BAR0 + MODERN_BAR
CONFIG = vu.PciRegion.CONFIG
FENCE_ID = 0xF000


def message(msg_id: int, command: int, region: int, offset: int, count: int,
            data: bytes = b"", *, flags: int = 0, error_no: int = 0, size_delta: int = 0,
            ) -> bytes:
    """A raw region access whose header's msg_size is off by ``size_delta`` (and the bytes
    sent with it: a message one byte longer carries a zero more, a shorter one loses its
    last byte), so the stream stays in step."""
    body = vu.REGION_ACCESS.pack(offset, region, count) + data
    body = body + bytes(size_delta) if size_delta >= 0 else body[:size_delta]
    return vu.HEADER.pack(msg_id, command, vu.HEADER.size + len(body), flags,
                          error_no) + body


def read(msg_id: int, region: int, offset: int, count: int, **kw: Any) -> bytes:
    return message(msg_id, READ, region, offset, count, **kw)


def write(msg_id: int, region: int, offset: int, value: int, width: int, **kw: Any) -> bytes:
    return message(msg_id, WRITE, region, offset, width, value.to_bytes(width, "little"), **kw)


@dataclass
class Step:
    """Bytes to send (one send per chunk), whether a pipe's write end rides along with
    the first chunk, and how many of its messages the direct path answers."""

    name: str
    chunks: list[bytes]
    direct: int
    with_fd: bool = False
    results: list[Any] = field(default_factory=list)


def legacy_script() -> list[Step]:
    status, isr, notify = Register.STATUS, Register.ISR, Register.QUEUE_NOTIFY
    command = pcifmt.Offset.COMMAND
    io_on = pcifmt.Command.IO | pcifmt.Command.MASTER
    return [
        Step("status read", [read(1, LEGACY, status, 1)], 1),
        Step("isr read (pending bit)", [read(2, LEGACY, isr, 1)], 1),
        Step("isr read (cleared)", [read(3, LEGACY, isr, 1)], 1),
        Step("notify tx", [write(4, LEGACY, notify, 1, 2)], 1),
        Step("notify rx", [write(5, LEGACY, notify, 0, 2)], 1),
        Step("notify of no queue", [write(6, LEGACY, notify, 70, 2)], 0),
        Step("posted notify", [write(7, LEGACY, notify, 1, 2, flags=NO_REPLY)], 1),
        Step("posted isr read", [read(8, LEGACY, isr, 1, flags=NO_REPLY)], 1),
        Step("status read, width 2", [read(9, LEGACY, status, 2)], 0),
        # the running status written again, and a byte inside QUEUE_NOTIFY (all ones):
        # the register image answers both (test_fast_path)
        Step("status write", [write(10, LEGACY, status, 7, 1)], 1),
        Step("read next to status", [read(11, LEGACY, status - 1, 1)], 1),
        Step("status read, msg_size + 1", [read(12, LEGACY, status, 1, size_delta=1)], 0),
        Step("status read, msg_size - 1", [read(13, LEGACY, status, 1, size_delta=-1)], 0),
        Step("notify, msg_size + 1", [write(14, LEGACY, notify, 1, 2, size_delta=1)], 0),
        Step("notify, msg_size - 1", [write(15, LEGACY, notify, 1, 2, size_delta=-1)], 0),
        Step("status read, count 0", [read(16, LEGACY, status, 0)], 0),
        Step("status read, error flag", [read(17, LEGACY, status, 1,
                                              flags=vu.HeaderFlags.ERROR)], 0),
        Step("status read, reserved flag", [read(18, LEGACY, status, 1, flags=0x40)], 0),
        Step("status read, error_no", [read(19, LEGACY, status, 1, error_no=5)], 0),
        Step("status read, offset + 4 GiB", [read(20, LEGACY, status + (1 << 32), 1)], 0),
        Step("status read, fd attached", [read(21, LEGACY, status, 1)], 1, with_fd=True),
        Step("notify, fd attached", [write(22, LEGACY, notify, 1, 2)], 1, with_fd=True),
        Step("config read, fd attached", [read(23, CONFIG, 0, 2)], 0, with_fd=True),
        Step("two in one send", [read(24, LEGACY, isr, 1) + read(25, LEGACY, status, 1)], 2),
        Step("one in two sends (header cut)", list(_split(read(26, LEGACY, status, 1), 10)),
             1),
        Step("one in two sends (body cut)", list(_split(write(27, LEGACY, notify, 1, 2), 20)),
             1),
        Step("msg_id 0xffff", [read(0xFFFF, LEGACY, status, 1)], 1),
        Step("io decode off", [write(28, CONFIG, command, 0, 2)], 0),
        Step("status read, io off", [read(29, LEGACY, status, 1)], 0),
        Step("notify, io off", [write(30, LEGACY, notify, 1, 2)], 0),
        Step("io decode on", [write(31, CONFIG, command, io_on, 2)], 0),
        Step("status read, io on", [read(32, LEGACY, status, 1)], 1),
    ]


def modern_script() -> list[Step]:
    notify0 = Layout.NOTIFY
    return [
        Step("isr read", [read(1, MODERN, Layout.ISR, 1)], 1),
        Step("isr read again", [read(2, MODERN, Layout.ISR, 1)], 1),
        Step("device_status read", [read(3, MODERN, Common.DEVICE_STATUS, 1)], 1),
        Step("notify tx", [write(4, MODERN, notify0 + 4, 1, 2)], 1),
        Step("posted notify rx", [write(5, MODERN, notify0, 0, 2, flags=NO_REPLY)], 1),
        Step("device_status read, width 4", [read(6, MODERN, Common.DEVICE_STATUS, 4)], 0),
        Step("notify, width 4", [write(7, MODERN, notify0 + 4, 1, 4)], 0),
        Step("isr read, msg_size + 1", [read(8, MODERN, Layout.ISR, 1, size_delta=1)], 0),
        Step("legacy status read", [read(9, LEGACY, Register.STATUS, 1)], 0),
        Step("two in one send", [read(10, MODERN, Layout.ISR, 1)
                                 + write(11, MODERN, notify0 + 4, 1, 2)], 2),
    ]


def _split(data: bytes, at: int) -> tuple[bytes, bytes]:
    return data[:at], data[at:]


def _receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def replies_until_fence(sock: socket.socket, fence: int) -> list[bytes]:
    """Every reply (raw bytes) up to and including the fence's."""
    replies = []
    while True:
        header = _receive(sock, vu.HEADER.size)
        msg_id, _, size, _, _ = vu.HEADER.unpack(header)
        replies.append(header + _receive(sock, size - vu.HEADER.size))
        if msg_id == fence:
            return replies


@contextmanager
def served_rig(tmp_path: Path, prepare: Callable[[Rig], None], direct: bool, *,
               reply_timeout_ms: int | None = None,
               ) -> Iterator[tuple[Rig, VfuContext, Client, threading.Thread, list[object]]]:
    """A transitional virtio-net brought to a state through the model, then served by the
    serving loop (direct answers on or off) to an attached client; the serving thread is
    joined on the way out."""
    rig = Rig()
    prepare(rig)
    with VfuContext(str(tmp_path / f"d{int(direct)}.sock"), rig.fn) as context:
        context.native.dev.direct_enabled = direct
        if reply_timeout_ms is not None:  # the serving loop applies it as it starts
            context.native.dev.reply_timeout_ms = reply_timeout_ms
        client, thread, results = attached_session(context)
        try:
            yield rig, context, client, thread, results
        finally:
            client.close()
            thread.join(10)


def run_script(tmp_path: Path, prepare: Callable[[Rig], None], script: list[Step],
               direct: bool) -> tuple[list[Any], dict[str, Any], dict[str, int]]:
    """The replies and fd fates of each step, the device state, and the counters."""
    with served_rig(tmp_path, prepare, direct) as (rig, context, client, thread, _):
        transcript = []
        for index, step in enumerate(script):
            fate = None
            for number, chunk in enumerate(step.chunks):
                if number:
                    time.sleep(0.05)  # the server sees part of the message first
                if step.with_fd and number == 0:
                    readable, writable = os.pipe()
                    client.sock.sendmsg([chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [writable]))])
                    os.close(writable)
                else:
                    client.sock.sendall(chunk)
            fence = FENCE_ID + index
            client.sock.sendall(read(fence, CONFIG, 0, 2))
            replies = replies_until_fence(client.sock, fence)
            if step.with_fd:
                os.set_blocking(readable, False)
                try:
                    fate = "closed" if os.read(readable, 1) == b"" else "data"
                except BlockingIOError:
                    fate = "still open"
                os.close(readable)
            transcript.append((step.name, replies, fate))
        kicks = context.native.take_kicks()
        with context.lock:
            for queue in kicks:
                rig.fn.kick(queue)
        after = {**state(rig), "kicks": kicks, "function": rig.fn.counters()}
        client.close()
        thread.join(10)
        # once the thread is done: it counts a message after vfu_run_ctx has replied
        counters = context.native.counters()
    return transcript, after, counters


SCRIPTS = [
    pytest.param(legacy_running, legacy_script, id="legacy"),
    pytest.param(modern_running, modern_script, id="modern"),
]


@pytest.mark.parametrize(("prepare", "script"), SCRIPTS)
def test_direct_replies_are_libvfio_users(tmp_path: Path, prepare: Callable[[Rig], None],
                                           script: Callable[[], list[Step]]) -> None:
    steps = script()
    direct = run_script(tmp_path, prepare, steps, direct=True)
    through_libvfio_user = run_script(tmp_path, prepare, steps, direct=False)
    for got, want in zip(direct[0], through_libvfio_user[0], strict=True):
        assert got == want, f"step {got[0]!r}"
    assert direct[1] == through_libvfio_user[1]
    fast = {k: v for k, v in direct[2].items() if k.startswith("fast:") or k == "messages"}
    assert fast == {k: through_libvfio_user[2][k] for k in fast}
    # the direct path answered exactly what it is meant to, the other run nothing
    assert direct[2]["direct"] == sum(step.direct for step in steps)
    assert through_libvfio_user[2]["direct"] == 0
    fates = [fate for _, _, fate in direct[0] if fate is not None]
    assert fates == ["closed"] * sum(step.with_fd for step in steps)  # none leaks


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "libvfio-user"])
def test_a_client_that_does_not_read_its_replies_is_dropped(tmp_path: Path,
                                                             direct: bool) -> None:
    """Fast-path reads that are never read back: once a reply waits reply_timeout_ms,
    the client is dropped (REPLY_TIMEOUT), however the replies were sent."""
    with served_rig(tmp_path, legacy_running, direct, reply_timeout_ms=100) as (
            _, context, client, thread, results):
        flood = b"".join(read(n, LEGACY, Register.STATUS, 1) for n in range(4096))

        def send() -> None:
            with contextlib.suppress(OSError):  # dropped: the connection is shut down
                client.sock.sendall(flood * 64)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        thread.join(20)
        assert not thread.is_alive(), "never dropped"
        assert results == [ServeResult.DETACHED]
        assert context.drop_reason is DropReason.REPLY_TIMEOUT
        assert (context.native.dev.direct > 0) == direct


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "libvfio-user"])
def test_a_reply_to_a_closed_peer_detaches_it(tmp_path: Path, direct: bool) -> None:
    """A client that shut its receiving side: the first reply fails (EPIPE), and the
    client is gone as libvfio-user lets it go (tran_sock_send_iovec, do_reply: reset,
    detach), not dropped as a misbehaving one; what it queued after is not served."""
    with served_rig(tmp_path, legacy_running, direct) as (_, context, client, thread,
                                                          results):
        client.sock.shutdown(socket.SHUT_RD)
        client.sock.sendall(read(1, LEGACY, Register.ISR, 1) + read(2, LEGACY, Register.ISR, 1))
        thread.join(10)
        assert not thread.is_alive(), "still serving a client that cannot read"
        assert results == [ServeResult.DETACHED]
        assert context.drop_reason is DropReason.NONE
        assert context.native.counters()["fast:legacy-isr-read"] == 1
        assert context.native.dev.direct == int(direct)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "libvfio-user"])
def test_nothing_is_answered_before_a_held_request(tmp_path: Path, ram_fd: int,
                                                    direct: bool) -> None:
    """A DMA map waits for a deferred quiesce (libvfio-user holds it, vfu_run_ctx answers
    EBUSY) and serving is stopped meanwhile; served again, a fast-path read behind it is
    answered after the map, as libvfio-user orders them, not before."""
    with served_rig(tmp_path, legacy_running, direct) as (rig, context, client, thread,
                                                          results):
        quiesces: list[Callable[[], None]] = []

        def defer(done: Callable[[], None]) -> bool:
            quiesces.append(done)
            return False  # quiet later: libvfio-user holds the request

        rig.fn.quiesce = defer  # type: ignore[attr-defined]
        flags = vu.DmaFlags.READ | vu.DmaFlags.WRITE
        dma_map = client.send(vu.Command.DMA_MAP, vu.DmaMap.build({
            "argsz": vu.DmaMap.sizeof(), "flags": flags, "offset": 0, "address": 0,
            "size": 1 << 20}), fds=(ram_fd,))
        deadline = time.monotonic() + 10
        while not quiesces and time.monotonic() < deadline:
            time.sleep(0.01)
        assert quiesces, "the map was not held for a quiesce"
        context.stop_serving()
        thread.join(10)
        assert results == [ServeResult.STOPPED]
        context.rearm()
        again = threading.Thread(target=lambda: results.append(context.serve_client()))
        again.start()
        try:
            client.sock.sendall(read(1, LEGACY, Register.STATUS, 1))
            time.sleep(0.2)  # time enough for an answer out of order
            quiesces[0]()
            first = vu.HEADER.unpack(_receive(client.sock, vu.HEADER.size))
            _receive(client.sock, first[2] - vu.HEADER.size)
            second = vu.HEADER.unpack(_receive(client.sock, vu.HEADER.size))
        finally:
            rig.fn.quiesce = lambda done: True  # type: ignore[attr-defined]
            for done in quiesces[1:]:
                done()
            client.close()
            again.join(10)
        assert (first[0], second[0]) == (dma_map, 1)
