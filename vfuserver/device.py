"""A served device: what the operator asked for, and the objects that make it run.

One :class:`ServedDevice` ties together a backend, a virtio device model, its PCI
presentation (chosen by the profile, once, when the presentation is built) and the
libvfio-user context; :meth:`ServedDevice.run` is the one trio task tree that owns them
(the context's poll fd, the backend's tasks). What differs by device type is in two
subclasses: :class:`ServedNetDevice` (virtio-net on a network backend, the transmit pump)
and :class:`ServedBlkDevice` (virtio-blk on a raw image, the worker pool).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vfuserver.blkdev.backend import ImageBackend
from vfuserver.blkdev.raw import IoRequest, RawImage
from vfuserver.config import DEFAULT_POLL_MAX_NS
from vfuserver.context import DeviceLock, VfuContext
from vfuserver.devices.admin import AdminOwner
from vfuserver.devices.legacy_io import TransitionalFunction
from vfuserver.devices.memory import GuestMemory
from vfuserver.devices.pci import PciFunction
from vfuserver.devices.ring_journal import RingJournal
from vfuserver.devices.virtio import VirtioDevice
from vfuserver.devices.virtio_blk import BlockRequest, VirtioBlk
from vfuserver.devices.virtio_net import RX_QUEUE, VirtioNet
from vfuserver.devices.virtio_pci import VirtioPciFunction
from vfuserver.loopthread import LoopThread
from vfuserver.netdev.backend import NetBackend, NetOffloads
from vfuserver.netdev.open import open_netdev
from vfuserver.netpath import NetPathCounters, NetRun, net_path_for
from vfuserver.protocol.virtio_net import HDR_LEN
from vfuserver.server import serve_device
from vfuserver.spec import VIRTIO_BLK, DeviceSpec, check_profile

HUNG_UP_DETACH_SECONDS = 2.0
"""How long a change waits for a client that has hung up to be detached."""


class DeviceBusyError(RuntimeError):
    """The change needs the device free, and a client (a VM) is attached."""


class ServedDevice:
    """A device model behind its PCI presentation, a vfio-user socket and a backend.

    Subclasses build :attr:`model` (before calling ``__init__`` here, which presents it)
    and fill in :meth:`_run_backend`, :meth:`_close_backend` and :attr:`STATS_KEY`.
    ``poll_max_ns`` is every context's (:class:`VfuContext`), the first and those a
    profile change builds.
    """

    STATS_KEY = "device"
    """The model's counters in :meth:`stats` (``virtio_net``, ``virtio_blk``)."""
    RECEIVE_QUEUES: frozenset[int] = frozenset()
    """Queues whose ring journal is a receive queue's (devices/ring_journal.py)."""
    model: VirtioDevice
    backend: Any
    """The backend; its ``stats`` dataclass is shown by :meth:`stats`."""

    def __init__(self, spec: DeviceSpec, owner: AdminOwner, *, msix_vectors: int = 4,
                 poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        self.spec = spec
        self.poll_max_ns = poll_max_ns
        self.log = logging.getLogger(f"vfuserver.{spec.name}")
        self.owner = owner
        self.memory = self.model.memory
        self.lock = DeviceLock()
        """The model's lock (:class:`DeviceLock`): the serving thread's callbacks and
        this device's event-loop tasks take it."""
        self._loop = LoopThread()
        self.msix_vectors = msix_vectors
        self.function: PciFunction
        self.context: VfuContext
        self._build(spec.profile)
        self._journals = _attach_journals(self.model, spec.name, self.RECEIVE_QUEUES)
        self._serve_scope: trio.CancelScope | None = None
        self._switch: _Switch | None = None

    @property
    def type(self) -> str:
        return self.spec.type

    async def _bottom_half(self, due: _Due, work: Callable[[], object], what: str) -> None:
        """Run ``work`` under the device lock whenever ``due`` is set, after the event
        loop's other ready work (QEMU's bottom halves): the model's deferred work."""
        while True:
            await due.wait()
            await trio.lowlevel.checkpoint()
            try:
                with self.lock:
                    work()
            except Exception:
                self.log.exception("bug while %s", what)

    def _in_loop(self, call: Callable[[], None]) -> Callable[[], None]:
        """``call`` as a hook the model may call from the serving thread: there it is
        handed to the event loop (trio objects are not thread-safe), here it runs now."""
        def hook() -> None:
            self._loop.call(call)
        return hook

    def _build(self, profile: str) -> None:
        """The presentation for ``profile`` and the context serving it: the one place the
        profile is looked at."""
        modern = VirtioPciFunction(self.model, name=self.spec.name,
                                   msix_vectors=self.msix_vectors)
        function: PciFunction = modern
        if profile == "transitional":
            function = TransitionalFunction(modern, self.owner)
        try:
            self.context = VfuContext(self.spec.socket, function, memory=self.memory,
                                      logger=self.log, lock=self.lock,
                                      poll_max_ns=self.poll_max_ns)
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

    @property
    def session_ending(self) -> bool:
        """A client is attached, but it has hung up (its QEMU exited): the serving thread
        ends the session as soon as it sees that (:meth:`VfuContext.client_hung_up`)."""
        return self.context.client_hung_up()

    async def detached(self, timeout: float = HUNG_UP_DETACH_SECONDS) -> bool:
        """Whether no client is attached, once a client that has already hung up (a VM
        whose QEMU exited a moment ago) is detached: an operator's script that stops the
        VM and then changes the device must not depend on how soon the serving thread
        ran. A client still connected is attached; one whose session has not ended after
        ``timeout`` seconds (a callback holds the thread: :attr:`session_ending`) too."""
        if self.session_ending:
            with trio.move_on_after(timeout):
                while self.client_attached:  # (the connection's fd goes first)
                    await trio.sleep(0.005)
        return not self.client_attached

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
        self.model.reset()
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
            self.STATS_KEY: dataclasses.asdict(self.model.stats),  # type: ignore[attr-defined]
            "backend": dataclasses.asdict(self.backend.stats),
            **self.function.counters(),
            "fast_path": self.context.native.counters(),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve clients and run the backend until cancelled; the device is closed on the
        way out."""
        self._loop.capture()
        try:
            async with trio.open_nursery() as nursery:
                await self._run_backend(nursery)
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

    async def _run_backend(self, nursery: trio.Nursery) -> None:
        """Start the backend's tasks in ``nursery``."""
        raise NotImplementedError

    def _close_backend(self) -> None:
        raise NotImplementedError

    def _close_presentation(self) -> None:
        self.context.close()
        self.function.close()

    def close(self) -> None:
        """Idempotent; the final counters are logged once."""
        if not self.context.closed:
            self.log.info("stats of %s (profile %s): %s", self.spec.name, self.profile,
                          json.dumps(self.stats(), sort_keys=True))
            self._close_presentation()
        self._close_backend()
        for queue in self.model.queues:
            queue.journal = None
        for journal in self._journals:
            journal.close()
        self._journals = []


class ServedNetDevice(ServedDevice):
    """virtio-net on a network backend, with the transmit bottom half."""

    STATS_KEY = "virtio_net"
    RECEIVE_QUEUES = frozenset({RX_QUEUE})

    def __init__(self, spec: DeviceSpec, backend: NetBackend, owner: AdminOwner, *,
                 poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        self.backend = backend
        self.net = self.model = VirtioNet(GuestMemory(), _NO_INTERRUPTS, backend, mac=spec.mac,
                                          name=spec.name)
        super().__init__(spec, owner, poll_max_ns=poll_max_ns)
        self._tx_pending = _Due()
        self._wake_receiver = self._in_loop(backend.wake_receiver)
        self._schedule_tx = self._in_loop(self._request_tx)
        self._run: NetRun | None = None
        """The serving thread's data run while a client is attached (attach..detach)."""
        self._net_counters = NetPathCounters()
        """The C data path's counters, over every session."""
        self.net.on_rx_buffers = self._on_rx_buffers
        self.net.on_guest_offloads = self._apply_guest_offloads
        self.net.on_tx_pending = self._on_tx_pending

    def _build(self, profile: str) -> None:
        super()._build(profile)
        self.context.data_path = self

    def stats(self) -> dict[str, dict[str, int]]:
        """As :meth:`ServedDevice.stats`, and ``net_path``: frames the C data path moved
        and those it left to the model (vfuserver/netpath.py)."""
        with self.lock:  # what the run in C counted so far is the model's again
            return {**super().stats(), "net_path": dataclasses.asdict(self._net_counters)}

    def _request_tx(self) -> None:
        self._tx_pending.set()

    def _on_tx_pending(self) -> None:
        """The model's transmit bottom half is due (QEMU's tx bh): run by the serving
        thread right after the kicks while a client is attached, else by the event loop."""
        if self._run is not None:
            self._run.tx_due = True
            if not self.context.in_data_path():  # which looks at tx_due next
                self.context.request_data_run()
        else:
            self._schedule_tx()

    def _on_rx_buffers(self) -> None:
        """The guest posted receive buffers: whoever receives retries its held frame."""
        if self._run is not None and self._run.rx_owned:
            if not self.context.in_data_path():  # which receives next
                self.context.request_data_run()
        else:
            self._wake_receiver()

    # -- the data path on the serving thread (vfuserver.context.DataPath) ----------------

    def attach_data_path(self) -> int | None:
        fd: int | None = self.backend.take_receiver()
        # the per-frame work in C while the serving thread runs the data path, and the
        # whole run in C where the device's state allows (NetRun)
        path = net_path_for(self.net, self.backend, self.memory.lost, self._net_counters)
        if path is not None:
            self.net.tx_engine = path.transmit
        run = self._run = NetRun(self.net, self.backend, self._deliver, self.log, path,
                                 rx_owned=fd is not None)
        if run.native is not None:
            self.lock.take_back = run.take_back
            self.lock.hand_over = run.hand_over
            self.context.native.use_net_run(run.native)
        return fd

    def run_data_path(self) -> int:
        assert self._run is not None  # attached
        return self._run.run()

    def detach_data_path(self) -> None:
        run = self._run
        self.context.native.use_net_run(None)
        with self.lock:  # the model takes back what the run in C held
            self.lock.take_back = self.lock.hand_over = None
            if run is not None:
                run.finish()
            self.net.rx_busy = False  # the event loop's bottom half does not linger
        self._run = None
        self.net.tx_engine = None
        self.backend.return_receiver()
        if run is not None and (run.tx_due or run.tx_lingering):
            # the bottom half turns notifications on
            self._request_tx()

    def _apply_guest_offloads(self, offloads: int) -> None:
        """The offloads the driver negotiated or set go to the backend, as QEMU's
        virtio_net_apply_guest_offloads(): a tap then hands the guest only what it takes."""
        self.backend.set_offload(NetOffloads.from_guest_offloads(offloads))

    async def _run_backend(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.backend.run, self._deliver)
        # the transmit bottom half: runs after the kick that scheduled it was answered
        nursery.start_soon(self._bottom_half, self._tx_pending, self.net.run_tx,
                           "transmitting")

    def _close_backend(self) -> None:
        self.backend.close()

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


class ServedBlkDevice(ServedDevice):
    """virtio-blk on a raw image, its requests on the backend's worker threads."""

    STATS_KEY = "virtio_blk"

    def __init__(self, spec: DeviceSpec, backend: ImageBackend, owner: AdminOwner, *,
                 num_queues: int = 1, poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        self.backend = backend
        self.blk = self.model = VirtioBlk(GuestMemory(), _NO_INTERRUPTS, backend,
                                          num_queues=num_queues, serial=spec.serial.encode(),
                                          name=spec.name)
        super().__init__(spec, owner, msix_vectors=num_queues + 1, poll_max_ns=poll_max_ns)
        self._queues_pending = _Due()
        self.blk.on_queue_pending = self._in_loop(self._queues_pending.set)

    async def _run_backend(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.backend.run, self._complete)
        # another turn for the queues whose last one ended at a weight (devices/virtio_blk.py
        # REQUEST_WEIGHT), after the other devices' work and the control socket's
        nursery.start_soon(self._bottom_half, self._queues_pending, self.blk.run_pending,
                           "taking requests")

    def _complete(self, batch: list[IoRequest]) -> None:
        """Finished disk requests into the model: the one place the trio side touches
        the model's state (requests reach the backend from region callbacks)."""
        requests: list[BlockRequest] = batch  # type: ignore[assignment]  # what submit got
        with self.lock:
            self.blk.complete(requests)

    def _close_backend(self) -> None:
        self.backend.close()


RING_JOURNAL_ENV = "VFUSERVER_RING_JOURNAL"
"""A folder: when set, every queue keeps a ring journal there (devices/ring_journal.py),
for an outside watcher (benchmarks/c/ring_watch.c) to check the used rings against."""


def _attach_journals(model: VirtioDevice, name: str,
                     receive_queues: frozenset[int]) -> list[RingJournal]:
    folder = os.environ.get(RING_JOURNAL_ENV)
    if not folder:
        return []
    journals = []
    for queue in model.queues:
        journal = RingJournal(Path(folder) / f"{name}-q{queue.index}.journal", queue.index,
                              receive=queue.index in receive_queues)
        queue.journal = journal
        queue.publish_journal()
        journals.append(journal)
    return journals


class _Due:
    """A flag the event loop waits for: set any number of times, it wakes one wait, which
    clears it (work asked for again while it runs is run once more after)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


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


async def open_device(spec: DeviceSpec, *, owner: AdminOwner | None = None,
                      poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> ServedDevice:
    """Open the backend, then build the device; the backend is closed if that fails.

    ``owner`` is the server's admin group owner (one per process); a device opened
    without one gets a group of its own. ``poll_max_ns``: the server's polling ceiling
    (:class:`~vfuserver.context.VfuContext`). OSError (an ImageError naming the image) if a
    disk image cannot be opened.
    """
    owner = owner if owner is not None else AdminOwner()
    if spec.type == VIRTIO_BLK:
        image = RawImage(spec.image, read_only=spec.readonly, direct=spec.direct)
        disk = ImageBackend(image)
        try:
            return ServedBlkDevice(spec, disk, owner, num_queues=spec.queues,
                                   poll_max_ns=poll_max_ns)
        except BaseException:
            disk.close()
            raise
    backend = await open_netdev(spec.netdev)
    try:
        return ServedNetDevice(spec, backend, owner, poll_max_ns=poll_max_ns)
    except BaseException:
        backend.close()
        raise
