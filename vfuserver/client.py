"""A small synchronous vfio-user client, for tests and benchmarks.

It speaks the protocol through :mod:`vfuserver.protocol.vfio_user` and passes file
descriptors with SCM_RIGHTS, as QEMU does, so tests can drive a real server the way
QEMU would: version negotiation, region and IRQ info, region accesses, DMA maps backed
by a memfd, eventfd interrupts and device reset.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from vfuserver.protocol import vfio_user as vu


class VfioUserError(OSError):
    """The server answered a command with an error reply."""


class Client:
    """One connection to a vfio-user server socket."""

    def __init__(self, path: str, *, capabilities: dict[str, Any] | None = None,
                 timeout: float | None = 10.0, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._msg_id = 0
        self.server_version: tuple[int, int] = (0, 0)
        self.server_capabilities: dict[str, Any] = {}
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            if negotiate:
                self.negotiate(capabilities)
        except BaseException:
            self.sock.close()  # a server that refused or dropped us leaves no open socket
            raise

    # -- plumbing --------------------------------------------------------------------

    def send(self, command: int, payload: bytes = b"", *, fds: Sequence[int] = (),
             flags: int = 0) -> int:
        """Send one command; its message id."""
        self._msg_id = (self._msg_id + 1) & 0xFFFF
        message = vu.HEADER.pack(self._msg_id, command, vu.HEADER.size + len(payload), flags,
                                 0) + payload
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            self.sock.sendmsg([message], ancillary)
        else:
            self.sock.sendall(message)
        return self._msg_id

    def _recv_exact(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self.sock.recv(size - len(chunks))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            chunks += chunk
        return bytes(chunks)

    def receive(self, msg_id: int, command: int) -> bytes:
        """The payload of the reply to ``msg_id``; VfioUserError for an error reply."""
        rid, rcmd, size, flags, error_no = vu.HEADER.unpack(self._recv_exact(vu.HEADER.size))
        payload = self._recv_exact(size - vu.HEADER.size)
        if flags & vu.TYPE_MASK != vu.HeaderFlags.REPLY or rid != msg_id or rcmd != command:
            raise ConnectionError(
                f"unexpected message id={rid} cmd={rcmd} flags={flags:#x} for {msg_id}/{command}")
        if flags & vu.HeaderFlags.ERROR:
            raise VfioUserError(error_no, f"{vu.Command(command).name}: {os.strerror(error_no)}")
        return payload

    def request(self, command: int, payload: bytes = b"", *, fds: Sequence[int] = ()) -> bytes:
        return self.receive(self.send(command, payload, fds=fds), command)

    # -- commands --------------------------------------------------------------------

    def negotiate(self, capabilities: dict[str, Any] | None = None) -> None:
        caps = capabilities if capabilities is not None else {
            "max_msg_fds": 16, "max_data_xfer_size": vu.MAX_DATA_XFER_SIZE}
        reply = self.request(vu.Command.VERSION, vu.build_version(0, 0, caps))
        major, minor, self.server_capabilities = vu.parse_version(reply)
        self.server_version = (major, minor)

    def device_info(self) -> Any:
        payload = vu.DeviceInfo.build({"argsz": vu.DeviceInfo.sizeof(), "flags": 0,
                                       "num_regions": 0, "num_irqs": 0})
        return vu.DeviceInfo.parse(self.request(vu.Command.DEVICE_GET_INFO, payload))

    def region_info(self, index: int) -> Any:
        payload = vu.RegionInfo.build({"argsz": vu.RegionInfo.sizeof(), "flags": 0,
                                       "index": index, "cap_offset": 0, "size": 0, "offset": 0})
        return vu.RegionInfo.parse(self.request(vu.Command.DEVICE_GET_REGION_INFO, payload))

    def irq_info(self, index: int) -> Any:
        payload = vu.IrqInfo.build({"argsz": vu.IrqInfo.sizeof(), "flags": 0, "index": index,
                                    "count": 0})
        return vu.IrqInfo.parse(self.request(vu.Command.DEVICE_GET_IRQ_INFO, payload))

    def read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.request(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(offset, region, count))
        return reply[vu.REGION_ACCESS.size : vu.REGION_ACCESS.size + count]

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.request(vu.Command.REGION_WRITE,
                     vu.REGION_ACCESS.pack(offset, region, len(data)) + data)

    def post_write(self, region: int, offset: int, data: bytes) -> None:
        """A write with No_reply set, as QEMU posts memory-BAR writes."""
        self.send(vu.Command.REGION_WRITE, vu.REGION_ACCESS.pack(offset, region, len(data)) + data,
                  flags=vu.HeaderFlags.NO_REPLY)

    def reset(self) -> None:
        self.request(vu.Command.DEVICE_RESET)

    def dma_map(self, address: int, size: int, fd: int | None, *, offset: int = 0,
                writable: bool = True) -> None:
        flags = vu.DmaFlags.READ | (vu.DmaFlags.WRITE if writable else 0)
        payload = vu.DmaMap.build({"argsz": vu.DmaMap.sizeof(), "flags": flags, "offset": offset,
                                   "address": address, "size": size})
        self.request(vu.Command.DMA_MAP, payload, fds=() if fd is None else (fd,))

    def dma_unmap(self, address: int, size: int) -> None:
        payload = vu.DmaUnmap.build({"argsz": vu.DmaUnmap.sizeof(), "flags": 0,
                                     "address": address, "size": size})
        self.request(vu.Command.DMA_UNMAP, payload)

    def set_irqs(self, index: int, start: int, fds: Sequence[int], *,
                 action: int = vu.IrqSetFlags.ACTION_TRIGGER) -> None:
        """Wire eventfds to vectors [start, start+len(fds)); no fds disables the index."""
        data = vu.IrqSetFlags.DATA_EVENTFD if fds else vu.IrqSetFlags.DATA_NONE
        payload = vu.IrqSet.build({"argsz": vu.IrqSet.sizeof(), "flags": data | action,
                                   "index": index, "start": start if fds else 0,
                                   "count": len(fds)})
        self.request(vu.Command.DEVICE_SET_IRQS, payload, fds=fds)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
