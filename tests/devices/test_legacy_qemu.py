"""Legacy BAR0 register writes (and reads) against QEMU's as the oracle.

QEMU hw/virtio/virtio-pci.c ``virtio_pci_config_write`` -> ``virtio_ioport_write`` (and
``_read``), hw/virtio/virtio.c ``virtio_set_features``, ``virtio_set_status``,
``virtio_queue_set_addr``, ``virtio_queue_set_vector``, ``virtio_reset``. Every access
below but the QUEUE_NOTIFY fast path is exactly one admin command; the admin status is
OK unless admin-cmds-legacy-interface.tex says the device "MUST fail the command" (an
access not inside a single register or outside the device-specific area): QEMU ignores
those, so what the guest sees afterwards is the same.

=================================  ==================================  ============================
access                             QEMU                                here before (now: as QEMU)
=================================  ==================================  ============================
GUEST_FEATURES                     val & host_features                 stored raw, read back raw
GUEST_FEATURES with bit 30         bad_features (MAC CSUM TSO4/6 ECN)  bit 30 dropped, rest kept
GUEST_FEATURES after FEATURES_OK   ignored (set_features -EINVAL)      taken
HOST_FEATURES read                 with BAD_FEATURE (bit 30)           without bit 30
1/2 bytes at a register start      value zero-extended                 read-modify-write
1/2 bytes inside a register        ignored (default case)              read-modify-write
read inside a register             all ones, truncated                 the register's bytes
read QUEUE_NOTIFY (admin)          all ones                            0
access over two registers          ignored (default case)              EINVAL (admin: MUST fail)*
QUEUE_PFN 0                        virtio_pci_reset: whole device      selected queue off
QUEUE_PFN, queue without size      ignored (virtio_queue_set_addr)     EINVAL
QUEUE_SEL >= VIRTIO_QUEUE_MAX      ignored, selection kept             taken
QUEUE_NOTIFY, absent queue         ignored                             ignored
STATUS 0                           set_status(0) + virtio_pci_reset    the same
STATUS clearing bits               status = val                        bits kept (modern rule)
STATUS = ACKNOWLEDGE|DRIVER        PCI_COMMAND |= BUS_MASTER           nothing
*_VECTOR >= nvectors               VIRTIO_NO_VECTOR                    the same
QUEUE_VECTOR, absent queue         kept for queue_sel                  dropped, reads NO_VECTOR
HOST_FEATURES/QUEUE_NUM/ISR write  ignored (default case)              EINVAL
device config beyond its length    ignored (virtio_config_write*)      EINVAL (admin: MUST fail)*
teardown (Linux remove)            each PFN 0 resets again             PFN 0: queue off only
function reset (client, FLR)       virtio_reset: queue_sel 0           QUEUE_SEL kept
=================================  ==================================  ============================

(*) kept: the admin command fails as admin-cmds-legacy-interface.tex requires; the guest
sees what QEMU's guest sees, a register that did not change. Teardown is STATUS 0, then
for each queue QUEUE_SEL, MSI_QUEUE_VECTOR NO_VECTOR, an ISR read, QUEUE_PFN 0, then
MSI_CONFIG_VECTOR NO_VECTOR (Linux del_vq); every access completes.

Differences kept on purpose: BAR0 refuses a QUEUE_NOTIFY access that is not 2 bytes wide
(EINVAL, Linux virtiovf_pci_bar0_rw, whose presentation this is; QEMU would notify with the
value); a device config access of 3 bytes is taken byte-wise (QEMU's switch has no case
for it; no guest IO instruction has that width); QUEUE_SEL is the legacy interface's own,
not shared with the modern common cfg's queue_select as QEMU's vdev->queue_sel is.

The stop/start of ioeventfds around DRIVER_OK and msix_vector_use/unuse have no state a
guest can see here (this server keeps no pending bits and signals vectors directly).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import NamedTuple

import pytest

from tests.devices.legacy_driver import MAC, Rig
from vfuserver.devices.errors import GuestError
from vfuserver.devices.legacy_io import run_admin
from vfuserver.devices.pci import ResetKind
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import virtio_admin as admin
from vfuserver.protocol.virtio import DeviceStatus
from vfuserver.protocol.virtio_legacy import BAD_FEATURE, NO_REGISTER, QUEUE_MAX, Register
from vfuserver.protocol.virtio_net import NetFeature

NO_VECTOR = 0xFFFF
ACK_DRIVER = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
FEATURES_OK = DeviceStatus.FEATURES_OK
DRIVER_OK = DeviceStatus.DRIVER_OK
PFN = 0x12345  # any page: QEMU and this device only store it until the queue is used
BAR0 = "bar0"
CFG = "cfg"


class Step(NamedTuple):
    """One access of the set-up: a BAR0 or config-space write."""

    space: str
    offset: int
    value: int
    size: int


def w(offset: int, value: int, size: int) -> Step:
    return Step(BAR0, offset, value, size)


def cfg(offset: int, value: int, size: int) -> Step:
    return Step(CFG, offset, value, size)


def offered(rig: Rig) -> int:
    """HOST_FEATURES as QEMU shows it: the device's low word and BAD_FEATURE."""
    return rig.net.get_device_features(0) | 1 << BAD_FEATURE


Expect = Callable[[Rig], dict[tuple[int, int], int]]
"""After the write: {(BAR0 offset, size): value} to read back."""


def regs(**values: int) -> Expect:
    return lambda rig: {(Register[name], Register[name].width): v for name, v in values.items()}


def reset_state(rig: Rig) -> dict[tuple[int, int], int]:
    """What virtio_reset leaves: status, features, selector, vectors and PFNs all reset."""
    expected: dict[tuple[int, int], int] = {
        (Register.STATUS, 1): 0, (Register.GUEST_FEATURES, 4): 0, (Register.QUEUE_SEL, 2): 0,
        (Register.QUEUE_PFN, 4): 0, (Register.MSI_CONFIG_VECTOR, 2): NO_VECTOR,
        (Register.MSI_QUEUE_VECTOR, 2): NO_VECTOR}
    assert not any(q.enabled for q in rig.net.queues)
    return expected


MAC_ONLY = NetFeature.MAC.mask

CASES = [
    # -- GUEST_FEATURES ------------------------------------------------------------------
    pytest.param([], w(Register.GUEST_FEATURES, 0x7FFF_FFFF & ~(1 << BAD_FEATURE), 4), 0,
                 lambda rig: {(Register.GUEST_FEATURES, 4): offered(rig) & ~(1 << BAD_FEATURE)},
                 id="features-masked-to-what-is-offered"),
    pytest.param([], w(Register.GUEST_FEATURES, 1 << BAD_FEATURE | NetFeature.MRG_RXBUF.mask, 4),
                 0, lambda rig: {(Register.GUEST_FEATURES, 4):
                                 rig.net.bad_features & offered(rig)},
                 id="features-bad-feature-gives-the-bad-features"),
    pytest.param([w(Register.STATUS, ACK_DRIVER | FEATURES_OK, 1)],
                 w(Register.GUEST_FEATURES, MAC_ONLY, 4), 0, regs(GUEST_FEATURES=0),
                 id="features-after-features-ok-ignored"),
    pytest.param([w(Register.GUEST_FEATURES, MAC_ONLY | NetFeature.STATUS.mask, 4)],
                 w(Register.GUEST_FEATURES, MAC_ONLY, 1), 0, regs(GUEST_FEATURES=MAC_ONLY),
                 id="features-1-byte-at-start-zero-extends"),
    pytest.param([w(Register.GUEST_FEATURES, MAC_ONLY | NetFeature.STATUS.mask, 4)],
                 w(Register.GUEST_FEATURES + 2, 0, 2), 0,
                 regs(GUEST_FEATURES=MAC_ONLY | NetFeature.STATUS.mask),
                 id="features-2-bytes-inside-ignored"),
    pytest.param([w(Register.GUEST_FEATURES, MAC_ONLY, 4)],
                 w(Register.GUEST_FEATURES + 2, 0, 4), errno.EINVAL, regs(GUEST_FEATURES=MAC_ONLY),
                 id="features-straddling-refused"),
    # -- read-only registers ---------------------------------------------------------------
    pytest.param([], w(Register.HOST_FEATURES, 0, 4), 0,
                 lambda rig: {(Register.HOST_FEATURES, 4): offered(rig)},
                 id="host-features-write-ignored"),
    pytest.param([], w(Register.QUEUE_NUM, 16, 2), 0, regs(QUEUE_NUM=256),
                 id="queue-num-write-ignored"),
    pytest.param([], w(Register.ISR, 0, 1), 0, lambda rig: {},
                 id="isr-write-ignored"),
    # -- QUEUE_PFN ------------------------------------------------------------------------
    pytest.param([w(Register.QUEUE_SEL, 1, 2)], w(Register.QUEUE_PFN, PFN, 4), 0,
                 regs(QUEUE_PFN=PFN), id="pfn-places-the-ring"),
    pytest.param([w(Register.QUEUE_SEL, 1, 2)], w(Register.QUEUE_PFN, 0x45, 1), 0,
                 regs(QUEUE_PFN=0x45), id="pfn-1-byte-zero-extends"),
    pytest.param([w(Register.QUEUE_SEL, 7, 2)], w(Register.QUEUE_PFN, PFN, 4), 0,
                 regs(QUEUE_PFN=0, QUEUE_NUM=0, QUEUE_SEL=7), id="pfn-queue-without-size-ignored"),
    pytest.param([w(Register.GUEST_FEATURES, MAC_ONLY, 4), w(Register.MSI_CONFIG_VECTOR, 1, 2),
                  w(Register.QUEUE_SEL, 1, 2), w(Register.MSI_QUEUE_VECTOR, 2, 2),
                  w(Register.QUEUE_PFN, PFN, 4), w(Register.STATUS, ACK_DRIVER | DRIVER_OK, 1)],
                 w(Register.QUEUE_PFN, 0, 4), 0, reset_state, id="pfn-0-resets-the-device"),
    # -- QUEUE_SEL ------------------------------------------------------------------------
    pytest.param([w(Register.QUEUE_SEL, 1, 2)], w(Register.QUEUE_SEL, QUEUE_MAX, 2), 0,
                 regs(QUEUE_SEL=1), id="sel-virtio-queue-max-ignored"),
    pytest.param([w(Register.QUEUE_SEL, 1, 2)], w(Register.QUEUE_SEL, 0xFFFF, 2), 0,
                 regs(QUEUE_SEL=1), id="sel-ffff-ignored"),
    pytest.param([], w(Register.QUEUE_SEL, QUEUE_MAX - 1, 2), 0,
                 regs(QUEUE_SEL=QUEUE_MAX - 1, QUEUE_NUM=0, QUEUE_PFN=0,
                      MSI_QUEUE_VECTOR=NO_VECTOR), id="sel-absent-queue-below-max"),
    pytest.param([w(Register.QUEUE_SEL, 1, 2)], w(Register.QUEUE_SEL, 2, 1), 0,
                 regs(QUEUE_SEL=2), id="sel-1-byte-zero-extends"),
    # -- QUEUE_NOTIFY (fast path, no admin command) ----------------------------------------
    pytest.param([], w(Register.QUEUE_NOTIFY, 7, 2), 0, lambda rig: {},
                 id="notify-absent-queue-ignored"),
    pytest.param([], w(Register.QUEUE_NOTIFY, 0xFFFF, 2), 0, lambda rig: {},
                 id="notify-ffff-ignored"),
    # -- STATUS ---------------------------------------------------------------------------
    pytest.param([w(Register.GUEST_FEATURES, MAC_ONLY, 4), w(Register.QUEUE_SEL, 1, 2),
                  w(Register.QUEUE_PFN, PFN, 4), w(Register.MSI_CONFIG_VECTOR, 1, 2),
                  w(Register.STATUS, ACK_DRIVER | DRIVER_OK, 1)],
                 w(Register.STATUS, 0, 1), 0, reset_state, id="status-0-resets-the-device"),
    pytest.param([w(Register.STATUS, ACK_DRIVER | DRIVER_OK, 1)],
                 w(Register.STATUS, ACK_DRIVER, 1), 0, regs(STATUS=ACK_DRIVER),
                 id="status-clearing-driver-ok-is-stored"),
    pytest.param([], w(Register.STATUS, ACK_DRIVER | FEATURES_OK, 1), 0,
                 regs(STATUS=ACK_DRIVER | FEATURES_OK), id="status-features-ok-stored"),
    pytest.param([], w(Register.STATUS, 0xFF, 1), 0, regs(STATUS=0xFF),
                 id="status-all-bits-stored"),
    # -- MSI-X vectors (4 vectors) ---------------------------------------------------------
    pytest.param([], w(Register.MSI_CONFIG_VECTOR, 3, 2), 0, regs(MSI_CONFIG_VECTOR=3),
                 id="config-vector-in-range"),
    pytest.param([w(Register.MSI_CONFIG_VECTOR, 1, 2)], w(Register.MSI_CONFIG_VECTOR, 4, 2), 0,
                 regs(MSI_CONFIG_VECTOR=NO_VECTOR), id="config-vector-beyond-nvectors"),
    pytest.param([], w(Register.MSI_CONFIG_VECTOR, 2, 1), 0, regs(MSI_CONFIG_VECTOR=2),
                 id="config-vector-1-byte-zero-extends"),
    pytest.param([w(Register.QUEUE_SEL, 2, 2)], w(Register.MSI_QUEUE_VECTOR, 1, 2), 0,
                 regs(MSI_QUEUE_VECTOR=1), id="queue-vector-in-range"),
    pytest.param([w(Register.QUEUE_SEL, 2, 2), w(Register.MSI_QUEUE_VECTOR, 1, 2)],
                 w(Register.MSI_QUEUE_VECTOR, 0x8000, 2), 0, regs(MSI_QUEUE_VECTOR=NO_VECTOR),
                 id="queue-vector-beyond-nvectors"),
    pytest.param([w(Register.QUEUE_SEL, 100, 2)], w(Register.MSI_QUEUE_VECTOR, 3, 2), 0,
                 regs(MSI_QUEUE_VECTOR=3), id="queue-vector-of-absent-queue-kept"),
    pytest.param([w(Register.MSI_CONFIG_VECTOR, 1, 2)], w(Register.MSI_CONFIG_VECTOR + 1, 1, 1),
                 0, regs(MSI_CONFIG_VECTOR=1), id="config-vector-high-byte-ignored"),
    # -- widths over two registers (admin spec: MUST fail; QEMU: ignored) -------------------
    pytest.param([w(Register.QUEUE_SEL, 1, 2)], w(Register.QUEUE_NUM, 0x0002_0000, 4),
                 errno.EINVAL, regs(QUEUE_SEL=1), id="queue-num-and-sel-refused"),
    pytest.param([w(Register.STATUS, ACK_DRIVER, 1)], w(Register.STATUS, 0, 2), errno.EINVAL,
                 regs(STATUS=ACK_DRIVER), id="status-and-isr-refused"),
    pytest.param([], w(Register.MSI_CONFIG_VECTOR, 1, 4), errno.EINVAL,
                 regs(MSI_CONFIG_VECTOR=NO_VECTOR), id="both-vectors-refused"),
]


@pytest.fixture
def rig() -> Rig:
    rig = Rig()
    rig.set_msix(True)  # the vector registers exist
    rig.legacy_driver_start()
    return rig


def apply(rig: Rig, step: Step) -> None:
    if step.space == CFG:
        rig.cfg_write(step.offset, step.value, step.size)
    else:
        rig.write(step.offset, step.value, step.size)


def write_errno(rig: Rig, step: Step) -> int:
    try:
        apply(rig, step)
    except GuestError as err:
        return err.errno
    return 0


@pytest.mark.parametrize(("setup", "access", "expected_errno", "expect"), CASES)
def test_register_write_as_qemu(rig: Rig, setup: list[Step], access: Step, expected_errno: int,
                                expect: Expect) -> None:
    for step in setup:
        apply(rig, step)
    commands = sum(rig.owner.stats.commands.values())
    fast = rig.fn.stats.fast_notifies
    assert write_errno(rig, access) == expected_errno
    if access.offset == Register.QUEUE_NOTIFY:
        assert (sum(rig.owner.stats.commands.values()), rig.fn.stats.fast_notifies) == (
            commands, fast + 1)
    else:
        assert sum(rig.owner.stats.commands.values()) == commands + 1  # exactly one
    for (offset, size), value in expect(rig).items():
        assert rig.read(offset, size) == value, Register(offset).name


def test_status_acknowledge_driver_sets_bus_master(rig: Rig) -> None:
    """virtio_ioport_write: "Linux before 2.6.34 drives the device without enabling the
    PCI device bus master bit. Enable it automatically for the guest." Only for exactly
    ACKNOWLEDGE | DRIVER."""
    command = pcifmt.Offset.COMMAND
    rig.cfg_write(command, pcifmt.Command.IO, 2)
    rig.write(Register.STATUS, DeviceStatus.ACKNOWLEDGE, 1)
    rig.write(Register.STATUS, ACK_DRIVER | DRIVER_OK, 1)
    assert rig.cfg_read(command, 2) == pcifmt.Command.IO
    rig.write(Register.STATUS, ACK_DRIVER, 1)
    assert rig.cfg_read(command, 2) == pcifmt.Command.IO | pcifmt.Command.MASTER


def test_isr_write_leaves_the_pending_bits(rig: Rig) -> None:
    rig.modern.transport.isr = 1
    rig.write(Register.ISR, 0, 1)
    assert rig.read(Register.ISR, 1) == 1


def test_ignored_writes_are_counted_by_reason(rig: Rig) -> None:
    rig.write(Register.HOST_FEATURES, 0, 4)
    rig.write(Register.GUEST_FEATURES + 1, 0, 1)
    rig.write(Register.QUEUE_SEL, QUEUE_MAX, 2)
    rig.write(Register.QUEUE_SEL, 9, 2)
    rig.write(Register.QUEUE_PFN, PFN, 4)
    legacy = rig.fn.counters()["legacy"]
    assert {k: v for k, v in legacy.items() if k.startswith("ignored:")} == {
        "ignored:read-only": 1, "ignored:inside-register": 1,
        "ignored:queue-sel-beyond-max": 1, "ignored:pfn-without-queue": 1}
    assert rig.owner.stats.statuses[(admin.Opcode.LEGACY_COMMON_CFG_WRITE,
                                     admin.Status.EINVAL)] == 0


@pytest.mark.parametrize(("offset", "size", "expected"), [
    pytest.param(Register.GUEST_FEATURES + 1, 1, 0xFF, id="inside-guest-features"),
    pytest.param(Register.GUEST_FEATURES + 2, 2, 0xFFFF, id="upper-half-guest-features"),
    pytest.param(Register.QUEUE_NUM + 1, 1, 0xFF, id="inside-queue-num"),
    pytest.param(Register.MSI_CONFIG_VECTOR + 1, 1, 0xFF, id="inside-config-vector"),
    pytest.param(Register.HOST_FEATURES, 1, None, id="host-features-low-byte"),
])
def test_reads_as_qemu(rig: Rig, offset: int, size: int, expected: int | None) -> None:
    """virtio_ioport_read: the start offset decides; no register there reads all ones."""
    rig.write(Register.GUEST_FEATURES, MAC_ONLY, 4)
    rig.write(Register.QUEUE_SEL, 1, 2)
    rig.write(Register.MSI_CONFIG_VECTOR, 1, 2)
    if expected is None:
        expected = (rig.net.get_device_features(0) | 1 << BAD_FEATURE) & 0xFF
    assert rig.read(offset, size) == expected


def test_host_features_offer_bad_feature(rig: Rig) -> None:
    """virtio_pci_pre_plugged adds VIRTIO_F_BAD_FEATURE to every device's host features."""
    assert rig.read(Register.HOST_FEATURES, 4) >> BAD_FEATURE & 1


def _admin(rig: Rig, opcode: admin.Opcode, data: bytes, result_size: int) -> tuple[int, bytes]:
    status, _, result = run_admin(rig.owner, opcode, rig.fn.member_id, data, result_size)
    return status, result


def test_queue_notify_through_the_admin_command(rig: Rig) -> None:
    """What BAR0 sends on its fast path also works as a LEGACY_COMMON_CFG_WRITE (a
    1-byte value zero-extended); a read of the write-only register is QEMU's all ones."""
    write = admin.LEGACY_CFG_WRITE_HEADER.pack(Register.QUEUE_NOTIFY)
    assert _admin(rig, admin.Opcode.LEGACY_COMMON_CFG_WRITE, write + b"\x07", 0) == (0, b"")
    read = admin.LEGACY_CFG_READ.pack(Register.QUEUE_NOTIFY)
    assert _admin(rig, admin.Opcode.LEGACY_COMMON_CFG_READ, read, 2) == (
        0, (NO_REGISTER & 0xFFFF).to_bytes(2, "little"))


def test_device_config_beyond_its_length_is_refused_and_changes_nothing(rig: Rig) -> None:
    """QEMU's virtio_config_write* ignore it; the admin command must fail (EINVAL)."""
    size = rig.net.config_size
    write = admin.LEGACY_CFG_WRITE_HEADER.pack(size - 1) + b"\x01\x02"
    status, _ = _admin(rig, admin.Opcode.LEGACY_DEV_CFG_WRITE, write, 0)
    assert status == admin.Status.EINVAL
    assert rig.net.read_config(0, size)[:6] == MAC


@pytest.mark.parametrize("order", ["status-first", "pfn-first"])
def test_linux_legacy_teardown(rig: Rig, order: str) -> None:
    """Linux virtio_pci_legacy remove: reset, then del_vq for each queue (select, vector
    NO_VECTOR, ISR read to flush, PFN 0), then the config vector; or a driver that
    writes PFN 0 first. Every access completes, each as one admin command, and the
    device ends reset."""
    for index in range(len(rig.net.queues)):
        rig.write(Register.QUEUE_SEL, index, 2)
        rig.write(Register.MSI_QUEUE_VECTOR, index, 2)
        rig.write(Register.QUEUE_PFN, PFN + index * 4, 4)
    rig.write(Register.STATUS, ACK_DRIVER | DRIVER_OK, 1)
    steps: list[Step] = [] if order == "pfn-first" else [w(Register.STATUS, 0, 1)]
    for index in range(len(rig.net.queues)):
        steps += [w(Register.QUEUE_SEL, index, 2), w(Register.MSI_QUEUE_VECTOR, NO_VECTOR, 2),
                  w(Register.QUEUE_PFN, 0, 4)]
    steps += [w(Register.MSI_CONFIG_VECTOR, NO_VECTOR, 2)]
    if order == "pfn-first":
        steps.append(w(Register.STATUS, 0, 1))
    commands = sum(rig.owner.stats.commands.values())
    for step in steps:
        apply(rig, step)
        assert rig.read(Register.ISR, 1) == 0
    assert sum(rig.owner.stats.commands.values()) == commands + 2 * len(steps)
    assert rig.owner.stats.statuses[(admin.Opcode.LEGACY_COMMON_CFG_WRITE,
                                     admin.Status.EINVAL)] == 0
    rig.write(Register.QUEUE_SEL, 0, 2)
    for (offset, size), value in reset_state(rig).items():
        assert rig.read(offset, size) == value
    assert rig.net.legacy and rig.net.status == 0


@pytest.mark.parametrize(("features", "offset", "data", "mac", "status"), [
    pytest.param(0, 0, b"\x02\x11", b"\x02\x11" + MAC[2:], 1, id="mac-2-bytes"),
    pytest.param(0, 2, b"\xaa\xbb\xcc\xdd", MAC[:2] + b"\xaa\xbb\xcc\xdd", 1, id="mac-4-bytes"),
    pytest.param(0, 5, b"\x77", MAC[:5] + b"\x77", 1, id="mac-last-byte"),
    pytest.param(0, 6, b"\x00\x00", MAC, 1, id="status-not-writable"),
    pytest.param(NetFeature.CTRL_MAC_ADDR.mask, 0, b"\x02\x11", MAC, 1,
                 id="mac-fixed-with-ctrl-mac-addr"),
])
def test_device_config_writes_as_qemu(rig: Rig, features: int, offset: int, data: bytes,
                                      mac: bytes, status: int) -> None:
    """virtio_pci_config_write -> virtio_config_write{b,w,l} -> virtio_net_set_config:
    a legacy driver may write the MAC unless CTRL_MAC_ADDR is negotiated; nothing else
    of the config is writable. Each access is one LEGACY_DEV_CFG_WRITE that succeeds."""
    rig.write(Register.GUEST_FEATURES, features | NetFeature.MAC.mask, 4)
    config_at = 24  # MSI-X is enabled
    rig.bar0.write(config_at + offset, data)
    assert rig.owner.stats.statuses[(admin.Opcode.LEGACY_DEV_CFG_WRITE, admin.Status.OK)] == 1
    assert bytes(rig.bar0.read(config_at, 4)) + bytes(rig.bar0.read(config_at + 4, 2)) == mac
    assert rig.read(config_at + 6, 2) == status


@pytest.mark.parametrize("kind", list(ResetKind), ids=lambda k: k.value)
def test_function_reset_resets_the_legacy_registers(rig: Rig, kind: ResetKind) -> None:
    """A device reset from the client, a lost connection or an FLR is virtio_reset for
    the legacy registers too: the next client finds QUEUE_SEL 0 and no vectors."""
    rig.write(Register.QUEUE_SEL, 100, 2)
    rig.write(Register.MSI_QUEUE_VECTOR, 1, 2)
    rig.write(Register.QUEUE_SEL, 2, 2)
    rig.fn.reset(kind)
    rig.set_msix(True)
    rig.enable_io()
    assert rig.read(Register.QUEUE_SEL, 2) == 0
    rig.write(Register.QUEUE_SEL, 100, 2)
    assert rig.read(Register.MSI_QUEUE_VECTOR, 2) == NO_VECTOR
