"""A served device: what the operator asked for, and the objects that make it run.

One :class:`ServedDevice` ties together a network backend, the virtio-net model, its PCI
presentation and the libvfio-user context; :meth:`ServedDevice.run` is the one trio task
tree that owns them (the context's poll fd, the backend's fds, the transmit pump).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import trio

from vfuserver.context import VfuContext
from vfuserver.devices.memory import GuestMemory
from vfuserver.devices.virtio_net import TX_QUEUE, VirtioNet
from vfuserver.devices.virtio_pci import VirtioPciFunction
from vfuserver.netdev import NetBackend, NetdevSpec, NoneSpec, open_netdev
from vfuserver.protocol.pci import ClassCode
from vfuserver.protocol.virtio_net import HDR_LEN
from vfuserver.server import serve_device

PROFILES = ("modern", "transitional")
DEFAULT_MAC = bytes.fromhex("525400123456")


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; a unicast address is required."""
    parts = text.split(":")
    try:
        if len(parts) != 6:
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a MAC address like 52:54:00:12:34:56") from None
    if mac[0] & 1:
        raise argparse.ArgumentTypeError(f"{text} is a multicast address; a device needs unicast")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass
class DeviceSpec:
    """One device: where it listens, how it presents itself, where its frames go."""

    name: str
    socket: str
    profile: str = "modern"
    mac: bytes = DEFAULT_MAC
    netdev: NetdevSpec = field(default_factory=NoneSpec)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(
                f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")


class ServedDevice:
    """A device model behind its PCI presentation, a vfio-user socket and a backend."""

    def __init__(self, spec: DeviceSpec, backend: NetBackend) -> None:
        self.spec = spec
        self.log = logging.getLogger(f"vfuserver.{spec.name}")
        self.backend = backend
        memory = GuestMemory()
        self.net = VirtioNet(memory, _NO_INTERRUPTS, backend, mac=spec.mac, name=spec.name)
        self.function = VirtioPciFunction(self.net, name=spec.name,
                                          class_code=ClassCode.NETWORK_ETHERNET)
        self.context = VfuContext(spec.socket, self.function, memory=memory, logger=self.log)
        self._tx_pending = trio.Event()
        self.net.on_rx_buffers = backend.wake_receiver
        self.net.on_tx_pending = self._tx_pending.set

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve clients and move frames until cancelled; the device is closed on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.backend.run, self._deliver)
                nursery.start_soon(self._transmit_pump)
                await nursery.start(serve_device, self.context)
                task_status.started()
        finally:
            self.close()

    def _deliver(self, frame: bytes) -> bool:
        """A frame from the backend into the guest; False: no receive buffers yet."""
        try:
            if self.backend.vnet_hdr:
                return self.net.receive(memoryview(frame)[HDR_LEN:], frame[:HDR_LEN])
            return self.net.receive(frame)
        except Exception:
            self.log.exception("bug while receiving a frame (dropped)")
            return True

    async def _transmit_pump(self) -> None:
        """Continue a transmit burst the model cut short (QEMU's tx bottom half)."""
        while True:
            await self._tx_pending.wait()
            self._tx_pending = trio.Event()
            self.net.on_tx_pending = self._tx_pending.set
            await trio.lowlevel.checkpoint()
            try:
                self.net.notify(TX_QUEUE)
            except Exception:
                self.log.exception("bug while transmitting")

    def close(self) -> None:
        self.context.close()
        self.backend.close()


class _NoInterrupts:
    """Placeholder until the transport takes over the device's interrupts."""

    def queue_interrupt(self, queue: object) -> None:
        pass

    def config_interrupt(self) -> None:
        pass


_NO_INTERRUPTS = _NoInterrupts()


async def open_device(spec: DeviceSpec) -> ServedDevice:
    """Open the backend, then build the device; the backend is closed if that fails."""
    backend = await open_netdev(spec.netdev)
    try:
        return ServedDevice(spec, backend)
    except BaseException:
        backend.close()
        raise
