"""A served device: what the operator asked for, and the objects that make it run.

One :class:`ServedDevice` ties together a network backend, the virtio-net model, its PCI
presentation (chosen by the profile, once, when the presentation is built) and the
libvfio-user context; :meth:`ServedDevice.run` is the one trio task tree that owns them
(the context's poll fd, the backend's fds, the transmit pump).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vfuserver.context import DeviceLock, VfuContext
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.legacy_io import TransitionalFunction
from vfuserver.devices.memory import GuestMemory
from vfuserver.devices.pci import PciFunction
from vfuserver.devices.ring_journal import RingJournal
from vfuserver.devices.virtio_net import RX_QUEUE, VirtioNet
from vfuserver.devices.virtio_pci import VirtioPciFunction
from vfuserver.netdev.backend import NetBackend, NetOffloads
from vfuserver.netdev.open import open_netdev
from vfuserver.protocol.pci import ClassCode
from vfuserver.protocol.virtio_net import HDR_LEN
from vfuserver.server import serve_device
from vfuserver.spec import DeviceSpec, check_profile


class DeviceBusyError(RuntimeError):
    """The change needs the device free, and a client (a VM) is attached."""


class ServedDevice:
    """A device model behind its PCI presentation, a vfio-user socket and a backend."""

    def __init__(self, spec: DeviceSpec, backend: NetBackend, owner: AdminOwner) -> None:
        self.spec = spec
        self.log = logging.getLogger(f"vfuserver.{spec.name}")
        self.backend = backend
        self.owner = owner
        self.memory = GuestMemory()
        self.lock = DeviceLock()
        """The model's lock (:class:`DeviceLock`): the serving thread's callbacks and
        this device's event-loop tasks take it."""
        self.net = VirtioNet(self.memory, _NO_INTERRUPTS, backend, mac=spec.mac, name=spec.name)
        self.function: PciFunction
        self.context: VfuContext
        self._build(spec.profile)
        self._journals = _attach_journals(self.net, spec.name)
        self._tx_pending = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self.net.on_rx_buffers = self._in_loop(backend.wake_receiver)
        self.net.on_guest_offloads = self._apply_guest_offloads
        self.net.on_tx_pending = self._in_loop(self._request_tx)
        self._serve_scope: trio.CancelScope | None = None
        self._switch: _Switch | None = None

    def _in_loop(self, call: Callable[[], None]) -> Callable[[], None]:
        """``call`` as a hook the model may call from the serving thread: there it is
        handed to the event loop (trio objects are not thread-safe), here it runs now."""
        def hook() -> None:
            if self._token is None or threading.get_ident() == self._loop_thread:
                call()
            else:
                self._token.run_sync_soon(call)
        return hook

    def _request_tx(self) -> None:
        self._tx_pending.set()

    def _apply_guest_offloads(self, offloads: int) -> None:
        """The offloads the driver negotiated or set go to the backend, as QEMU's
        virtio_net_apply_guest_offloads(): a tap then hands the guest only what it takes."""
        self.backend.set_offload(NetOffloads.from_guest_offloads(offloads))

    def _build(self, profile: str) -> None:
        """The presentation for ``profile`` and the context serving it: the one place the
        profile is looked at."""
        modern = VirtioPciFunction(self.net, name=self.spec.name,
                                   class_code=ClassCode.NETWORK_ETHERNET)
        function: PciFunction = modern
        if profile == "transitional":
            function = TransitionalFunction(modern, self.owner)
        try:
            self.context = VfuContext(self.spec.socket, function, memory=self.memory,
                                      logger=self.log, lock=self.lock)
        except BaseException:
            function.close()
            raise
        self.function = function
        self.spec.profile = profile

    @property
    def profile(self) -> str:
        return self.spec.profile

    @property
    def client_attached(self) -> bool:
        return self.context.client_attached

    async def set_profile(self, profile: str) -> None:
        """Present the device with ``profile`` from now on; refused while a VM is attached."""
        check_profile(profile)
        if self.client_attached:
            raise DeviceBusyError(
                f"device {self.spec.name} has a client attached; shut the VM down or "
                "detach the device, then set the profile")
        if profile == self.profile:
            return
        if self._serve_scope is None:  # not running: rebuild right here
            self._replace(profile)
            return
        switch = self._switch = _Switch(profile)
        self._serve_scope.cancel()
        await switch.done.wait()
        if switch.error is not None:
            raise switch.error

    def _replace(self, profile: str) -> None:
        old_profile = self.profile
        self._close_presentation()
        self.net.reset()
        try:
            self._build(profile)
        except BaseException:
            self.log.exception("cannot present %s as %s; back to %s", self.spec.name, profile,
                               old_profile)
            self._build(old_profile)
            raise
        self.log.info("profile of %s is now %s", self.spec.name, profile)

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters of the model, the backend and (transitional) the legacy path."""
        return {
            "virtio_net": dataclasses.asdict(self.net.stats),
            "backend": dataclasses.asdict(self.backend.stats),
            **self.function.counters(),
            "fast_path": self.context.native.counters(),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve clients and move frames until cancelled; the device is closed on the way out."""
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.backend.run, self._deliver)
                nursery.start_soon(self._transmit_pump)
                await nursery.start(self._serve)
                task_status.started()
        finally:
            self._serve_scope = None
            self.close()

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        """serve_device, restarted with a new context when the profile changes."""
        started = False
        while True:
            with trio.CancelScope() as scope:
                self._serve_scope = scope
                if started:
                    await serve_device(self.context)
                else:
                    started = True
                    await serve_device(self.context, task_status=task_status)
            switch, self._switch = self._switch, None
            if switch is None:
                return  # cancelled from outside
            try:
                self._replace(switch.profile)
            except BaseException as exc:  # reported to set_profile's caller
                switch.error = exc
            switch.done.set()

    def _deliver(self, frame: bytes) -> bool:
        """A frame from the backend into the guest; False: no receive buffers yet."""
        try:
            with self.lock:
                if self.backend.vnet_hdr:
                    return self.net.receive(memoryview(frame)[HDR_LEN:], frame[:HDR_LEN])
                return self.net.receive(frame)
        except Exception:
            self.log.exception("bug while receiving a frame (dropped)")
            return True

    async def _transmit_pump(self) -> None:
        """The transmit bottom half: runs after the kick that scheduled it was answered."""
        while True:
            await self._tx_pending.wait()
            self._tx_pending = trio.Event()
            await trio.lowlevel.checkpoint()
            try:
                with self.lock:
                    self.net.run_tx()
            except Exception:
                self.log.exception("bug while transmitting")

    def _close_presentation(self) -> None:
        self.context.close()
        self.function.close()

    def close(self) -> None:
        """Idempotent; the final counters are logged once."""
        if not self.context.closed:
            self.log.info("stats of %s (profile %s): %s", self.spec.name, self.profile,
                          json.dumps(self.stats(), sort_keys=True))
            self._close_presentation()
        self.backend.close()
        for queue in self.net.queues:
            queue.journal = None
        for journal in self._journals:
            journal.close()
        self._journals = []


RING_JOURNAL_ENV = "VFUSERVER_RING_JOURNAL"
"""A folder: when set, every queue keeps a ring journal there (devices/ring_journal.py),
for an outside watcher (benchmarks/c/ring_watch.c) to check the used rings against."""


def _attach_journals(net: VirtioNet, name: str) -> list[RingJournal]:
    folder = os.environ.get(RING_JOURNAL_ENV)
    if not folder:
        return []
    journals = []
    for queue in net.queues:
        journal = RingJournal(Path(folder) / f"{name}-q{queue.index}.journal", queue.index,
                              receive=queue.index == RX_QUEUE)
        queue.journal = journal
        queue.publish_journal()
        journals.append(journal)
    return journals


@dataclass
class _Switch:
    profile: str
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class _NoInterrupts:
    """Placeholder until the transport takes over the device's interrupts."""

    def queue_interrupt(self, queue: object) -> None:
        pass

    def config_interrupt(self) -> None:
        pass


_NO_INTERRUPTS = _NoInterrupts()


async def open_device(spec: DeviceSpec, *, owner: AdminOwner | None = None) -> ServedDevice:
    """Open the backend, then build the device; the backend is closed if that fails.

    ``owner`` is the server's admin group owner (one per process); a device opened
    without one gets a group of its own.
    """
    backend = await open_netdev(spec.netdev)
    try:
        return ServedDevice(spec, backend, owner if owner is not None else AdminOwner())
    except BaseException:
        backend.close()
        raise
