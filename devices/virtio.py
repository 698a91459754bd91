"""The virtio device core (virtio 1.x §2, §3): features, status, config space, queues.

This is the transport-independent half of a virtio device, like QEMU's
hw/virtio/virtio.c: it knows nothing of PCI. A transport (modern virtio-pci, or the legacy
IO BAR) maps its registers onto :class:`VirtioDevice` methods and programs the
:class:`VirtQueue` fields; the device raises interrupts through the transport's
:class:`VirtioInterrupts`. Device types subclass :class:`VirtioDevice` and fill in the
``_``-prefixed hooks.

Legacy mode (``legacy = True``, chosen by the transport that drives the device) follows
the spec's legacy notes (content.tex "Legacy Interface: ..."): only feature bits 0-31 are
visible and acceptable, features take effect when written (no FEATURES_OK step), the
driver may use queues before DRIVER_OK and VERSION_1 is never negotiated.

Errors have a direction: whatever the guest does wrong while the device works for it
(a bad ring, a bad buffer) becomes :meth:`VirtioDevice.needs_reset`, QEMU's virtio_error:
the device stops processing, sets NEEDS_RESET, raises a configuration interrupt and logs
one rate-limited line. Register accesses that cannot be answered raise :class:`GuestError`
for the transport to report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from vfuserver.devices.errors import GuestError
from vfuserver.devices.memory import GuestMemory
from vfuserver.devices.virtqueue import VirtQueue
from vfuserver.protocol.virtio import DeviceStatus, Feature

LEGACY_FEATURE_MASK = 0xFFFF_FFFF
"""A legacy driver sees and accepts feature bits 0-31 only."""
LEGACY_ONLY_FEATURES = Feature.ANY_LAYOUT.mask | Feature.NOTIFY_ON_EMPTY.mask
"""Bits that only mean something to legacy drivers; hidden from modern ones (QEMU
VirtioDeviceClass.legacy_features)."""

_log = logging.getLogger(__name__)


class VirtioInterrupts(Protocol):
    """How the device interrupts the driver; implemented by the transport."""

    def queue_interrupt(self, queue: VirtQueue) -> None:
        """Used buffers on ``queue``: raise its MSI-X vector, or ISR bit 0 + INTx."""
        ...

    def config_interrupt(self) -> None:
        """Configuration change (or NEEDS_RESET): config vector, or ISR bit 1 + INTx."""
        ...


_DRIVER_OK = int(DeviceStatus.DRIVER_OK)  # a plain int: IntFlag operations cost µs


class RateLimitedLog:
    """At most ``burst`` messages per ``interval`` seconds; then a count of the suppressed.

    One per device (STYLE 12: state on instances), so one noisy guest cannot flood the log
    nor silence another device's messages.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._window_start = -interval
        self._in_window = 0
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> bool:
        """Log like ``logger.log`` unless over the limit; True if it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._in_window = 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        if self.suppressed:
            msg = f"{msg} (%d similar messages suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.log(level, msg, *args)
        return True


class VirtioDevice:
    """A virtio device: features, status, device config and virtqueues (no transport).

    Subclasses set :attr:`device_id`, pass their feature set and queue count to
    ``__init__`` and implement the hooks: ``_config_bytes``, ``_write_config``,
    ``_handle_queue``, ``_validate_features``, ``_features_changed``, ``_driver_ok`` and
    ``_reset_device``.
    """

    device_id: int = 0
    """Virtio device type (:class:`vfuserver.protocol.virtio.DeviceType`); 0 = reserved."""
    legacy_only_features: int = LEGACY_ONLY_FEATURES
    bad_features: int = 0
    """What a legacy driver that accepts VIRTIO_F_BAD_FEATURE gets instead of what it
    wrote (QEMU VirtioDeviceClass.bad_features, used by virtio_ioport_write)."""

    def __init__(
        self,
        memory: GuestMemory,
        interrupts: VirtioInterrupts,
        *,
        queue_max_size: int = 256,
        name: str = "virtio",
        num_queues: int = 0,
        features: int = 0,
    ) -> None:
        self.memory = memory
        self.interrupts = interrupts
        self.name = name
        self.host_features = features | Feature.VERSION_1.mask
        """Everything the device can do; :attr:`device_features` is the mode's view of it."""
        self.queues: list[VirtQueue] = [
            VirtQueue(memory, index, queue_max_size) for index in range(num_queues)
        ]
        self.legacy = False
        """Driven through the legacy interface; set by the transport before the driver
        starts (at construction or while the device is reset)."""
        self.status = 0
        self.driver_features = 0
        """What the driver wrote to the driver feature words (read back by transports)."""
        self.negotiated_features = 0
        """Features in effect: set at FEATURES_OK (modern) or on each write (legacy)."""
        self.config_generation = 0
        self.config_revision = 0
        """Bumped whenever the bytes :meth:`read_config` returns may have changed (what a
        copy of them, e.g. a fast path's, compares); unlike :attr:`config_generation`
        the driver never sees it."""
        self.broken = False
        """Set by :meth:`needs_reset`; cleared by reset. Nothing is processed meanwhile."""
        self.log = logging.getLogger(f"{_log.name}.{name}")
        self.ratelimited = RateLimitedLog(self.log)
        """For the device's own chatter; :meth:`needs_reset` has a limiter of its own so
        that chatter can never hide why the device stopped."""
        self._reset_log = RateLimitedLog(self.log)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} status={self.status:#x}>"

    # -- features (§2.2) --------------------------------------------------------------

    @property
    def device_features(self) -> int:
        """The feature bits the driver sees in the current mode."""
        if self.legacy:
            return self.host_features & LEGACY_FEATURE_MASK
        return self.host_features & ~self.legacy_only_features

    def has_feature(self, bit: int) -> bool:
        """Whether feature ``bit`` has been negotiated."""
        return bool(self.negotiated_features >> bit & 1)

    def get_device_features(self, select: int) -> int:
        """32-bit word ``select`` of the device features (0 beyond the 64 bits)."""
        if not 0 <= select <= 1:
            return 0
        return (self.device_features >> (32 * select)) & 0xFFFF_FFFF

    def set_driver_features(self, select: int, value: int) -> None:
        """The driver wrote 32-bit word ``select`` of the features it accepts."""
        value &= 0xFFFF_FFFF
        if self.legacy:
            # Legacy: one 32-bit word, in effect at once; bits the device does not offer
            # are dropped (QEMU virtio_set_features_nocheck).
            if select != 0:
                return
            self.driver_features = value
            self._apply_features(value & self.device_features)
            return
        if self.status & DeviceStatus.FEATURES_OK:
            # §3.1.1: features are fixed once FEATURES_OK is set; QEMU ignores the write.
            self.log.debug("%s: driver features written after FEATURES_OK ignored", self.name)
            return
        if not 0 <= select <= 1:
            return
        shift = 32 * select
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _feature_problem(self, features: int) -> str | None:
        """Why the device refuses FEATURES_OK for ``features``, or None to accept."""
        unknown = features & ~self.device_features
        if unknown:
            return f"driver accepted features {unknown:#x} the device does not offer"
        if not features & Feature.VERSION_1.mask:
            return "driver did not accept VERSION_1 through the modern interface"
        return self._validate_features(features)

    def _apply_features(self, features: int) -> None:
        self.negotiated_features = features
        self.config_revision += 1  # a device's config may follow its features
        event_idx = bool(features & Feature.RING_EVENT_IDX.mask)
        for queue in self.queues:
            queue.event_idx = event_idx
            queue.publish_journal()
        self._features_changed()

    # -- status (§2.1, §3.1) ----------------------------------------------------------

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & _DRIVER_OK)

    def set_status(self, value: int) -> None:
        """The driver wrote the device status; 0 resets the device."""
        value = int(value) & 0xFF  # stored as a plain int (see _DRIVER_OK)
        if value == 0:
            self.reset()
            return
        old = self.status
        # NEEDS_RESET belongs to the device; the driver MUST NOT clear bits (§2.1.1), so
        # bits once set stay until reset. A legacy driver's value is stored as written,
        # cleared bits too (QEMU virtio_set_status).
        new = value if self.legacy else (value & ~DeviceStatus.NEEDS_RESET) | old
        if not self.legacy and new & ~old & DeviceStatus.FEATURES_OK:
            problem = self._feature_problem(self.driver_features)
            if problem is None:
                self._apply_features(self.driver_features)
            else:
                # §3.1.1: the device leaves FEATURES_OK clear; the driver re-reads it.
                self.ratelimited.log(
                    logging.INFO, "%s: FEATURES_OK refused: %s", self.name, problem
                )
                new &= ~DeviceStatus.FEATURES_OK
        self.status = int(new)  # a plain int (see _DRIVER_OK)
        if new & ~old & DeviceStatus.DRIVER_OK:
            if not self.legacy and not new & DeviceStatus.FEATURES_OK:
                self.needs_reset("driver set DRIVER_OK without FEATURES_OK")
                return
            self._driver_ok()

    def reset(self) -> None:
        """Device reset (status 0, or a transport-level reset)."""
        self.status = 0
        self.driver_features = 0
        self.negotiated_features = 0
        self.config_revision += 1
        self.broken = False
        for queue in self.queues:
            queue.reset()
        self._reset_device()

    def may_process(self) -> bool:
        """Whether queue work is allowed now: modern drivers first set DRIVER_OK, legacy
        ones may use queues before it (content.tex "Legacy Interface: Device
        Initialization")."""
        if self.broken:
            return False
        return self.legacy or self.driver_ok

    # -- errors -----------------------------------------------------------------------

    def needs_reset(self, reason: str) -> None:
        """The guest broke the device: stop, set NEEDS_RESET, tell the driver, log once.

        QEMU virtio_error. A legacy driver knows no NEEDS_RESET, so in legacy mode the
        device just stops (QEMU does the same).
        """
        if self.broken:
            return
        self.broken = True
        self._reset_log.log(logging.WARNING, "%s: device needs reset: %s", self.name, reason)
        if not self.legacy:
            self.status |= int(DeviceStatus.NEEDS_RESET)
            self.config_changed()

    # -- device configuration (§2.5) --------------------------------------------------

    @property
    def config_size(self) -> int:
        """Bytes of device-specific configuration."""
        return len(self._config_bytes())

    @property
    def legacy_config_size(self) -> int:
        """Bytes of it a legacy IO BAR exposes after the 20/24-byte common header (the
        BAR's size follows); by default all of them (QEMU's config_len)."""
        return self.config_size

    def _check_config_range(self, offset: int, size: int, what: str) -> None:
        limit = self.config_size
        if offset < 0 or size <= 0 or offset + size > limit:
            raise GuestError(
                f"{self.name}: config {what} of {size} bytes at {offset:#x} is outside "
                f"the {limit}-byte device configuration"
            )

    def read_config(self, offset: int, size: int) -> bytes:
        """Read device configuration bytes; GuestError if out of range."""
        self._check_config_range(offset, size, "read")
        return self._config_bytes()[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Write device configuration bytes; GuestError if out of range. What a write to
        a read-only field does is up to the device (usually nothing)."""
        self._check_config_range(offset, len(data), "write")
        self._write_config(offset, bytes(data))
        self.config_revision += 1

    def config_updated(self) -> None:
        """The device changed its configuration without telling the driver (no new
        generation, no interrupt: QEMU's VIRTIO_NET_CTRL_MAC_ADDR_SET)."""
        self.config_revision += 1

    def config_changed(self, *, interrupt: bool = True) -> None:
        """The device changed its configuration: new generation, and a configuration
        interrupt once the driver is ready for interrupts (QEMU virtio_notify_config)."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.config_revision += 1
        if interrupt and self.driver_ok:
            self.interrupts.config_interrupt()

    # -- queues -----------------------------------------------------------------------

    def active_queues(self) -> int:
        """Bit n set: a kick of queue n has work to do now (:meth:`notify` ignores the
        others); what a fast path needs to know to drop the rest."""
        if self.broken or not (self.legacy or self.status & _DRIVER_OK):
            return 0  # not may_process(), inlined: this runs on every release of the lock
        mask = 0
        for queue in self.queues:
            if queue.enabled:
                mask |= 1 << queue.index
        return mask

    def notify(self, queue_index: int) -> None:
        """The driver kicked queue ``queue_index``. Never raises for guest mistakes."""
        if not 0 <= queue_index < len(self.queues):
            self.log.debug("%s: notify for absent queue %d ignored", self.name, queue_index)
            return
        queue = self.queues[queue_index]
        if not queue.enabled or not self.may_process():
            return
        try:
            self._handle_queue(queue)
        except GuestError as err:
            self.needs_reset(str(err))

    def queue_interrupt(self, queue: VirtQueue) -> None:
        """Interrupt the driver for used buffers on ``queue``."""
        self.interrupts.queue_interrupt(queue)

    # -- hooks for device types ---------------------------------------------------------

    def _config_bytes(self) -> bytes:
        """The device-specific configuration as the driver currently sees it."""
        return b""

    def _write_config(self, offset: int, data: bytes) -> None:
        """A driver write inside the configuration (already bounds-checked)."""
        self.log.debug("%s: config write at %#x ignored", self.name, offset)

    def _validate_features(self, features: int) -> str | None:
        """Device-type checks on the features a modern driver accepted."""
        return None

    def _features_changed(self) -> None:
        """:attr:`negotiated_features` changed."""

    def _driver_ok(self) -> None:
        """The driver set DRIVER_OK."""

    def _handle_queue(self, queue: VirtQueue) -> None:
        """Process a kicked queue; raise GuestError for guest mistakes."""

    def _reset_device(self) -> None:
        """Reset device-type state (called from :meth:`reset`)."""
