"""The --netdev backends against real sockets, and a real tap inside a network namespace.

The peers are test code speaking QEMU's wire formats: ``-netdev stream`` puts a 4-byte
big-endian length in front of every frame (net/stream_data.c), ``-netdev dgram`` sends one
frame per datagram (net/dgram.c).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from vfuserver.netdev.backend import NetBackend, NetOffloads
from vfuserver.netdev.errors import NetdevError, NetdevHostError, NetdevSyntaxError
from vfuserver.netdev.open import open_netdev
from vfuserver.netdev.options import (
    NETDEV_HELP,
    DgramSpec,
    InetAddress,
    NoneSpec,
    StreamSpec,
    TapSpec,
    UnixAddress,
    parse_netdev,
)
from vfuserver.netdev.sockets import DgramBackend, StreamBackend
from vfuserver.netdev.tap import TapBackend, TunOffload, tun_offload
from vfuserver.protocol.virtio_net import NetFeature

LENGTH = struct.Struct(">I")
TIMEOUT = 5


def frame(seq: int, size: int = 60) -> bytes:
    """A broadcast Ethernet frame (local experimental ethertype) carrying ``seq``."""
    return (b"\xff" * 6 + bytes.fromhex("525400123456") + b"\x88\xb5"
            + struct.pack(">I", seq)).ljust(size, b"\0")


def seq_of(data: bytes) -> int:
    value: int = struct.unpack_from(">I", data, 14)[0]
    return value


class Guest:
    """The device model's side of deliver(): keeps frames, or refuses them (no buffers)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.accepting = True
        self.refusals = 0
        self._changed = trio.Event()

    def deliver(self, data: bytes) -> bool:
        if not self.accepting:
            self.refusals += 1
        else:
            self.frames.append(data)
        self._changed.set()
        return self.accepting

    async def wait_until(self, frames: int = 0, refusals: int = 0) -> list[bytes]:
        with trio.fail_after(TIMEOUT):
            while len(self.frames) < frames or self.refusals < refusals:
                self._changed = trio.Event()
                await self._changed.wait()
        return self.frames


class QemuStreamPeer:
    """The other end of a stream netdev, framing as QEMU's net_stream_data_receive()."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send_frame(self, data: bytes) -> None:
        await self.stream.send_all(LENGTH.pack(len(data)) + data)

    async def receive_frame(self) -> bytes:
        with trio.fail_after(TIMEOUT):
            while True:
                if len(self.buffer) >= LENGTH.size:
                    (length,) = LENGTH.unpack_from(self.buffer)
                    if len(self.buffer) >= LENGTH.size + length:
                        data = bytes(self.buffer[LENGTH.size : LENGTH.size + length])
                        del self.buffer[: LENGTH.size + length]
                        return data
                chunk = await self.stream.receive_some()
                if not chunk:
                    raise EOFError("the backend closed the stream")
                self.buffer += chunk


@asynccontextmanager
async def running(backend: NetBackend, guest: Guest) -> AsyncIterator[NetBackend]:
    """backend.run() in a nursery for the block; then cancelled and the backend closed."""
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run, guest.deliver)
        yield backend
        nursery.cancel_scope.cancel()
    backend.close()
    backend.close()  # idempotent


async def connect_unix(path: str | Path) -> QemuStreamPeer:
    return QemuStreamPeer(await trio.open_unix_socket(str(path)))


async def connect_tcp(address: Any) -> QemuStreamPeer:
    return QemuStreamPeer(await trio.open_tcp_stream(address[0], address[1]))


async def stream_listener(family: int, address: Any) -> trio.socket.SocketType:
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    await listener.bind(address)
    listener.listen()
    return listener


async def accept(listener: trio.socket.SocketType) -> QemuStreamPeer:
    with trio.fail_after(TIMEOUT):
        conn, _ = await listener.accept()
    return QemuStreamPeer(trio.SocketStream(conn))


# --- parsing -------------------------------------------------------------------------------

VALID = [
    pytest.param("none", NoneSpec(), id="none"),
    pytest.param("tap,ifname=tap0", TapSpec("tap0", vnet_hdr=True), id="tap"),
    pytest.param("tap", TapSpec("", vnet_hdr=True), id="tap-kernel-named"),
    pytest.param("tap,id=n0,ifname=vfu0,vnet_hdr=off,script=no,downscript=no",
                 TapSpec("vfu0", vnet_hdr=False), id="tap-qemu-options"),
    pytest.param("stream,server=on,addr.type=unix,addr.path=/run/vfu/net0.sock",
                 StreamSpec(UnixAddress("/run/vfu/net0.sock"), server=True), id="stream-unix"),
    pytest.param("stream,id=s0,server=off,addr.type=inet,addr.host=127.0.0.1,addr.port=5555,"
                 "reconnect=2",
                 StreamSpec(InetAddress("127.0.0.1", 5555), server=False, reconnect_ms=2000),
                 id="stream-inet-reconnect"),
    pytest.param("stream,addr.type=unix,addr.path=/tmp/a,,b,reconnect-ms=50",
                 StreamSpec(UnixAddress("/tmp/a,b"), reconnect_ms=50), id="stream-comma-path"),
    pytest.param("type=stream,server=yes,addr.type=inet,addr.host=::1,addr.port=0",
                 StreamSpec(InetAddress("::1", 0), server=True), id="stream-type-key"),
    pytest.param("dgram,local.type=inet,local.host=127.0.0.1,local.port=1234,"
                 "remote.type=inet,remote.host=127.0.0.1,remote.port=1235",
                 DgramSpec(InetAddress("127.0.0.1", 1234), InetAddress("127.0.0.1", 1235)),
                 id="dgram-inet"),
    pytest.param("dgram,id=d,local.type=unix,local.path=/tmp/l,remote.type=unix,"
                 "remote.path=/tmp/r",
                 DgramSpec(UnixAddress("/tmp/l"), UnixAddress("/tmp/r")), id="dgram-unix"),
]


@pytest.mark.parametrize(("text", "spec"), VALID)
def test_parse(text: str, spec: object) -> None:
    assert parse_netdev(text) == spec
    assert parse_netdev(str(spec)) == spec  # the canonical form parses back


INVALID = [
    pytest.param("", "unknown backend ''", id="empty"),
    pytest.param("user,id=n0", "unknown backend 'user' (expected none, tap, stream or dgram)",
                 id="unknown-kind"),
    pytest.param("none,foo=bar", "unknown or unsupported option foo for none", id="none-key"),
    pytest.param("tap,queues=2", "unknown or unsupported option queues for tap", id="tap-key"),
    pytest.param("tap,ifname=a-very-long-ifname", "ifname=a-very-long-ifname: not a valid "
                 "interface name (at most 15 bytes", id="tap-long-name"),
    pytest.param("tap,ifname=a/b", "ifname=a/b: not a valid interface name", id="tap-slash"),
    pytest.param("tap,ifname=t0,vnet_hdr=maybe", "vnet_hdr=maybe: expected on or off",
                 id="tap-bool"),
    pytest.param("tap,ifname", "'ifname' is not key=value", id="not-key-value"),
    pytest.param("tap,ifname=a,ifname=b", "ifname= is given twice", id="twice"),
    pytest.param("tap,script=/etc/qemu-ifup", "script=/etc/qemu-ifup: scripts are not run",
                 id="tap-script"),
    pytest.param("stream,server=on", "addr.type= is required", id="stream-no-addr"),
    pytest.param("stream,addr.type=fd,addr.str=3", "addr.type=fd: expected unix or inet",
                 id="stream-fd"),
    pytest.param("stream,addr.type=unix,addr.path=", "addr.path= is empty", id="empty-path"),
    pytest.param("stream,addr.type=unix,addr.path=/" + "x" * 107,
                 "addr.path is too long for a unix socket (at most 107 bytes)", id="long-path"),
    pytest.param("stream,addr.type=inet,addr.host=h", "addr.port= is required", id="no-port"),
    pytest.param("stream,addr.type=inet,addr.host=h,addr.port=http",
                 "addr.port=http: expected an integer from 1 to 65535", id="port-name"),
    pytest.param("stream,addr.type=inet,addr.host=h,addr.port=0",
                 "addr.port=0: expected an integer from 1 to 65535", id="client-port-0"),
    pytest.param("stream,server=on,addr.type=inet,addr.host=h,addr.port=65536",
                 "addr.port=65536: expected an integer from 0 to 65535", id="port-range"),
    pytest.param("stream,server=on,addr.type=unix,addr.path=/x,reconnect=1",
                 "reconnect is incompatible with server=on", id="server-reconnect"),
    pytest.param("stream,addr.type=unix,addr.path=/x,reconnect=1,reconnect-ms=5",
                 "reconnect and reconnect-ms are mutually exclusive", id="two-reconnects"),
    pytest.param("stream,addr.type=unix,addr.path=/x,reconnect=-1",
                 "reconnect=-1: expected an integer", id="negative-reconnect"),
    pytest.param("stream,addr.type=unix,addr.path=/x,keep-alive=on",
                 "unknown or unsupported option keep-alive for stream", id="stream-key"),
    pytest.param("dgram,local.type=unix,local.path=/a", "remote.type= is required",
                 id="dgram-no-remote"),
    pytest.param("dgram,local.type=unix,local.path=/a,remote.type=inet,remote.host=h,"
                 "remote.port=1", "remote and local types must be the same", id="dgram-mixed"),
    pytest.param("dgram,local.type=inet,local.host=0.0.0.0,local.port=1,remote.type=inet,"
                 "remote.host=239.1.2.3,remote.port=1", "multicast dgram is not supported",
                 id="dgram-multicast"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(NetdevSyntaxError, match=re.escape(message)) as info:
        parse_netdev(text)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, NetdevError)
    text_of = str(info.value)
    assert text_of.startswith(f"--netdev {text!r}: ")
    kind = text.split(",")[0].removeprefix("type=")
    syntax = text_of.split("accepted syntax:\n", 1)[1]
    expected_kinds = [kind] if kind in ("none", "tap", "stream", "dgram") else [
        "none", "tap", "stream", "dgram"]
    for expected in expected_kinds:
        assert f"  {expected}" in syntax


def test_help_documents_every_kind() -> None:
    for piece in ("none", "tap,ifname=NAME[,vnet_hdr=on|off]", "stream,server=on|off",
                  "addr.type=unix,addr.path=PATH", "addr.type=inet,addr.host=HOST",
                  "reconnect=SECONDS", "dgram,local.type=unix", "remote.type=inet"):
        assert piece in NETDEV_HELP


# --- none ----------------------------------------------------------------------------------

async def test_none_drops_and_counts() -> None:
    backend = await open_netdev(parse_netdev("none"))
    guest = Guest()
    async with running(backend, guest):
        backend.send(frame(1))
        backend.send(bytearray(frame(2)))
        await trio.sleep(0.05)
    assert backend.stats.tx_dropped == 2
    assert backend.stats.tx_frames == backend.stats.rx_frames == 0
    assert guest.frames == []
    assert not backend.vnet_hdr


# --- stream --------------------------------------------------------------------------------

async def exchange(backend: NetBackend, guest: Guest, peer: QemuStreamPeer, base: int) -> None:
    """Three frames each way; the backend side sends bytes, bytearray and memoryview."""
    before = len(guest.frames)
    for seq in range(base, base + 3):
        await peer.send_frame(frame(seq))
    received = await guest.wait_until(frames=before + 3)
    assert [seq_of(data) for data in received[-3:]] == [base, base + 1, base + 2]
    assert received[-1] == frame(base + 2)
    backend.send(frame(base + 10))
    backend.send(bytearray(frame(base + 11, 1514)))
    backend.send(memoryview(frame(base + 12)))
    assert await peer.receive_frame() == frame(base + 10)
    assert await peer.receive_frame() == frame(base + 11, 1514)
    assert await peer.receive_frame() == frame(base + 12)


async def test_stream_server_unix(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    backend = await open_netdev(parse_netdev(f"stream,server=on,addr.type=unix,addr.path={path}"))
    assert not backend.vnet_hdr
    guest = Guest()
    async with running(backend, guest):
        peer = await connect_unix(path)
        await exchange(backend, guest, peer, 0)
        await peer.stream.aclose()
        # A new peer once the old one has left, as QEMU's listener does.
        peer = await connect_unix(path)
        await exchange(backend, guest, peer, 100)
        await peer.stream.aclose()
    assert backend.stats.rx_frames == 6
    assert backend.stats.rx_bytes == 6 * 60
    assert backend.stats.tx_frames == 6
    assert backend.stats.tx_bytes == 4 * 60 + 2 * 1514
    assert not path.exists()  # close() removed the socket it created


async def test_stream_server_inet() -> None:
    backend = await open_netdev(parse_netdev(
        "stream,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=0"))
    assert isinstance(backend, StreamBackend)
    guest = Guest()
    async with running(backend, guest):
        peer = await connect_tcp(backend.address)
        await exchange(backend, guest, peer, 0)
        await peer.stream.aclose()


async def test_stream_server_serves_one_peer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    backend = await open_netdev(parse_netdev(f"stream,server=on,addr.type=unix,addr.path={path}"))
    guest = Guest()
    async with running(backend, guest):
        first = await connect_unix(path)
        await exchange(backend, guest, first, 0)
        second = await connect_unix(path)  # waits in the listen backlog
        await second.send_frame(frame(50))
        backend.send(frame(51))
        assert await first.receive_frame() == frame(51)
        await trio.sleep(0.1)
        assert len(guest.frames) == 3  # frame 50 is not read while the first peer stays
        await first.stream.aclose()
        await guest.wait_until(frames=4)
        assert seq_of(guest.frames[3]) == 50
        backend.send(frame(52))
        assert await second.receive_frame() == frame(52)
        await second.stream.aclose()


async def test_stream_client_unix(tmp_path: Path) -> None:
    path = tmp_path / "qemu.sock"
    listener = await stream_listener(socket.AF_UNIX, str(path))
    backend = await open_netdev(parse_netdev(
        f"stream,server=off,addr.type=unix,addr.path={path}"))
    guest = Guest()
    async with running(backend, guest):
        peer = await accept(listener)
        await exchange(backend, guest, peer, 0)
        await peer.stream.aclose()
    listener.close()
    assert path.exists()  # the peer's socket is the peer's


async def test_stream_client_inet() -> None:
    listener = await stream_listener(socket.AF_INET, ("127.0.0.1", 0))
    port = listener.getsockname()[1]
    backend = await open_netdev(parse_netdev(
        f"stream,addr.type=inet,addr.host=127.0.0.1,addr.port={port}"))
    guest = Guest()
    async with running(backend, guest):
        peer = await accept(listener)
        await exchange(backend, guest, peer, 0)
        await peer.stream.aclose()
    listener.close()


async def test_stream_client_reconnects(tmp_path: Path) -> None:
    path = tmp_path / "qemu.sock"
    # reconnect-ms: the peer is not there yet, and opening must not fail.
    backend = await open_netdev(parse_netdev(
        f"stream,addr.type=unix,addr.path={path},reconnect-ms=20"))
    assert isinstance(backend, StreamBackend)
    guest = Guest()
    async with running(backend, guest):
        backend.send(frame(0))  # nobody connected: dropped and counted
        assert backend.stats.tx_dropped == 1
        await trio.sleep(0.1)  # a few failed attempts
        listener = await stream_listener(socket.AF_UNIX, str(path))
        peer = await accept(listener)
        await exchange(backend, guest, peer, 0)
        await peer.stream.aclose()
        peer = await accept(listener)  # the backend comes back after the peer left
        await exchange(backend, guest, peer, 100)
        await peer.stream.aclose()
        listener.close()


async def test_stream_oversized_length_drops_the_peer(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    backend = await open_netdev(parse_netdev(f"stream,server=on,addr.type=unix,addr.path={path}"))
    guest = Guest()
    async with running(backend, guest):
        peer = await connect_unix(path)
        await peer.stream.send_all(LENGTH.pack(1 << 20))
        with trio.fail_after(TIMEOUT):
            assert await peer.stream.receive_some() == b""  # hung up on, as QEMU does
        await peer.stream.aclose()
        assert backend.stats.rx_dropped == 1
        peer = await connect_unix(path)
        await exchange(backend, guest, peer, 0)
        await peer.stream.aclose()


# --- dgram ---------------------------------------------------------------------------------

async def dgram_exchange(backend: NetBackend, guest: Guest, peer: trio.socket.SocketType,
                         backend_address: Any) -> None:
    for seq in range(3):
        await peer.sendto(frame(seq), backend_address)
    received = await guest.wait_until(frames=3)
    assert [seq_of(data) for data in received] == [0, 1, 2]
    backend.send(frame(10))
    backend.send(bytearray(frame(11, 1514)))
    with trio.fail_after(TIMEOUT):
        assert await peer.recv(65536) == frame(10)
        assert await peer.recv(65536) == frame(11, 1514)
    assert backend.stats.tx_frames == 2
    assert backend.stats.rx_frames == 3


async def test_dgram_unix(tmp_path: Path) -> None:
    local, remote = tmp_path / "vfu.sock", tmp_path / "qemu.sock"
    peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await peer.bind(str(remote))
    backend = await open_netdev(parse_netdev(
        f"dgram,local.type=unix,local.path={local},remote.type=unix,remote.path={remote}"))
    guest = Guest()
    async with running(backend, guest):
        await dgram_exchange(backend, guest, peer, str(local))
    peer.close()
    assert not local.exists()


async def test_dgram_inet() -> None:
    peer = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await peer.bind(("127.0.0.1", 0))
    port = peer.getsockname()[1]
    backend = await open_netdev(parse_netdev(
        "dgram,local.type=inet,local.host=127.0.0.1,local.port=0,"
        f"remote.type=inet,remote.host=127.0.0.1,remote.port={port}"))
    assert isinstance(backend, DgramBackend)
    guest = Guest()
    async with running(backend, guest):
        await dgram_exchange(backend, guest, peer, backend.address)
    peer.close()


async def test_dgram_without_remote_drops_and_counts(tmp_path: Path) -> None:
    backend = await open_netdev(parse_netdev(
        f"dgram,local.type=unix,local.path={tmp_path}/vfu.sock,"
        f"remote.type=unix,remote.path={tmp_path}/nobody.sock"))
    async with running(backend, Guest()):
        backend.send(frame(1))
    assert backend.stats.tx_dropped == 1
    assert backend.stats.tx_frames == 0


# --- backpressure and bounds ---------------------------------------------------------------

async def test_stream_backpressure_keeps_the_pending_frame(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    backend = await open_netdev(parse_netdev(f"stream,server=on,addr.type=unix,addr.path={path}"))
    guest = Guest()
    async with running(backend, guest):
        peer = await connect_unix(path)
        await peer.send_frame(frame(0))
        await guest.wait_until(frames=1)
        guest.accepting = False  # the guest runs out of receive buffers
        for seq in range(1, 4):
            await peer.send_frame(frame(seq))
        await guest.wait_until(refusals=1)
        await trio.sleep(0.1)
        assert guest.refusals == 1  # waiting for wake_receiver(), not retrying in a loop
        guest.accepting = True
        backend.wake_receiver()
        await guest.wait_until(frames=4)
        await peer.stream.aclose()
    assert [seq_of(data) for data in guest.frames] == [0, 1, 2, 3]
    assert backend.stats.rx_dropped == 0


async def test_dgram_backpressure_keeps_the_pending_frame(tmp_path: Path) -> None:
    local, remote = tmp_path / "vfu.sock", tmp_path / "qemu.sock"
    peer = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await peer.bind(str(remote))
    backend = await open_netdev(parse_netdev(
        f"dgram,local.type=unix,local.path={local},remote.type=unix,remote.path={remote}"))
    guest = Guest()
    guest.accepting = False
    async with running(backend, guest):
        for seq in range(3):
            await peer.sendto(frame(seq), str(local))
        await guest.wait_until(refusals=1)
        backend.wake_receiver()  # still no buffers: refused once more, then waits again
        await guest.wait_until(refusals=2)
        guest.accepting = True
        backend.wake_receiver()
        await guest.wait_until(frames=3)
        assert guest.refusals == 2
    peer.close()
    assert [seq_of(data) for data in guest.frames] == [0, 1, 2]


async def test_tx_queue_is_bounded_when_the_peer_does_not_read(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    backend = await open_netdev(
        parse_netdev(f"stream,server=on,addr.type=unix,addr.path={path}"), tx_queue_limit=8)
    guest = Guest()
    sent = 2000
    async with running(backend, guest):
        peer = await connect_unix(path)
        await peer.send_frame(frame(0))
        await guest.wait_until(frames=1)  # the backend has accepted this peer
        for seq in range(sent):
            backend.send(frame(seq, 1514))  # never blocks
        stats = backend.stats
        assert stats.tx_dropped > 0
        assert 0 <= sent - stats.tx_frames - stats.tx_dropped <= 8  # the rest is queued
        expected = sent - stats.tx_dropped
        received = [await peer.receive_frame() for _ in range(expected)]
        assert stats.tx_frames == expected  # the queue was flushed once the peer read
        await peer.stream.aclose()
    seqs = [seq_of(data) for data in received]
    assert seqs == sorted(set(seqs))  # in order, none twice
    assert all(data == frame(seq, 1514) for data, seq in zip(received, seqs, strict=True))
    assert seqs[0] == 0


# --- open errors ---------------------------------------------------------------------------

async def test_stream_server_address_in_use_inet() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(NetdevHostError, match="already in use") as info:
            await open_netdev(parse_netdev(
                f"stream,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port={port}"))
    assert info.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port} is already in use" in str(info.value)
    assert "choose another addr.port" in str(info.value)


async def test_stream_server_unix_in_use_vs_stale(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    spec = parse_netdev(f"stream,server=on,addr.type=unix,addr.path={path}")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(NetdevHostError, match=r"choose another addr\.path") as info:
            await open_netdev(spec)
        assert info.value.errno == errno.EADDRINUSE
        assert path.exists()  # a live peer's socket is never removed
    # Closed without unlink: a stale socket file, which is taken over (QEMU removes it too).
    backend = await open_netdev(spec)
    guest = Guest()
    async with running(backend, guest):
        peer = await connect_unix(path)
        await exchange(backend, guest, peer, 0)
        await peer.stream.aclose()


async def test_stream_server_path_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "net.sock"
    path.write_text("not a socket")
    with pytest.raises(NetdevHostError) as info:
        await open_netdev(parse_netdev(f"stream,server=on,addr.type=unix,addr.path={path}"))
    assert info.value.errno == errno.EADDRINUSE
    assert path.read_text() == "not a socket"


async def test_dgram_local_address_in_use(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(NetdevHostError, match=r"choose another local\.port") as info:
            await open_netdev(parse_netdev(
                f"dgram,local.type=inet,local.host=127.0.0.1,local.port={port},"
                f"remote.type=inet,remote.host=127.0.0.1,remote.port={port}"))
    assert info.value.errno == errno.EADDRINUSE
    path = tmp_path / "vfu.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as held:
        held.bind(str(path))
        with pytest.raises(NetdevHostError, match=r"choose another local\.path") as info:
            await open_netdev(parse_netdev(
                f"dgram,local.type=unix,local.path={path},remote.type=unix,remote.path=/x"))
    assert info.value.errno == errno.EADDRINUSE


async def test_stream_client_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        with pytest.raises(NetdevHostError, match="add reconnect=SECONDS") as info:
            await open_netdev(parse_netdev(
                f"stream,addr.type=inet,addr.host=127.0.0.1,addr.port={port}"))
    assert info.value.errno == errno.ECONNREFUSED
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in str(info.value)
    assert "start the peer first" in str(info.value)
    with pytest.raises(NetdevHostError, match="start the peer first") as info:
        await open_netdev(parse_netdev(f"stream,addr.type=unix,addr.path={tmp_path}/none"))
    assert info.value.errno == errno.ENOENT


async def test_unresolvable_host() -> None:
    with pytest.raises(NetdevHostError, match=r"cannot resolve no-such-host\.invalid"):
        await open_netdev(parse_netdev(
            "stream,addr.type=inet,addr.host=no-such-host.invalid,addr.port=1"))


def test_tun_device_missing(tmp_path: Path) -> None:
    with pytest.raises(NetdevHostError, match=r"kernel module tun \(modprobe tun\)") as info:
        TapBackend.open("vfu0", tun_device=str(tmp_path / "tun"))
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize(("features", "offloads", "flags"), [
    pytest.param([], NetOffloads(), TunOffload(0), id="none"),
    pytest.param(["GUEST_CSUM"], NetOffloads(csum=True), TunOffload.CSUM, id="csum"),
    pytest.param(["GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "GUEST_UFO",
                  "GUEST_USO4", "GUEST_USO6"], NetOffloads(*[True] * 7), TunOffload(0x7F),
                 id="all"),
    pytest.param(["GUEST_TSO4", "GUEST_TSO6", "GUEST_UFO"],
                 NetOffloads(tso4=True, tso6=True, ufo=True), TunOffload(0),
                 id="no-csum-no-offload"),
    pytest.param(["GUEST_CSUM", "GUEST_ECN"], NetOffloads(csum=True, ecn=True),
                 TunOffload.CSUM, id="ecn-needs-tso"),
    pytest.param(["GUEST_CSUM", "GUEST_TSO6", "GUEST_ECN"],
                 NetOffloads(csum=True, tso6=True, ecn=True),
                 TunOffload.CSUM | TunOffload.TSO6 | TunOffload.TSO_ECN, id="tso6-ecn"),
])
def test_guest_offloads_to_tun_flags(features: list[str], offloads: NetOffloads,
                                     flags: TunOffload) -> None:
    # QEMU virtio_net_apply_guest_offloads(), then tap-linux.c tap_fd_set_offload().
    bits = sum(NetFeature[name].mask for name in features)
    assert NetOffloads.from_guest_offloads(bits) == offloads
    assert tun_offload(offloads) == flags


# --- tap, in a network namespace of its own ------------------------------------------------

def _tap_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "tap tests need root (they create a network namespace and a tap in it)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (kernel module tun not loaded)"
    if shutil.which("ip") is None or shutil.which("setpriv") is None:
        return "tap tests need ip (iproute2) and setpriv (util-linux)"
    return None


needs_tap = pytest.mark.skipif(_tap_skip_reason() is not None,
                               reason=_tap_skip_reason() or "")
PROBE = "tests.server.netdev_tap_probe"
REPO = Path(__file__).parents[2]
_namespaces = itertools.count()
NO_NET_ADMIN = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]


def ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace for one test, always deleted (and every tap in it with it)."""
    name = f"vfu-nd-{os.getpid()}-{next(_namespaces)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def host_tap(netns: str, name: str, *owner: str) -> str:
    """A persistent tap with 10.0.2.1/24, made as a user would; returns its MAC."""
    ip(netns, "tuntap", "add", "dev", name, "mode", "tap", *owner)
    ip(netns, "addr", "add", "10.0.2.1/24", "dev", name)
    ip(netns, "link", "set", name, "up")
    address: str = json.loads(ip(netns, "-j", "link", "show", "dev", name))[0]["address"]
    return address


async def probe(netns: str, mode: str, netdev: str, *, wrapper: tuple[str, ...] = ()
                ) -> dict[str, Any]:
    """Run netdev_tap_probe.py inside the namespace (this process never changes namespace)."""
    result = await trio.run_process(
        ["ip", "netns", "exec", netns, *wrapper, sys.executable, "-m", PROBE, mode, netdev],
        capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode()
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


@needs_tap
@pytest.mark.parametrize("vnet_hdr", [True, False], ids=["vnet_hdr=on", "vnet_hdr=off"])
async def test_tap_kernel_answers_arp(netns: str, vnet_hdr: bool) -> None:
    tap_mac = host_tap(netns, "vfutap0")
    option = "on" if vnet_hdr else "off"
    outcome = await probe(netns, "arp", f"tap,id=net0,ifname=vfutap0,vnet_hdr={option}")
    assert outcome["vnet_hdr"] is vnet_hdr
    assert outcome["replies"], "the kernel did not answer the ARP request"
    reply = bytes.fromhex(outcome["replies"][0])
    if vnet_hdr:
        flags, gso_type, _, gso_size, _, _, num_buffers = struct.unpack_from("<BBHHHHH", reply)
        # A plain frame from the kernel: no checksum offload, no GSO; one buffer.
        assert (flags, gso_type, gso_size) == (0, 0, 0)
        assert num_buffers == 1
        reply = reply[12:]
    mac = bytes.fromhex(tap_mac.replace(":", ""))
    assert reply[:6] == bytes.fromhex("525400123456")  # to the made-up guest MAC
    assert reply[6:12] == mac
    assert reply[12:14] == b"\x08\x06"
    assert reply[20:22] == b"\x00\x02"  # ARP reply
    assert reply[22:28] == mac  # sender: the tap ...
    assert reply[28:32] == socket.inet_aton("10.0.2.1")  # ... with the host address
    assert reply[38:42] == socket.inet_aton("10.0.2.15")
    stats = outcome["stats"]
    assert stats["tx_frames"] >= 1
    assert stats["tx_bytes"] == 60 * stats["tx_frames"]
    assert stats["rx_frames"] >= 1


@needs_tap
async def test_tap_created_and_removed(netns: str) -> None:
    outcome = await probe(netns, "create", "tap,ifname=vfunew0")
    assert outcome == {"ifname": "vfunew0", "while_open": True, "after_close": False}
    outcome = await probe(netns, "create", "tap")
    assert outcome["ifname"].startswith("tap")  # named by the kernel (tap%d)
    assert outcome["while_open"] and not outcome["after_close"]


@needs_tap
async def test_tap_busy(netns: str) -> None:
    host_tap(netns, "vfutap0")
    outcome = await probe(netns, "busy", "tap,ifname=vfutap0")
    assert outcome["opened"] == 1
    assert outcome["errno"] == errno.EBUSY
    assert outcome["message"].startswith("tap vfutap0 is busy")


@needs_tap
async def test_tap_permission(netns: str) -> None:
    # Without CAP_NET_ADMIN, creating a tap fails, and so does attaching to a tap owned by
    # another user (the kernel's tun_not_capable()) ...
    host_tap(netns, "vfunobody", "user", "65534")
    for name in ("vfunew0", "vfunobody"):
        outcome = await probe(netns, "open", f"tap,ifname={name}", wrapper=(*NO_NET_ADMIN,))
        assert outcome["errno"] == errno.EPERM
        assert "run as root, or create the tap for this user with " in outcome["message"]
        assert f"'ip tuntap add dev {name} mode tap user root'" in outcome["message"]
    # ... and the fix the message names works.
    ip(netns, "tuntap", "add", "dev", "vfuroot", "mode", "tap", "user", "root")
    outcome = await probe(netns, "open", "tap,ifname=vfuroot", wrapper=(*NO_NET_ADMIN,))
    assert outcome == {"opened": 1}


@needs_tap
async def test_tun_device_not_accessible(netns: str) -> None:
    # uid nobody; CAP_DAC_READ_SEARCH (read and search, never write) only so that it can
    # import the probe from a checkout only root may enter (a fresh `mktemp -d` clone is 0700)
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search")
    outcome = await probe(netns, "open", "tap,ifname=vfunew0", wrapper=nobody)
    if os.stat("/dev/net/tun").st_mode & 0o006:  # world-accessible: TUNSETIFF refuses instead
        assert outcome["errno"] == errno.EPERM
    else:
        assert outcome["errno"] == errno.EACCES
        assert outcome["message"].startswith("no permission to open /dev/net/tun: run as root")


@needs_tap
@pytest.mark.skipif(shutil.which("ethtool") is None, reason="needs ethtool (system-packages.sh)")
async def test_tap_offloads_follow_the_guest(netns: str) -> None:
    # QEMU's virtio_net_apply_guest_offloads() and tap_fd_set_offload(): the tap hands the
    # guest checksum and segmentation work only while the guest takes it (ethtool -k shows
    # the tap's tx side: what the kernel sends to the tap's reader, the guest).
    host_tap(netns, "vfutap0")
    outcome = await probe(netns, "offloads", "tap,ifname=vfutap0")
    csum, tso4, ecn, tso6 = ("tx-checksum-ip-generic", "tx-tcp-segmentation",
                             "tx-tcp-ecn-segmentation", "tx-tcp6-segmentation")
    assert outcome == {
        "opened": [],  # no driver yet (QEMU's net_tap_fd_init())
        "negotiated csum,tso4,tso6,ecn": [csum, tso4, ecn, tso6],
        "ack csum,tso4": 0, "set csum,tso4": [csum, tso4],
        "ack tso4": 0, "set tso4": [],  # segmentation without checksum: none (tap-linux.c)
        "ack csum,tso6,ecn": 0, "set csum,tso6,ecn": [csum, ecn, tso6],
        "ack none": 0, "set none": [],
        "negotiated csum": [csum],
        "reset": [],
        "earlier user": [csum, tso4], "reopened": [],  # persistent tap: QEMU starts at none
    }
