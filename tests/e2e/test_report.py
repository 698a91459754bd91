"""The console parser, on console text recorded from a real guest run (no QEMU needed)."""

from __future__ import annotations

import pytest

from .report import Bar, ReportError, parse

CONSOLE = """\
\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.17.0-debian-1.17.0-1~bpo13+1)
[    1.743297] Run /init as init process
@@VFU boot uptime=1.84 kernel=6.1.0-56-cloud-amd64 plan=lspci,virtio,ping:10.0.2.1:count=5,nosuch
@@VFU module name=virtio_pci status=pass params=force_legacy=1
@@VFU module name=virtio_net status=pass params=
@@VFU step=1 name=lspci record=pci bdf=0000:00:00.0 class=060000 vendor=8086 device=29c0 \
subvendor=1af4 subdevice=1100 revision=00 driver=none irq=0 msi=0
@@VFU step=1 name=lspci record=pci bdf=0000:00:01.0 class=020000 vendor=1af4 device=1000 \
subvendor=1af4 subdevice=0001 revision=00 driver=virtio-pci irq=21 msi=3 \
bar0=io:0xc040:0x20:0x40101 bar1=mem32:0xfebc0000:0x1000:0x40200 \
bar4=mem64-pref:0xfebfc000:0x4000:0x14220c rom=mem32-pref:0xfeb80000:0x40000:0x46200
@@VFU step=1 name=lspci status=pass count=2
[    2.100000] virtio_net virtio0 eth0: renamed@@VFU step=2 name=virtio record=virtio dev=virtio0 \
pci=0000:00:01.0 device=0001 vendor=1af4 driver=virtio_net status=0x0000000f \
features=1110010111111111111101010000110010000000100000000000000000000000 ifname=eth0
@@VFU step=2 name=virtio status=pass count=1\r
PING 10.0.2.1 (10.0.2.1): 56 data bytes
5 packets transmitted, 4 packets received, 20% packet loss
@@VFU step=3 name=ping status=fail host=10.0.2.1 count=5 size=56 mode=normal transmitted=5 \
received=4 loss=20 seconds=4.05 rc=0
@@VFU step=4 name=irq record=irq irq=24 count=0 chip=PCI-MSI handler=virtio0-config
@@VFU step=4 name=irq status=pass count=1
@@VFU step=5 name=nosuch status=fail error=unknown_step
@@VFU done steps=5 passed=3 failed=2 uptime=7.29
[    7.334144] reboot: Power down
""".replace("\\\n", "")


def test_parse_recorded_console() -> None:
    report = parse(CONSOLE)
    assert report.complete and not report.timed_out
    assert report.boot is not None and report.boot["kernel"] == "6.1.0-56-cloud-amd64"
    assert [m["name"] for m in report.modules] == ["virtio_pci", "virtio_net"]
    assert report.modules[0]["params"] == "force_legacy=1"
    assert [(s.number, s.name, s.status) for s in report.steps] == [
        (1, "lspci", "pass"), (2, "virtio", "pass"), (3, "ping", "fail"), (4, "irq", "pass"),
        (5, "nosuch", "fail"),
    ]
    assert [s.name for s in report.failed_steps] == ["ping", "nosuch"]

    host_bridge, net = report.pci_functions()
    assert (host_bridge.class_code, host_bridge.driver, host_bridge.bars) == (0x060000, None, {})
    assert net == report.pci_function(0x1AF4, 0x1000)
    assert (net.subvendor, net.subdevice, net.revision, net.msi_irqs) == (0x1AF4, 1, 0, 3)
    assert net.bars["bar0"] == Bar("bar0", "io", False, 0xC040, 0x20, 0x40101)
    assert net.bars["bar4"] == Bar("bar4", "mem64", True, 0xFEBFC000, 0x4000, 0x14220C)
    assert [b.name for b in net.io_bars] == ["bar0"]
    assert net.bars["rom"].prefetchable

    (device,) = report.virtio_devices()
    assert device == report.virtio_device_on("0000:00:01.0")
    assert (device.device_id, device.driver, device.ifname, device.status) == (
        1, "virtio_net", "eth0", 0xF)
    assert device.version_1 and device.has_feature(0) and not device.has_feature(3)

    ping = report.step("ping")
    assert (ping.int_field("received"), ping.float_field("seconds")) == (4, 4.05)
    assert report.records("irq", "irq") == [
        {"record": "irq", "irq": "24", "count": "0", "chip": "PCI-MSI",
         "handler": "virtio0-config"},
    ]
    with pytest.raises(KeyError):
        report.step("ping", 1)
    with pytest.raises(KeyError, match="1af4:1041"):
        report.pci_function(0x1AF4, 0x1041)


def test_parse_unfinished_run() -> None:
    report = parse("@@VFU boot uptime=1 kernel=k plan=sleep:99\n@@VFU timeout seconds=50\n")
    assert report.timed_out and not report.complete and report.steps == []
    assert "never reported 'done'" in report.summary()


@pytest.mark.parametrize("line", [
    pytest.param("@@VFU step=1 name=x status", id="field-without-value"),
    pytest.param("@@VFU name=x step=1 status=pass", id="name-before-step"),
    pytest.param("@@VFU step=1 name=x count=3", id="neither-status-nor-record"),
])
def test_parse_rejects_broken_report_lines(line: str) -> None:
    with pytest.raises(ReportError):
        parse(line)
