"""The native fast path and the model give the same answers and leave the same state.

Two identical transitional virtio-net functions (tests/devices/legacy_driver.Rig: a real
VirtioNet, the real modern function, AdminOwner and presentation) are brought to the same
device state. Then one access is made to each: on one through the fast path first
(vfuserver/csrc/serve.h ``fast_access``, as the region trampolines call it; a miss goes on
to the model, and kicks the fast path recorded are run by the model, as the server's event
loop runs them), on the other through the model alone, i.e. for BAR0 one virtio admin
command. Every register of both BARs near the fast ones, every width, reads and writes, in
every state below: the answers (bytes, or the errno) and the state afterwards (device
status and mode, ISR, queues, frames sent) must be equal, and the fast path must have
served what it claims to serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.devices.driver import DriverQueue
from tests.devices.legacy_driver import MAC, LegacyRig, Rig
from tests.devices.test_virtio_blk import Rig as BlkRig
from tests.devices.test_virtio_blk import make_image
from vfuserver.devices.errors import GuestError
from vfuserver.devices.virtio_pci import MODERN_BAR, Layout
from vfuserver.native import NativeDevice
from vfuserver.protocol.virtio import DeviceStatus
from vfuserver.protocol.virtio_legacy import Register
from vfuserver.protocol.virtio_net import NetFeature
from vfuserver.protocol.virtio_pci import CommonCfgRegister as Common

FRAME = b"\xff" * 6 + MAC + b"\x08\x06" + bytes(46)


class FastPathOf:
    """BAR accesses to ``rig``'s function that try the native fast path first, as the
    server's do (a miss goes to the model; the lock's release publishes)."""

    def __init__(self, rig: LegacyRig) -> None:
        self.rig = rig
        self.native = NativeDevice()
        assert self.native.install(rig.fn)
        self.native.publish()
        self.served: list[tuple[int, int, int, bool]] = []

    def access(self, bar: int, offset: int, data: bytes | int, is_write: bool) -> bytes:
        fast = self.native.access(bar, offset, data, is_write)
        if fast is not None:
            self.served.append((bar, offset, len(fast), is_write))
            for queue in self.native.take_kicks():
                self.rig.fn.kick(queue)
            self.native.publish()
            return fast
        try:
            return model_access(self.rig, bar, offset, data, is_write)
        finally:
            self.native.publish()  # what releasing the device lock does


class FastRig(Rig):
    """A Rig whose BAR accesses try the native fast path first, as the server's do."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = FastPathOf(self)
        self.native = self.fast.native
        self.served = self.fast.served

    def access(self, bar: int, offset: int, data: bytes | int, is_write: bool) -> bytes:
        return self.fast.access(bar, offset, data, is_write)


def model_access(rig: LegacyRig, bar: int, offset: int, data: bytes | int,
                 is_write: bool) -> bytes:
    region = {b.index: b.region for b in rig.fn.bars()}[bar]
    if is_write:
        assert isinstance(data, bytes)
        region.write(offset, data)
        return data
    assert isinstance(data, int)
    return region.read(offset, data)


def answer(call: Callable[..., bytes], *args: Any) -> tuple[str, Any]:
    try:
        return ("ok", call(*args))
    except GuestError as exc:
        return ("error", exc.errno)


def device_state(rig: LegacyRig) -> dict[str, Any]:
    """What any device behind a transitional function looks like to both interfaces."""
    dev, transport = rig.modern.device, rig.modern.transport
    return {
        "status": dev.status,
        "legacy": dev.legacy,
        "isr": transport.isr,
        "features": dev.driver_features,
        "queues": [(q.enabled, q.desc_addr, q.last_avail_idx, q.size, q.msix_vector)
                   for q in dev.queues],
        "queue_sel": rig.fn.member.queue_select,
        "vectors": (transport.config_msix_vector, dict(transport.absent_queue_vectors)),
        "config": dev.read_config(0, dev.config_size),
        "command": rig.fn.config.command,
        "msix": transport.msix_enabled(),
        "io": rig.fn.shadow.io_enabled,
    }


def state(rig: Rig) -> dict[str, Any]:
    return {**device_state(rig), "sent": list(rig.peer.sent),
            "stats": dataclasses.asdict(rig.net.stats)}


# -- device states, each a list of driver steps applied to both rigs through the model --


def fresh(rig: Rig) -> None:
    pass


def io_on(rig: Rig) -> None:
    rig.enable_io()


def legacy_started(rig: Rig) -> None:
    rig.legacy_driver_start()


def legacy_running(rig: Rig) -> None:
    """Linux's legacy probe to DRIVER_OK with a PFN-placed TX ring holding one frame, and
    an ISR bit pending (INTx)."""
    features = rig.legacy_driver_start()
    rig.write(Register.GUEST_FEATURES, features & ~(1 << NetFeature.MRG_RXBUF), 4)
    rig.write(Register.QUEUE_SEL, 1, 2)
    txq = DriverQueue(rig.ram, rig.net.queues[1], contiguous=True)
    rig.write(Register.QUEUE_PFN, txq.desc >> 12, 4)
    rig.write(Register.STATUS, 0x7, 1)
    txq.add([bytes(10) + FRAME], [])
    rig.modern.transport.isr = 1


def legacy_io_off_again(rig: Rig) -> None:
    legacy_running(rig)
    rig.cfg_write(0x04, 0, 2)  # PCI_COMMAND: IO decode off


def modern_running(rig: Rig) -> None:
    """A modern driver through BAR4's common configuration, TX queue with one frame."""
    bar4 = {b.index: b.region for b in rig.fn.bars()}[MODERN_BAR]

    def common(reg: Common, value: int, width: int) -> None:
        bar4.write(reg, value.to_bytes(width, "little"))

    common(Common.DEVICE_STATUS, 0, 1)
    common(Common.DEVICE_STATUS, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER, 1)
    offered = [int.from_bytes(bar4.read(Common.DEVICE_FEATURE, 4), "little")
               for _ in range(1)]
    common(Common.DRIVER_FEATURE_SELECT, 0, 4)
    common(Common.DRIVER_FEATURE, offered[0] & ~(1 << NetFeature.MRG_RXBUF), 4)
    common(Common.DRIVER_FEATURE_SELECT, 1, 4)
    common(Common.DRIVER_FEATURE, 1, 4)  # VIRTIO_F_VERSION_1
    common(Common.DEVICE_STATUS, 0xB, 1)  # ACK | DRIVER | FEATURES_OK
    common(Common.QUEUE_SELECT, 1, 2)
    txq = DriverQueue(rig.ram, rig.net.queues[1])
    common(Common.DEVICE_STATUS, 0xF, 1)
    txq.add([bytes(12) + FRAME], [])
    rig.modern.transport.isr = 3


def legacy_running_msix(rig: Rig) -> None:
    """legacy_running with MSI-X on (the device config moves to 24), a config vector,
    queue 1's vector, and QUEUE_SEL left at 1."""
    legacy_running(rig)
    rig.set_msix(True)
    rig.write(Register.MSI_CONFIG_VECTOR, 0, 2)
    rig.write(Register.MSI_QUEUE_VECTOR, 1, 2)


def legacy_absent_queue_selected(rig: Rig) -> None:
    """QUEUE_SEL names a queue the device lacks, which holds a vector (QEMU keeps one for
    each of VIRTIO_QUEUE_MAX queues)."""
    legacy_running_msix(rig)
    rig.write(Register.QUEUE_SEL, 7, 2)
    rig.write(Register.MSI_QUEUE_VECTOR, 2, 2)


def legacy_acked_without_bus_master(rig: Rig) -> None:
    """STATUS is ACK|DRIVER but bus mastering is off: writing ACK|DRIVER again turns it
    on (virtio_ioport_write), so that write is not a no-op."""
    rig.legacy_driver_start()
    rig.cfg_write(0x04, 0x1, 2)  # PCI_COMMAND: IO decode only


STATES = [fresh, io_on, legacy_started, legacy_running, legacy_io_off_again, modern_running,
          legacy_running_msix, legacy_absent_queue_selected, legacy_acked_without_bus_master]

LEGACY_VALUES = (0, 1, 3, 7, 1023, 1024)
"""Written to every BAR0 offset: STATUS values (reset, ACK, ACK|DRIVER, ...) and
QUEUE_SEL values around VIRTIO_QUEUE_MAX."""


def writes(width: int, values: tuple[int, ...]) -> list[bytes]:
    """``values`` as ``width``-byte writes (truncated as a narrower access carries them)."""
    mask = (1 << 8 * width) - 1
    return sorted({(value & mask).to_bytes(width, "little") for value in values})


def accesses() -> Iterator[tuple[int, int, bytes | int, bool]]:
    """(bar, offset, bytes to write | size to read, is_write): every BAR0 offset and
    width, BAR4 around the ISR, device_status and the notify addresses, and every byte
    of the modern device config."""
    for offset in range(0, 32):
        for width in (1, 2, 3, 4):
            yield 0, offset, width, False
        for width in (1, 2, 4):
            for data in writes(width, LEGACY_VALUES):
                yield 0, offset, data, True
    modern = [Layout.ISR - 1, Layout.ISR, Layout.ISR + 1, Common.DEVICE_STATUS - 1,
              Common.DEVICE_STATUS, Common.DEVICE_STATUS + 1]
    modern += [Layout.NOTIFY + 4 * q + d for q in range(4) for d in (0, 2)]
    for offset in modern:
        for width in (1, 2, 4):
            yield MODERN_BAR, offset, width, False
            for value in (0, 1, 2, 64):
                yield MODERN_BAR, offset, value.to_bytes(width, "little"), True
    for offset in range(Layout.DEVICE, Layout.DEVICE + 16):  # 12 config bytes, and beyond
        for width in (1, 2, 4, 8):
            yield MODERN_BAR, offset, width, False


@pytest.mark.parametrize("prepare", STATES, ids=lambda f: f.__name__)
def test_fast_path_and_model_agree(prepare: Callable[[Rig], None]) -> None:
    mismatches = []
    served = 0
    served_kinds = set()
    for bar, offset, data, is_write in accesses():
        fast, model = FastRig(), Rig()
        prepare(fast)
        prepare(model)
        fast.native.publish()
        assert state(fast) == state(model)
        got = answer(fast.access, bar, offset, data, is_write)
        want = answer(model_access, model, bar, offset, data, is_write)
        if (got, state(fast)) != (want, state(model)):
            mismatches.append((bar, offset, data, is_write, got, want))
        served += len(fast.served)
        served_kinds |= {(b, o, w) for b, o, _, w in fast.served}
        fast.native.close()
    assert not mismatches, mismatches[:5]
    if prepare in (legacy_running, modern_running):
        assert served > 0  # the fast path did answer in this state
    if prepare in (legacy_started, legacy_running, legacy_running_msix,
                   legacy_absent_queue_selected):
        # settled legacy states: every register read but ISR's and QUEUE_NOTIFY's, every
        # config byte, QUEUE_SEL writes and STATUS rewrites without the model
        config = 24 if prepare in (legacy_running_msix, legacy_absent_queue_selected) else 20
        wanted = {(0, o, False) for o in (*range(0, 16), 18, *range(config, 32))}
        wanted |= {(0, Register.QUEUE_SEL, True), (0, Register.STATUS, True)}
        wanted |= {(MODERN_BAR, o, False) for o in range(Layout.DEVICE, Layout.DEVICE + 12)}
        assert wanted <= served_kinds, sorted(wanted - served_kinds)


def test_fast_path_serves_what_a_running_legacy_driver_does() -> None:
    """QUEUE_NOTIFY, ISR and STATUS of a running legacy driver never reach the model:
    no admin command, and the notify's frame goes out once the kick is run."""
    rig = FastRig()
    legacy_running(rig)
    rig.native.publish()
    commands = dict(rig.owner.stats.commands)
    assert rig.access(0, Register.STATUS, 1, False) == b"\x07"
    assert rig.access(0, Register.ISR, 1, False) == b"\x01"
    assert rig.access(0, Register.ISR, 1, False) == b"\x00"  # read-to-clear
    rig.access(0, Register.QUEUE_NOTIFY, (1).to_bytes(2, "little"), True)
    assert rig.peer.sent == [FRAME]
    assert dict(rig.owner.stats.commands) == commands
    assert len(rig.served) == 4
    counters = rig.native.counters()
    assert (counters["fast:legacy-status-read"], counters["fast:legacy-isr-read"],
            counters["fast:legacy-notify"]) == (1, 2, 1)


def test_a_fresh_device_status_read_goes_to_the_model() -> None:
    """A legacy STATUS read of a fresh device makes it a legacy device: the model does it
    (one admin command), not the fast path."""
    rig = FastRig()
    rig.enable_io()
    rig.native.publish()
    assert not rig.net.legacy
    assert rig.access(0, Register.STATUS, 1, False) == b"\x00"
    assert rig.net.legacy and rig.served == []


def agree(steps: list[tuple[int, int, bytes | int, bool]], fast: FastPathOf,
          model: LegacyRig) -> list[tuple[Any, ...]]:
    """Make ``steps`` in order on both sides; the steps whose answer or state differ."""
    mismatches = []
    for bar, offset, data, is_write in steps:
        got = answer(fast.access, bar, offset, data, is_write)
        want = answer(model_access, model, bar, offset, data, is_write)
        if (got, device_state(fast.rig)) != (want, device_state(model)):
            mismatches.append((bar, offset, data, is_write, got, want))
    return mismatches


@pytest.mark.parametrize("msix", [False, True], ids=["msix-off", "msix-on"])
def test_queue_sel_writes_then_reads_agree(msix: bool) -> None:
    """A QUEUE_SEL written on the fast path selects what the next reads (fast or not)
    and writes (by the model) see: present queues, absent ones, VIRTIO_QUEUE_MAX."""
    fast, model = FastRig(), Rig()
    for rig in (fast, model):
        legacy_running(rig)
        rig.set_msix(msix)
    fast.native.publish()
    reads = [(0, Register.QUEUE_PFN, 4, False), (0, Register.QUEUE_NUM, 2, False),
             (0, Register.QUEUE_SEL, 2, False), (0, Register.QUEUE_SEL, 1, False)]
    if msix:
        reads += [(0, Register.MSI_QUEUE_VECTOR, 2, False)]
    steps: list[tuple[int, int, bytes | int, bool]] = []
    for select, width in [(0, 2), (2, 2), (1, 1), (5, 2), (1023, 2), (1024, 2), (3, 1)]:
        steps += [(0, Register.QUEUE_SEL, select.to_bytes(width, "little"), True), *reads]
        if msix:  # the model writes the selected queue's vector: the image follows
            steps += [(0, Register.MSI_QUEUE_VECTOR, (select % 3).to_bytes(2, "little"),
                       True), *reads]
    steps += [(0, Register.QUEUE_SEL, b"\x00\x00", True), *reads]
    commands = sum(fast.owner.stats.commands.values())
    assert not agree(steps, fast.fast, model)
    fast_writes = sum(1 for _, o, _, w in fast.served if w and o == Register.QUEUE_SEL)
    assert fast_writes == 7  # all 8 but 1024, which the model ignores and counts
    assert model.fn.stats.ignored["queue-sel-beyond-max"] == 1
    assert fast.fn.stats.ignored["queue-sel-beyond-max"] == 1
    # the model answered only the vector writes, the ignored select and the absent
    # queue's vector read after a vector was stored for it
    assert sum(fast.owner.stats.commands.values()) - commands < len(steps) // 3


def test_a_status_write_of_another_value_goes_to_the_model() -> None:
    fast, model = FastRig(), Rig()
    for rig in (fast, model):
        legacy_running(rig)
    fast.native.publish()
    before = fast.fn.stats.accesses["write:STATUS"]
    steps: list[tuple[int, int, bytes | int, bool]] = [
        (0, Register.STATUS, b"\x07", True), (0, Register.STATUS, b"\x0f", True),
        (0, Register.STATUS, 1, False), (0, Register.STATUS, b"\x0f", True)]
    assert not agree(steps, fast.fast, model)
    assert fast.net.status == 0xF
    assert [o for _, o, _, w in fast.served if w] == [Register.STATUS, Register.STATUS]
    assert fast.fn.stats.accesses["write:STATUS"] - before == 1  # the 0x0f, by the model
    counters = fast.native.counters()
    assert counters["fast:legacy-write:STATUS"] == 2
    assert counters["fast:legacy-status-read"] == 1  # the exact register comes first


def test_what_the_benchmark_measures_never_reaches_the_model() -> None:
    """The legacy kinds of benchmarks/accesses.py on a running legacy driver: no admin
    command, each counted on the fast path under its register."""
    rig = FastRig()
    legacy_running(rig)
    rig.native.publish()
    commands = dict(rig.owner.stats.commands)
    assert rig.access(0, 20, 1, False) == MAC[:1]
    assert rig.access(0, 20, 4, False) == MAC[:4]
    rig.access(0, Register.QUEUE_SEL, b"\x00\x00", True)
    rig.access(0, Register.STATUS, b"\x07", True)
    assert rig.access(0, Register.QUEUE_PFN, 4, False) == bytes(4)  # queue 0: not placed
    assert rig.access(MODERN_BAR, Layout.DEVICE, 4, False) == MAC[:4]
    assert dict(rig.owner.stats.commands) == commands
    counters = rig.native.counters()
    assert {k: v for k, v in counters.items() if k.startswith("fast:legacy-") and ":" in
            k[5:]} == {"fast:legacy-read:device-config": 2, "fast:legacy-write:QUEUE_SEL": 1,
                       "fast:legacy-write:STATUS": 1, "fast:legacy-read:QUEUE_PFN": 1}
    assert counters["fast:legacy-read"] == 3 and counters["fast:legacy-write"] == 2
    assert counters["fast:config-read"] == 1


def test_config_changes_reach_the_fast_path() -> None:
    """Whatever changes the device config (a legacy MAC write, the link, the control
    queue's MAC) is what the next fast config read returns."""
    rig = FastRig()
    legacy_running(rig)
    rig.native.publish()
    rig.access(0, 20, b"\x02", True)  # the model: a legacy driver writes the MAC
    assert rig.access(0, 20, 1, False) == b"\x02"
    with_link = rig.access(0, 26, 2, False)
    rig.net.set_link(not rig.net.link_up)
    rig.native.publish()
    assert rig.access(0, 26, 2, False) != with_link
    assert rig.access(MODERN_BAR, Layout.DEVICE + 6, 2, False) == rig.net.read_config(6, 2)
    rig.net.mac = bytes(6)  # as VIRTIO_NET_CTRL_MAC_ADDR_SET does, then tells the device
    rig.net.config_updated()
    rig.native.publish()
    assert rig.access(0, 20, 4, False) == bytes(4)
    assert len(rig.served) == 5


@pytest.mark.parametrize("msix", [False, True], ids=["msix-off", "msix-on"])
def test_disk_legacy_registers_agree(tmp_path: Path, msix: bool) -> None:
    """virtio-blk's 60 config bytes and two queues through its 128-byte BAR0, every
    offset and width, fast path and model alike."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    disks = [BlkRig(make_image(tmp_path / name), num_queues=2) for name in ("a", "b")]
    try:
        rigs = [LegacyRig(disk.ram, disk.dev) for disk in disks]
        for rig in rigs:
            rig.legacy_driver_start()
            rig.set_msix(msix)
        fast = FastPathOf(rigs[0])
        steps: list[tuple[int, int, bytes | int, bool]] = []
        for select in (1, 0, 2):
            steps.append((0, Register.QUEUE_SEL, select.to_bytes(2, "little"), True))
            steps += [(0, offset, width, False) for offset in range(0, 128)
                      for width in (1, 2, 4) if offset != Register.ISR]
        assert not agree(steps, fast, rigs[1])
        served_reads = {o for _, o, _, w in fast.served if not w}
        config = 24 if msix else 20
        assert set(range(config, config + 60)) <= served_reads
        fast.native.close()
    finally:
        for disk in disks:
            disk.close()
