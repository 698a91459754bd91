"""vfuserver's virtio-net data path under a real QEMU 11 and a real Linux guest driver."""

from __future__ import annotations

import pytest

from .rig import TAP, Guests, NetNamespace, Servers
from .traffic import check_traffic, run_traffic_plan

pytestmark = pytest.mark.e2e


def test_modern_traffic_plan_and_second_boot(servers: Servers, guests: Guests,
                                             netns: NetNamespace) -> None:
    server = servers.start("--netdev", f"tap,ifname={TAP}")
    report, sink = run_traffic_plan(guests, netns, server.socket_path)
    device = report.virtio_device_on(report.pci_function(0x1AF4, 0x1041).bdf)
    assert (device.driver, device.version_1) == ("virtio_net", True)
    check_traffic(report, sink)

    # the same running server serves the next VM: QEMU connects anew, the device was reset
    again = guests.boot("wait-if:eth0,ip:10.0.2.15/24,ping:10.0.2.1:count=100:flood",
                        sockets=[server.socket_path], timeout=120).check_passed()
    assert again.step("ping").fields["loss"] == "0"
    server.wait_for_log(r"client attached", timeout=5)
