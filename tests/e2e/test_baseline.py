"""Baseline: QEMU's own virtio-net-pci on the tap, no vfuserver involved.

What a real Linux guest reports for QEMU's device is the oracle the vfuserver device is
compared with, and these runs prove that the rig (QEMU, guest, namespace, tap, plan steps)
works before any vfuserver test is believed.
"""

from __future__ import annotations

import random

import pytest

from .report import PciFunction
from .rig import (
    GUEST_ADDRESS,
    HOST_ADDRESS,
    PREFIX_LENGTH,
    TAP,
    Guests,
    NetNamespace,
    TcpSink,
    TcpSource,
)

pytestmark = pytest.mark.e2e

VIRTIO_VENDOR = 0x1AF4
ETHERNET_CLASS = 0x020000
PING_PLAN = ",".join([
    "lspci",
    "virtio",
    f"ip:{GUEST_ADDRESS}/{PREFIX_LENGTH}",
    f"ping:{HOST_ADDRESS}:count=5:interval=0.2",
    f"ping:{HOST_ADDRESS}:count=1000:flood",
    f"ping:{HOST_ADDRESS}:count=20:size=8000:flood",
])


@pytest.mark.parametrize(
    ("net", "append", "device_id", "revision", "subdevice", "io_bar", "version_1"),
    [
        # q35's root bus is not a PCIe port, so QEMU's default is transitional: legacy IDs
        # (1000, subsystem device = virtio device type 1), IO BAR0 plus the modern
        # capabilities; Linux's modern driver takes it (virtio_pci_probe tries modern first).
        pytest.param(TAP, "", 0x1000, 0, 0x0001, True, True, id="transitional"),
        pytest.param(TAP, "virtio_pci.force_legacy=1", 0x1000, 0, 0x0001, True, False,
                     id="transitional-force-legacy"),
        pytest.param(f"{TAP},legacy", "", 0x1000, 0, 0x0001, True, False, id="legacy"),
        # the presentation vfuserver serves: modern only, 1041 revision 1, QEMU's default
        # subsystem 1af4:1100, no IO BAR
        pytest.param(f"{TAP},modern", "", 0x1041, 1, 0x1100, False, True, id="modern"),
    ],
)
def test_builtin_virtio_net(guests: Guests, net: str, append: str, device_id: int,
                            revision: int, subdevice: int, io_bar: bool,
                            version_1: bool) -> None:
    run = guests.boot(PING_PLAN, builtin_net=[net], append=append)
    report = run.check_passed()

    function: PciFunction = report.pci_function(VIRTIO_VENDOR, device_id)
    assert (function.class_code, function.revision) == (ETHERNET_CLASS, revision)
    assert (function.subvendor, function.subdevice) == (VIRTIO_VENDOR, subdevice)
    assert function.driver == "virtio-pci"
    assert bool(function.io_bars) == io_bar, function.bars
    assert function.msi_irqs > 0  # MSI-X vectors in use

    device = report.virtio_device_on(function.bdf)
    assert (device.device_id, device.driver, device.ifname) == (1, "virtio_net", "eth0")
    assert device.version_1 == version_1

    for index in range(3):
        ping = report.step("ping", index)
        count = ping.int_field("count")
        assert (ping.int_field("transmitted"), ping.int_field("received")) == (count, count)
        assert ping.fields["loss"] == "0"


def test_guest_plan_steps(guests: Guests, netns: NetNamespace) -> None:
    """Every plan step works against a known-good device (QEMU's modern virtio-net, whose IDs
    are vfuserver's, so unbind/bind's default selection picks it), data included."""
    download = random.Random(1).randbytes(3 << 20)
    with TcpSink(netns) as sink, TcpSource(netns, download) as source:
        plan = ",".join([
            "wait-if:eth0",
            f"ip:{GUEST_ADDRESS}/{PREFIX_LENGTH}",
            f"ping:{HOST_ADDRESS}:count=3:flood",
            f"nc-send:{HOST_ADDRESS}:{sink.port}:mib=16",
            f"nc-recv:{HOST_ADDRESS}:{source.port}",
            "mtu:eth0:1400",
            f"ping:{HOST_ADDRESS}:count=5:size=4000:flood",
            "link:eth0:down",
            "link:eth0:up",
            "wait-link:eth0",
            f"ping:{HOST_ADDRESS}:count=3:flood",
            "stats:eth0",
            "irq",
            "config:1af4:1041",
            "unbind",
            "bind",
            f"ip:{GUEST_ADDRESS}/{PREFIX_LENGTH}",
            "wait-link:eth0",
            f"ping:{HOST_ADDRESS}:count=3:flood",
            "sleep:0",
        ])
        run = guests.boot(plan, builtin_net=[f"{TAP},modern"])
        report = run.check_passed()
        sink.wait()
        source.wait()

    sent = report.step("nc-send")
    assert sent.int_field("bytes") == 16 << 20
    assert (sink.received, sink.sha256) == (16 << 20, sent.fields["sha256"])
    received = report.step("nc-recv")
    assert (received.int_field("bytes"), received.fields["sha256"]) == (len(download),
                                                                        source.sha256)

    assert report.step("mtu").fields["mtu"] == "1400"
    assert report.step("link", 0).fields["operstate"] == "down"
    stats = report.step("stats")
    assert stats.int_field("tx_bytes") > 16 << 20
    assert stats.int_field("rx_errors") == 0
    irqs = report.records("irq", "irq")
    assert {r["handler"] for r in irqs} >= {"virtio0-config", "virtio0-input.0", "virtio0-output.0"}

    (config,) = report.records("config", "config")
    header = bytes.fromhex(config["hex"])
    assert len(header) == 256
    assert header[0:4] == bytes.fromhex("f4 1a 41 10")  # vendor, device (little-endian)

    unbound, bound = report.step("unbind"), report.step("bind")
    assert unbound.fields["bdf"] == bound.fields["bdf"]
    assert (unbound.fields["driver"], bound.fields["driver"]) == ("none", "virtio-pci")
    assert bound.fields["ifname"] == "eth0"
    assert report.step("ping", 3).passed
