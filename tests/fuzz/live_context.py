"""Fuzz target 1: vfio-user messages into a live libvfio-user context.

One real :class:`VfuContext` serves a real transitional virtio-net (so BAR0 legacy too) on a
socket in a temporary directory, for the whole fuzzing process. Each input is one client
session: connect, a valid VERSION handshake, then the input's messages one by one, each
served by the context's own serving thread (:meth:`VfuContext.serve_client`, as the
server runs it) and its replies read back; then a well-formed config-space read must be answered
(on a new connection if the server dropped the client), and the disconnect must be noticed.

The messages keep the stream well-formed (``msg_size`` always matches what is sent: a
client that stalls inside a message is issue 12's first fix, tested on its own), so the
fuzzer spends its time on what libvfio-user and the device see: any command number, id and
flags, raw bodies, or region accesses steered to the device's regions. DMA_MAP and other
messages may carry a memfd (SCM_RIGHTS); the harness fits a map into that memfd, since a
map larger than its file kills the process with SIGBUS once touched (issue 12 fix 3; drop
:attr:`LiveContextTarget.fit_maps` to fuzz that class once the fix is in).

Defined errors: an error reply, or the server dropping the client (vfu_run_ctx's errno).
Findings: an exception stored by a callback (a device bug answered with EIO), a reply that
is not a whole reply header (or reports an error without an errno), a config read that is
not answered right, a disconnect not noticed, a file descriptor that stays open in
the server after the session, an admin command that failed unexpectedly.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import weakref

from tests.devices.driver import RecordingInterrupts, RecordingPeer
from tests.fuzz.harness import ByteReader, Finding
from vfuserver.context import VfuContext
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.legacy_io import TransitionalFunction
from vfuserver.devices.memory import GuestMemory
from vfuserver.devices.virtio_net import VirtioNet
from vfuserver.devices.virtio_pci import VirtioPciFunction
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.pci import ClassCode
from vfuserver.protocol.virtio_pci import VENDOR_ID, TransitionalDeviceId

MEMFD_SIZE = 1 << 20
"""Backing of the DMA maps the client offers (guest RAM of a tiny VM)."""

TIMEOUT = 2.0
"""Seconds the client waits for any reply: a hang fails the input long before libFuzzer's
-timeout."""

MAX_BODY = 4096
MESSAGES_PER_DRAIN = 8
"""Fewer than the server's 64: the client reads replies between drains, and 8 replies of
the largest region read (16 KiB) fit a socket buffer, so the server never blocks on a
client that did not read yet (a client that never reads is a test of its own)."""
MAX_WAKEUPS = 1000
"""Drains of one exchange before the connection must have stopped polling readable."""
CONFIG_INDEX = vu.PciRegion.CONFIG
EXPECTED_ID = VENDOR_ID | TransitionalDeviceId.NET << 16
"""The first config dword of a transitional virtio-net: vendor 0x1af4, device 0x1000."""

ATTACH_FD, STEER_COMMAND, STEER_ACCESS, RAW_FLAGS, NO_REPLY, QUEUED = 1, 2, 4, 8, 16, 32
"""Flag bits of a message's first byte. QUEUED: sent without being served at once, so the
next drain finds several messages queued (QEMU posts BAR writes without waiting)."""


class LiveContextTarget:
    fit_maps = True
    """Fit DMA_MAP offset and size into the memfd (see the module docstring)."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="vfuserver-fuzz-")
        self.socket_path = os.path.join(self.directory, "fuzz.sock")
        memory = GuestMemory()
        net = VirtioNet(memory, RecordingInterrupts(), RecordingPeer(), mac=bytes.fromhex(
            "525400abcdef"), name="fuzz")
        modern = VirtioPciFunction(net, name="fuzz", class_code=ClassCode.NETWORK_ETHERNET)
        self.owner = AdminOwner()
        self.function = TransitionalFunction(modern, self.owner)
        self.context = VfuContext(self.socket_path, self.function, memory=memory)
        self.bugs = _BugCounter()
        self.context.log.addHandler(self.bugs)
        self.memfd = os.memfd_create("fuzz-guest-ram")
        os.ftruncate(self.memfd, MEMFD_SIZE)
        self.fds_before: set[int] = set()
        self.fd_maps = 0
        """DMA_MAP messages with the memfd in the current session."""
        self.repeat_map_fd_leaks = 0
        # libFuzzer ends the process from C: the socket directory goes at exit at least
        weakref.finalize(self, _cleanup, self.context, self.memfd, self.directory)

    def close(self) -> None:
        _cleanup(self.context, self.memfd, self.directory)

    # -- one session per input -----------------------------------------------------------

    def __call__(self, data: bytes) -> None:
        self.fds_before = _open_fds()
        self.fd_maps = 0
        session = self.connect()
        try:
            reader = ByteReader(data)
            msg_id = 1
            while reader.remaining and session.alive:
                session.exchange(*self.message(reader, msg_id))
                msg_id += 1
            if session.alive:
                session.check_config_read()
            session.disconnect()
        finally:
            session.close()
        if not session.answered:
            # the server dropped the client: the next client must be served
            check = self.connect()
            try:
                check.check_config_read()
                check.disconnect()
            finally:
                check.close()
        if self.owner.stats.bugs:
            raise Finding(f"{self.owner.stats.bugs} unexpected exception(s) in admin commands")
        self.check_fds(repeated_maps=self.fd_maps > 1)

    def check_fds(self, *, repeated_maps: bool) -> None:
        """Every fd the session passed is closed once it ended.

        One exception, a known libvfio-user bug (this vintage's handle_dma_map): for an
        exact repeat of a map, dma_controller_add_region returns the existing region and
        the fd that came with the repeat is never closed. Such copies of the guest RAM
        memfd are closed here and counted in :attr:`repeat_map_fd_leaks`.
        """
        leaked = _open_fds() - self.fds_before
        ram = os.fstat(self.memfd)
        unexplained = []
        for fd in leaked:
            try:
                st = os.fstat(fd)
            except OSError:
                continue  # closed meanwhile: listdir's own fd
            if repeated_maps and (st.st_dev, st.st_ino) == (ram.st_dev, ram.st_ino):
                os.close(fd)
                self.repeat_map_fd_leaks += 1
            else:
                unexplained.append(fd)
        if unexplained:
            raise Finding(f"file descriptor(s) {unexplained} left open by a session")

    def connect(self) -> Session:
        return Session(self)

    def message(self, reader: ByteReader, msg_id: int) -> tuple[bytes, bool, bool]:
        """One message, whether it carries the memfd and whether it is served at once.
        Input: flags u8, command u16,
        [raw header flags u32], then a region access (offset u16, region u8, count u16,
        written bytes) or a raw body (length u16, bytes)."""
        flags = reader.u8()
        command = reader.u16()
        if flags & STEER_COMMAND:
            command = 1 + command % len(vu.Command)
        header_flags = reader.u32() if flags & RAW_FLAGS else 0
        if flags & NO_REPLY:
            header_flags |= vu.HeaderFlags.NO_REPLY
        if flags & STEER_ACCESS:
            offset, region, count = reader.u16(), reader.u8() % 10, reader.u16() % 256
            body = vu.REGION_ACCESS.pack(offset, region, count)
            if command == vu.Command.REGION_WRITE:
                body += reader.take(count).ljust(count, b"\0")
        else:
            body = reader.take(reader.u16() % MAX_BODY)
        attach_fd = bool(flags & ATTACH_FD)
        if attach_fd and command == vu.Command.DMA_MAP:
            self.fd_maps += 1
        if self.fit_maps and command == vu.Command.DMA_MAP and len(body) >= vu.DmaMap.sizeof():
            body = _fit_map(body)
        header = vu.HEADER.pack(msg_id, command, vu.HEADER.size + len(body), header_flags, 0)
        return header + body, attach_fd, not flags & QUEUED or not reader.remaining

    # -- seeds ------------------------------------------------------------------------

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        """What QEMU sends while a guest boots: info queries, a DMA map, config space, the
        legacy BAR0 and the modern BAR; a few malformed messages."""
        def msg(command: int, body: bytes = b"", flags: int = 0) -> bytes:
            return (bytes([flags]) + command.to_bytes(2, "little")
                    + len(body).to_bytes(2, "little") + body)

        def access(command: int, region: int, offset: int, count: int,
                   data: bytes = b"", flags: int = 0) -> bytes:
            return (bytes([STEER_ACCESS | flags]) + command.to_bytes(2, "little")
                    + offset.to_bytes(2, "little") + bytes([region])
                    + count.to_bytes(2, "little") + data)

        cmd = vu.Command
        def argsz(size: int, tail: bytes = b"") -> bytes:
            return size.to_bytes(4, "little") + tail.rjust(size - 4, b"\0")

        info = (msg(cmd.DEVICE_GET_INFO, argsz(16))
                + msg(cmd.DEVICE_GET_REGION_INFO, argsz(32))
                + msg(cmd.DEVICE_GET_IRQ_INFO, argsz(16, (2).to_bytes(4, "little"))))
        dma = vu.DmaMap.build({"argsz": 32, "flags": 3, "offset": 0, "address": 0x4000_0000,
                               "size": MEMFD_SIZE})
        config = (access(cmd.REGION_READ, CONFIG_INDEX, 0, 64)
                  + access(cmd.REGION_WRITE, CONFIG_INDEX, 4, 2, b"\x07\x00"))
        legacy = (access(cmd.REGION_WRITE, CONFIG_INDEX, 4, 2, b"\x01\x00")
                  + access(cmd.REGION_WRITE, 0, 18, 1, b"\x03")
                  + access(cmd.REGION_READ, 0, 0, 4)
                  + access(cmd.REGION_WRITE, 0, 14, 2, b"\x01\x00")
                  + access(cmd.REGION_WRITE, 0, 8, 4, (0x4000_0000 >> 12).to_bytes(4, "little"))
                  + access(cmd.REGION_WRITE, 0, 18, 1, b"\x07")
                  + access(cmd.REGION_WRITE, 0, 16, 2, b"\x01\x00"))
        modern = (access(cmd.REGION_WRITE, 4, 20, 1, b"\x03")
                  + access(cmd.REGION_READ, 4, 0, 4) + access(cmd.REGION_READ, 4, 0x2000, 6)
                  + access(cmd.REGION_READ, 4, 0x1000, 1))
        return {
            "info": info,
            "dma-map": msg(cmd.DMA_MAP, dma, ATTACH_FD) + msg(cmd.DMA_UNMAP, vu.DmaUnmap.build(
                {"argsz": 24, "flags": 0, "address": 0x4000_0000, "size": MEMFD_SIZE})),
            "config": config,
            "legacy": msg(cmd.DMA_MAP, dma, ATTACH_FD) + legacy,
            "modern": modern,
            "reset": modern + msg(cmd.DEVICE_RESET),
            "set-irqs": msg(cmd.DEVICE_SET_IRQS, vu.IrqSet.build(
                {"argsz": 20, "flags": 0x24, "index": 2, "start": 0, "count": 1}), ATTACH_FD),
            "queued": access(cmd.REGION_WRITE, 4, 0x3000, 2, b"\0\0", QUEUED | NO_REPLY) * 9
            + access(cmd.REGION_READ, CONFIG_INDEX, 0, 64, flags=QUEUED) * 9
            + access(cmd.REGION_READ, 4, 0, 4),
            "bad": msg(0x7777, b"x" * 9) + msg(cmd.VERSION, bytes(4)) + msg(cmd.REGION_READ),
        }


class Session:
    """One client connection, served synchronously by the target's context."""

    def __init__(self, target: LiveContextTarget) -> None:
        self.target = target
        self.context = target.context
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.alive = False
        self.answered = False
        self.replies = b""
        self.sock.connect(target.socket_path)
        # Non-blocking: replies are complete once drain returns (the server writes them
        # before), so the client never needs to wait, and waits can only be bounded ones.
        self.sock.setblocking(False)
        caps = {"max_msg_fds": 8, "max_data_xfer_size": vu.MAX_DATA_XFER_SIZE}
        version = vu.build_version(0, 0, caps)
        self.sock.sendall(vu.HEADER.pack(0, vu.Command.VERSION, vu.HEADER.size + len(version),
                                         0, 0) + version)
        self.context.attach()  # the handshake is queued already: it cannot block
        self.fd = self.context.poll_fd()
        self.alive = True
        self.pending = self._receive_some_wait()
        if not self.pending.startswith(vu.HEADER.pack(0, vu.Command.VERSION, 0, 0, 0)[:4]):
            raise Finding(f"VERSION not answered: {self.pending[:16].hex()}")
        # the client is served as the server serves it: a thread running serve_client
        self.context.rearm()
        self.sent = 0
        self.served_before = int(self.context.native.dev.messages)
        self.thread = threading.Thread(target=self.context.serve_client, daemon=True)
        self.thread.start()

    def exchange(self, data: bytes, attach_fd: bool = False, serve: bool = True) -> bytes:
        """Send one message, let the context serve what is queued (unless ``serve`` is
        False), return what came back."""
        try:
            if attach_fd:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [self.target.memfd]))]
                self.sock.sendmsg([data], rights)
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, BlockingIOError):
            # the server dropped this client meanwhile (its thread decides on its own)
            if not self._serve_until_gone():
                raise Finding("the client's socket broke but the server still serves it") from None
            self.alive = False
            return b""
        self.sent += 1
        if not serve:
            return b""
        self.replies = b""
        self.serve()
        if not self.alive:
            return b""
        _check_replies(self.replies)
        return self.replies

    def serve(self) -> None:
        """Wait (bounded) until the serving thread has handled every message sent, or has
        dropped the client; a bug logged by a callback is a finding."""
        deadline = time.monotonic() + TIMEOUT
        dev = self.context.native.dev
        while int(dev.messages) - self.served_before < self.sent and self.thread.is_alive():
            if time.monotonic() > deadline:
                raise Finding("the serving thread did not handle the messages sent")
            self.replies += self._receive_some()  # room for the next replies
            time.sleep(0.0002)
        self.replies += self._receive_some()
        self._raise_callback_error()
        if not self.thread.is_alive():
            self.alive = False

    def _raise_callback_error(self) -> None:
        bugs, self.target.bugs.count = self.target.bugs.count, 0
        if bugs:
            raise Finding(f"{bugs} device callback bug(s): {self.target.bugs.last}")

    def _serve_until_gone(self) -> bool:
        """Whether the serving thread ended (the server saw the connection go)."""
        self.thread.join(TIMEOUT)
        self._raise_callback_error()
        return not self.thread.is_alive()

    def _receive_some_wait(self) -> bytes:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            data = self._receive_some()
            if data:
                return data
            time.sleep(0.0005)
        return b""

    def _receive_some(self) -> bytes:
        """Whatever the server sent so far (replies are written before drain returns);
        file descriptors in it are closed."""
        data = bytearray()
        while True:
            try:
                chunk, ancdata, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64),
                                                         socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: nothing more; else the server is gone
                break
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                        os.close(fd)
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def check_config_read(self) -> None:
        """The first config dword, read as QEMU reads it, must come back right."""
        body = vu.REGION_ACCESS.pack(0, CONFIG_INDEX, 4)
        msg_id = 0xFFFF
        reply = self.exchange(vu.HEADER.pack(msg_id, vu.Command.REGION_READ,
                                             vu.HEADER.size + len(body), 0, 0) + body)
        expected = vu.HEADER.pack(msg_id, vu.Command.REGION_READ,
                                  vu.HEADER.size + len(body) + 4, vu.HeaderFlags.REPLY, 0)
        want = expected + body + EXPECTED_ID.to_bytes(4, "little")
        if reply != want:
            raise Finding(f"config read answered {reply.hex()}, expected {want.hex()}")
        self.answered = True

    def disconnect(self) -> None:
        """Close the client's end: the server must notice (ENOTCONN) and reset."""
        if not self.alive:
            return
        self.sock.close()
        if not self._serve_until_gone():
            raise Finding("the server did not notice the client's disconnect")
        self.alive = False

    def close(self) -> None:
        self.sock.close()
        if self.alive:
            self.context.stop_serving()
        self.thread.join(TIMEOUT)


class _BugCounter(logging.Handler):
    """Counts the callback bugs the context logs (a device bug answered with EIO)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        if "bug in a device callback" in record.getMessage():
            self.count += 1
            self.last = record.getMessage()


def _check_replies(stream: bytes) -> None:
    """Every message the server sent is a whole reply: a header of the reply type, and an
    errno (a real one) exactly when it reports an error."""
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < vu.HEADER.size:
            raise Finding(f"{len(stream) - pos} bytes of a reply header: {stream.hex()}")
        _, _, size, flags, error_no = vu.HEADER.unpack_from(stream, pos)
        if size < vu.HEADER.size or pos + size > len(stream):
            raise Finding(f"reply of msg_size {size} in {len(stream) - pos} bytes")
        if flags & vu.TYPE_MASK != vu.HeaderFlags.REPLY:
            raise Finding(f"server sent flags {flags:#x}, not a reply")
        if bool(flags & vu.HeaderFlags.ERROR) != (0 < error_no < 4096):
            raise Finding(f"reply flags {flags:#x} with error_no {error_no}")
        pos += size


def _cleanup(context: VfuContext, memfd: int, directory: str) -> None:
    context.close()
    with contextlib.suppress(OSError):
        os.close(memfd)
    shutil.rmtree(directory, ignore_errors=True)


def _fit_map(body: bytes) -> bytes:
    fields = vu.DmaMap.parse(body)
    offset = fields.offset % MEMFD_SIZE & ~0xFFF
    size = min(fields.size, MEMFD_SIZE - offset)
    fixed = vu.DmaMap.build({"argsz": fields.argsz, "flags": fields.flags, "offset": offset,
                             "address": fields.address, "size": size})
    return bytes(fixed) + body[vu.DmaMap.sizeof():]


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}
