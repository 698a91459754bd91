"""The native side of one served device (``struct vfuserver_dev``, vfuserver/csrc/serve.h).

:class:`NativeDevice` owns the struct: the eventfds and locks of the serving thread, the
fast registers a function offers (:class:`vfuserver.devices.pci.FastPath`), the ISR cell the
function keeps there, and the state the model publishes for the fast path. It needs no
libvfio-user context, so the fast path can be driven and compared with the model directly
(tests/server/test_fast_path.py).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from vfuserver.binding import check, ffi, lib
from vfuserver.devices.pci import FastImage, FastKind, FastPath, FastRegister, FastState
from vfuserver.protocol.virtio_legacy import Register

_FAST_KINDS = {
    FastKind.NOTIFY: lib.VFUSERVER_FAST_NOTIFY,
    FastKind.ISR_READ: lib.VFUSERVER_FAST_ISR_READ,
    FastKind.STATUS_READ: lib.VFUSERVER_FAST_STATUS_READ,
    FastKind.LEGACY_READ: lib.VFUSERVER_FAST_LEGACY_READ,
    FastKind.LEGACY_WRITE: lib.VFUSERVER_FAST_LEGACY_WRITE,
    FastKind.CONFIG_READ: lib.VFUSERVER_FAST_CONFIG_READ,
}
_LEGACY_CONFIG_SLOT = lib.VFUSERVER_LEGACY_SLOTS - 1
_REGISTER_NAMES = {int(reg): reg.name for reg in Register}
_LEGACY_SLOT_NAMES = (
    *(_REGISTER_NAMES.get(offset, "common") for offset in range(_LEGACY_CONFIG_SLOT)),
    "device-config")
"""What the native per-register counters of legacy BAR0 count, by slot: the register at
that offset, as LegacyBar0 names its accesses (an offset inside a register: common)."""

FAST_MISS = lib.FAST_MISS

DATA_TIMER_NS = 150_000
"""How long after a run that asks for it (DATA_TIMER) the data path runs again: QEMU's
virtio-net tx timer (TX_TIMER_INTERVAL, hw/net/virtio-net.c)."""


class NativeIsr:
    """The ISR kept in the native device state, where the fast path reads and clears it
    (atomically) and the model sets it: an :class:`vfuserver.devices.pci.IsrCell`."""

    def __init__(self, dev: Any) -> None:
        self._dev = dev

    def set(self, bits: int) -> None:
        lib.vfuserver_isr_set(self._dev, bits)

    def take(self) -> int:
        return int(lib.vfuserver_isr_take(self._dev))

    def peek(self) -> int:
        return int(lib.vfuserver_isr_peek(self._dev))

    def store(self, value: int) -> None:
        lib.vfuserver_isr_store(self._dev, value)


class NativeQueueSelect:
    """The legacy QUEUE_SEL kept in the native device state, where the fast path writes
    it: a :class:`vfuserver.devices.pci.RegisterCell`."""

    def __init__(self, dev: Any) -> None:
        self._dev = dev

    def load(self) -> int:
        return int(lib.vfuserver_legacy_queue_sel_load(self._dev))

    def store(self, value: int) -> None:
        lib.vfuserver_legacy_queue_sel_store(self._dev, value)


class NativeDevice:
    """``struct vfuserver_dev`` and what is done with it from Python.

    ``handle``: the ffi handle the libvfio-user callbacks find their context by (NULL for
    none). ``direct``: the serving thread answers the whole region accesses the fast path
    takes without libvfio-user (serve.c vfuserver_direct). Times are in seconds. Errors:
    OSError if the eventfds cannot be created.
    """

    def __init__(self, handle: Any = ffi.NULL, *, poll_max_ns: int = 0,
                 message_timeout: float = 5.0, reply_timeout: float = 5.0,
                 direct: bool = True) -> None:
        self.dev: Any = ffi.new("struct vfuserver_dev *")
        self.dev.handle = handle
        self.dev.direct_enabled = direct
        self.dev.poll_max_ns = poll_max_ns
        self.dev.message_timeout_ns = int(message_timeout * 1e9)
        self.dev.reply_timeout_ms = int(reply_timeout * 1e3)
        check(lib.vfuserver_dev_init(self.dev), "eventfd")
        self.live = True
        self.function: FastPath | None = None
        self.registers: list[FastRegister] = []
        self._published: FastState | None = None
        self._image: Any = ffi.new("struct vfuserver_image *")

    def install(self, function: object) -> bool:
        """Take ``function``'s fast registers and ISR, if it offers a fast path; the fast
        path stays off until the first :meth:`publish`."""
        if not isinstance(function, FastPath):
            return False
        registers = list(function.fast_registers())
        if len(registers) > lib.VFUSERVER_FAST_REGS:
            raise ValueError(f"{len(registers)} fast registers, at most "
                             f"{lib.VFUSERVER_FAST_REGS}")
        for slot, reg in zip(self.dev.regs, registers, strict=False):
            slot.region = lib.VFU_PCI_DEV_BAR0_REGION_IDX + reg.bar
            slot.offset = reg.offset
            slot.width = reg.width
            slot.is_write = reg.is_write
            slot.kind = _FAST_KINDS[reg.kind]
            slot.legacy = reg.legacy
        self.dev.nregs = len(registers)
        function.use_isr(NativeIsr(self.dev))
        function.use_legacy_queue_select(NativeQueueSelect(self.dev))
        self.function = function
        self.registers = registers
        return True

    def publish(self) -> None:
        """Copy the function's fast state to the native side (the caller holds the
        device lock), and turn the fast path on."""
        if self.function is None or not self.live:
            return
        function = self.function
        state = function.fast_state()
        if state != self._published:  # most releases change none of it
            if self._published is None or state.image_key != self._published.image_key:
                self._publish_image(function.fast_image())
            self._published = state
            lib.vfuserver_publish(self.dev, state.status, state.io_enabled, state.settled,
                                  state.active_queues, 1)

    def _publish_image(self, image: FastImage) -> None:
        """Copy ``image`` to the native side (under its seqlock). A config larger than
        the native copy, or queues beyond it, are left to the model."""
        out = self._image
        fits = len(image.config) <= lib.VFUSERVER_IMAGE_CONFIG
        out.config_len = len(image.config) if fits else 0
        if fits:
            ffi.memmove(out.config, image.config, len(image.config))
        legacy = image.legacy
        out.legacy = legacy is not None
        if legacy is not None:
            out.legacy_config_offset = legacy.config_offset
            out.legacy_bus_master = legacy.bus_master
            out.legacy_absent_vectors = legacy.absent_vectors
            out.legacy_host_features = legacy.host_features
            out.legacy_guest_features = legacy.guest_features
            out.legacy_config_vector = legacy.config_vector
            out.legacy_queues = legacy.queue_count
            for index, (pfn, num, vector) in enumerate(
                    legacy.queues[: lib.VFUSERVER_IMAGE_QUEUES]):
                out.legacy_queue_pfn[index] = pfn
                out.legacy_queue_num[index] = num
                out.legacy_queue_vector[index] = vector
        lib.vfuserver_publish_image(self.dev, out)

    def access(self, region: int, offset: int, data: bytes | int, is_write: bool,
               ) -> bytes | None:
        """One access through the fast path alone, as a region trampoline makes it:
        the bytes read (or written), or None where the model must answer."""
        size = len(data) if isinstance(data, bytes) else data
        buf = ffi.new("char[]", data if isinstance(data, bytes) else size)
        result = lib.fast_access(self.dev, region, buf, size, offset, is_write)
        if result == FAST_MISS:
            return None
        return bytes(ffi.buffer(buf, size))

    @property
    def kick_fd(self) -> int:
        return int(self.dev.notify_fd)

    def take_kicks(self) -> list[int]:
        """The queues kicked on the fast path since the last call, in index order."""
        if not self.dev.inline_kicks:
            with contextlib.suppress(BlockingIOError):  # reset the eventfd before taking
                os.eventfd_read(self.dev.notify_fd)
        queues = int(lib.vfuserver_take_notifies(self.dev))
        kicked = []
        while queues:
            kicked.append((queues & -queues).bit_length() - 1)
            queues &= queues - 1
        return kicked

    def start_data_path(self, fd: int | None) -> None:
        """Before a serving thread starts: it runs the kicks (vfuserver_data_cb) and polls
        ``fd`` for the data path's input (None: no input of its own)."""
        dev = self.dev
        dev.data_fd = -1 if fd is None else fd
        dev.data_armed = 1
        dev.data_again = 0
        dev.data_deadline = 0
        dev.data_timer_ns = DATA_TIMER_NS
        dev.inline_kicks = 1

    def stop_data_path(self) -> None:
        """After the serving thread returned: kicks go to the event loop again."""
        dev = self.dev
        dev.inline_kicks = 0
        dev.data_fd = -1
        dev.data_armed = 0
        dev.data_again = 0
        dev.data_deadline = 0

    def use_net_run(self, run: Any) -> None:
        """The data run serve.c tries before vfuserver_data_cb: a ``struct
        vfuserver_net_run *`` (vfuserver/netpath.py NetRun), or None. Only while no
        serving thread runs."""
        self.dev.net_run = ffi.NULL if run is None else run

    def request_data_run(self) -> None:
        """Have the serving thread call the data path soon (from any thread)."""
        if self.live:
            lib.vfuserver_request_data(self.dev)

    def counters(self) -> dict[str, int]:
        """The serving thread's counters, and the fast path's by register name."""
        dev = self.dev
        out = {"messages": int(dev.messages), "wakeups": int(dev.wakeups),
               "polled": int(dev.polled), "kick_signals": int(dev.kicks),
               "interrupts": int(dev.interrupts),
               "data_path_runs": int(dev.data_runs), "direct": int(dev.direct)}
        for slot, reg in zip(dev.regs, self.registers, strict=False):
            out[f"fast:{reg.name}"] = int(slot.count)
        for verb, counts in (("read", dev.legacy_fast_reads), ("write", dev.legacy_fast_writes)):
            for name, count in zip(_LEGACY_SLOT_NAMES, counts, strict=True):
                if count:
                    key = f"fast:legacy-{verb}:{name}"
                    out[key] = out.get(key, 0) + int(count)
        return out

    def close(self) -> None:
        """Close the eventfds (idempotent); the counters stay readable."""
        if self.live:
            self.live = False
            lib.vfuserver_dev_destroy(self.dev)
