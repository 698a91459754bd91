"""The virtio device core: features, status machine, config space, notify, needs_reset."""

from __future__ import annotations

import logging

import pytest

from tests.devices.driver import (
    STATUS_ACK_DRIVER,
    DriverQueue,
    GuestRam,
    RecordingInterrupts,
    driver_ok,
    negotiate_legacy,
    negotiate_modern,
)
from vfuserver.devices.errors import GuestError
from vfuserver.devices.virtio import RateLimitedLog, VirtioDevice
from vfuserver.devices.virtqueue import VirtQueue, VirtQueueError
from vfuserver.protocol.virtio import DeviceStatus, Feature

F_DEMO = 1 << 3
F_DEMO_HIGH = 1 << 40


class EchoDevice(VirtioDevice):
    """A minimal device type: one queue that echoes readable bytes into writable ones,
    4 bytes of config of which byte 3 is writable."""

    device_id = 0x7E

    def __init__(self, ram: GuestRam, irqs: RecordingInterrupts) -> None:
        super().__init__(ram.memory, irqs, queue_max_size=16, name="echo", num_queues=1,
                         features=F_DEMO | F_DEMO_HIGH | Feature.RING_EVENT_IDX.mask
                         | Feature.ANY_LAYOUT.mask)
        self.config = bytearray(b"\x01\x02\x03\x04")
        self.features_seen: list[int] = []
        self.driver_ok_calls = 0
        self.resets = 0

    def _config_bytes(self) -> bytes:
        return bytes(self.config)

    def _write_config(self, offset: int, data: bytes) -> None:
        if offset <= 3 < offset + len(data):
            self.config[3] = data[3 - offset]

    def _features_changed(self) -> None:
        self.features_seen.append(self.negotiated_features)

    def _driver_ok(self) -> None:
        self.driver_ok_calls += 1

    def _reset_device(self) -> None:
        self.resets += 1

    def _handle_queue(self, queue: VirtQueue) -> None:
        while (chain := queue.pop()) is not None:
            data = chain.read()
            if data == b"guest-error":
                raise GuestError("guest sent a bad request")
            queue.push(chain, chain.write(data))
        if queue.flush():
            self.queue_interrupt(queue)


@pytest.fixture
def ram() -> GuestRam:
    return GuestRam()


@pytest.fixture
def irqs() -> RecordingInterrupts:
    return RecordingInterrupts()


@pytest.fixture
def dev(ram: GuestRam, irqs: RecordingInterrupts) -> EchoDevice:
    return EchoDevice(ram, irqs)


def running(dev: EchoDevice, ram: GuestRam) -> DriverQueue:
    negotiate_modern(dev)
    queue = DriverQueue(ram, dev.queues[0], event_idx=dev.has_feature(Feature.RING_EVENT_IDX))
    driver_ok(dev)
    return queue


# -- features -----------------------------------------------------------------------------


def test_modern_feature_words(dev: EchoDevice) -> None:
    low = F_DEMO | Feature.RING_EVENT_IDX.mask
    assert dev.get_device_features(0) == low, "ANY_LAYOUT is legacy-only"
    assert dev.get_device_features(1) == (F_DEMO_HIGH | Feature.VERSION_1.mask) >> 32
    assert dev.get_device_features(2) == 0


def test_legacy_feature_words(dev: EchoDevice) -> None:
    dev.legacy = True
    assert dev.get_device_features(0) == (
        F_DEMO | Feature.RING_EVENT_IDX.mask | Feature.ANY_LAYOUT.mask)
    assert dev.get_device_features(1) == 0, "no VERSION_1 nor other high bits"


def test_modern_negotiation(dev: EchoDevice) -> None:
    accepted = negotiate_modern(dev, F_DEMO | Feature.VERSION_1.mask)
    assert dev.status == STATUS_ACK_DRIVER | DeviceStatus.FEATURES_OK
    assert dev.negotiated_features == accepted == F_DEMO | Feature.VERSION_1.mask
    assert dev.features_seen == [accepted]
    assert dev.has_feature(3) and not dev.has_feature(Feature.RING_EVENT_IDX)


def test_features_take_effect_only_at_features_ok(dev: EchoDevice) -> None:
    dev.set_status(STATUS_ACK_DRIVER)
    dev.set_driver_features(0, F_DEMO)
    dev.set_driver_features(1, Feature.VERSION_1.mask >> 32)
    assert dev.driver_features == F_DEMO | Feature.VERSION_1.mask
    assert dev.negotiated_features == 0
    dev.set_status(STATUS_ACK_DRIVER | DeviceStatus.FEATURES_OK)
    assert dev.negotiated_features == F_DEMO | Feature.VERSION_1.mask


@pytest.mark.parametrize(
    ("features", "why"),
    [
        pytest.param(F_DEMO, "did not accept VERSION_1", id="no-version-1"),
        pytest.param(Feature.VERSION_1.mask | 1 << 5, "does not offer", id="unknown-bit"),
        pytest.param(Feature.VERSION_1.mask | Feature.ANY_LAYOUT.mask, "does not offer",
                     id="legacy-only-bit"),
    ],
)
def test_features_ok_refused(dev: EchoDevice, caplog: pytest.LogCaptureFixture, features: int,
                             why: str) -> None:
    dev.set_status(STATUS_ACK_DRIVER)
    dev.set_driver_features(0, features & 0xFFFF_FFFF)
    dev.set_driver_features(1, features >> 32)
    with caplog.at_level(logging.INFO):
        dev.set_status(STATUS_ACK_DRIVER | DeviceStatus.FEATURES_OK)
    assert not dev.status & DeviceStatus.FEATURES_OK
    assert dev.negotiated_features == 0
    assert why in caplog.text


def test_features_fixed_after_features_ok(dev: EchoDevice) -> None:
    negotiate_modern(dev, F_DEMO | Feature.VERSION_1.mask)
    dev.set_driver_features(0, 0)
    assert dev.driver_features == F_DEMO | Feature.VERSION_1.mask
    assert dev.negotiated_features == F_DEMO | Feature.VERSION_1.mask


def test_legacy_negotiation(dev: EchoDevice, ram: GuestRam) -> None:
    accepted = negotiate_legacy(dev)
    assert dev.negotiated_features == accepted == dev.get_device_features(0)
    assert not dev.has_feature(Feature.VERSION_1)
    assert dev.features_seen == [accepted], "in effect as soon as written"
    # bits the device does not offer, and the high word, are dropped
    dev.set_driver_features(0, 0xFFFF_FFFF)
    assert dev.negotiated_features == dev.get_device_features(0)
    dev.set_driver_features(1, 1)
    assert not dev.has_feature(Feature.VERSION_1)
    assert dev.queues[0].event_idx


def test_legacy_queue_used_before_driver_ok(dev: EchoDevice, ram: GuestRam) -> None:
    negotiate_legacy(dev, F_DEMO)
    drv = DriverQueue(ram, dev.queues[0], contiguous=True)
    drv.add([b"early"], [8])
    dev.notify(0)
    [used] = drv.get_used()
    assert used.data == b"early"


def test_modern_queue_waits_for_driver_ok(dev: EchoDevice, ram: GuestRam) -> None:
    negotiate_modern(dev)
    drv = DriverQueue(ram, dev.queues[0])
    drv.add([b"early"], [8])
    dev.notify(0)
    assert drv.get_used() == []
    driver_ok(dev)
    dev.notify(0)
    assert [u.data for u in drv.get_used()] == [b"early"]


# -- status -------------------------------------------------------------------------------


def test_status_bits_are_sticky_until_reset(dev: EchoDevice, ram: GuestRam) -> None:
    running(dev, ram)
    dev.set_status(DeviceStatus.ACKNOWLEDGE)
    assert dev.status & DeviceStatus.DRIVER_OK
    assert dev.driver_ok_calls == 1


def test_driver_cannot_set_needs_reset(dev: EchoDevice) -> None:
    dev.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.NEEDS_RESET)
    assert dev.status == DeviceStatus.ACKNOWLEDGE


def test_failed_is_recorded(dev: EchoDevice) -> None:
    dev.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.FAILED)
    assert dev.status & DeviceStatus.FAILED


def test_writing_zero_resets(dev: EchoDevice, ram: GuestRam) -> None:
    drv = running(dev, ram)
    drv.add([b"x"], [1])
    dev.notify(0)
    resets = dev.resets
    dev.set_status(0)
    assert (dev.status, dev.driver_features, dev.negotiated_features) == (0, 0, 0)
    assert dev.resets == resets + 1
    queue = dev.queues[0]
    assert (queue.enabled, queue.last_avail_idx, queue.used_idx, queue.size) == (False, 0, 0, 16)


def test_driver_ok_without_features_ok_needs_reset(dev: EchoDevice, irqs: RecordingInterrupts,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    dev.set_status(STATUS_ACK_DRIVER)
    dev.set_status(STATUS_ACK_DRIVER | DeviceStatus.DRIVER_OK)
    assert dev.status & DeviceStatus.NEEDS_RESET
    assert dev.driver_ok_calls == 0
    assert "DRIVER_OK without FEATURES_OK" in caplog.text


# -- config space -------------------------------------------------------------------------


def test_config_read(dev: EchoDevice) -> None:
    assert dev.config_size == 4
    assert dev.read_config(0, 4) == b"\x01\x02\x03\x04"
    assert dev.read_config(2, 1) == b"\x03"


@pytest.mark.parametrize(("offset", "size"), [(4, 1), (3, 2), (-1, 1), (0, 0), (0, 5)])
def test_config_read_out_of_range(dev: EchoDevice, offset: int, size: int) -> None:
    with pytest.raises(GuestError, match="outside the 4-byte device configuration"):
        dev.read_config(offset, size)


def test_config_write(dev: EchoDevice) -> None:
    dev.write_config(2, b"\xaa\xbb")
    assert dev.read_config(0, 4) == b"\x01\x02\x03\xbb"
    with pytest.raises(GuestError):
        dev.write_config(3, b"\x00\x00")


def test_config_generation_and_interrupt(dev: EchoDevice, ram: GuestRam,
                                         irqs: RecordingInterrupts) -> None:
    generation = dev.config_generation
    dev.config_changed()
    assert dev.config_generation == generation + 1
    assert irqs.config == 0, "no interrupts before DRIVER_OK"
    running(dev, ram)
    dev.config_changed()
    assert irqs.config == 1
    dev.config_generation = 0xFF
    dev.config_changed(interrupt=False)
    assert dev.config_generation == 0 and irqs.config == 1


# -- notify and errors -------------------------------------------------------------------


def test_notify_processes_and_interrupts(dev: EchoDevice, ram: GuestRam,
                                         irqs: RecordingInterrupts) -> None:
    drv = running(dev, ram)
    drv.add([b"ping"], [16])
    dev.notify(0)
    assert [u.data for u in drv.get_used()] == [b"ping"]
    assert irqs.queue == [0]


@pytest.mark.parametrize("index", [-1, 1, 0xFFFF])
def test_notify_absent_queue_is_ignored(dev: EchoDevice, ram: GuestRam, index: int) -> None:
    running(dev, ram)
    dev.notify(index)
    assert not dev.broken


def test_notify_disabled_queue_is_ignored(dev: EchoDevice, ram: GuestRam) -> None:
    negotiate_modern(dev)
    driver_ok(dev)
    dev.notify(0)
    assert not dev.broken


def test_guest_error_becomes_needs_reset(dev: EchoDevice, ram: GuestRam,
                                         irqs: RecordingInterrupts,
                                         caplog: pytest.LogCaptureFixture) -> None:
    drv = running(dev, ram)
    drv.add([b"guest-error"], [16])
    dev.notify(0)
    assert dev.status & DeviceStatus.NEEDS_RESET
    assert dev.broken
    assert irqs.config == 1
    assert [r.getMessage() for r in caplog.records] == [
        "echo: device needs reset: guest sent a bad request"]
    # while broken nothing is processed and nothing more is logged
    drv.add([b"ping"], [16])
    dev.notify(0)
    dev.needs_reset("again")
    assert drv.get_used() == []
    assert irqs.config == 1 and len(caplog.records) == 1
    # reset recovers
    dev.set_status(0)
    assert not dev.broken and dev.status == 0


def test_needs_reset_in_legacy_mode_just_stops(dev: EchoDevice, ram: GuestRam,
                                               irqs: RecordingInterrupts) -> None:
    negotiate_legacy(dev)
    driver_ok(dev)
    dev.needs_reset("broken ring")
    assert dev.broken
    assert not dev.status & DeviceStatus.NEEDS_RESET, "legacy drivers know no NEEDS_RESET"
    assert irqs.config == 0


def test_virtqueue_error_is_a_guest_error() -> None:
    assert issubclass(VirtQueueError, GuestError)


# -- rate-limited log ---------------------------------------------------------------------


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("test.ratelimit"), burst=2, interval=10.0,
                         clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        results = [log.log(logging.WARNING, "message %d", i) for i in range(5)]
        assert results == [True, True, False, False, False]
        now[0] = 10.0
        assert log.log(logging.WARNING, "later")
    assert [r.getMessage() for r in caplog.records] == [
        "message 0", "message 1", "later (3 similar messages suppressed)"]


def test_rate_limited_log_skips_disabled_levels(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("test.ratelimit.debug"), burst=1)
    with caplog.at_level(logging.INFO):
        assert not log.log(logging.DEBUG, "noise")
        assert log.log(logging.INFO, "kept")
