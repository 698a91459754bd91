"""The traffic plan every vfuserver presentation must pass in a real guest, and its checks.

One plan, used for the modern profile and for the transitional profile with and without
``virtio_pci.force_legacy=1``: the same guest-visible behaviour is the point.
"""

from __future__ import annotations

from pathlib import Path

from .report import GuestReport
from .rig import GUEST_ADDRESS, HOST_ADDRESS, PREFIX_LENGTH, Guests, NetNamespace, TcpSink

TRANSFER_MIB = 64

BRING_UP = (
    "lspci",
    "virtio",
    "wait-if:eth0",
    f"ip:{GUEST_ADDRESS}/{PREFIX_LENGTH}",
    f"ping:{HOST_ADDRESS}:count=5:interval=0.2",  # ARP and the first interrupts
)
"""The steps every plan starts with: the NIC found, bound, addressed and answering."""


def traffic_plan(sink_port: int, *, ids: str = "1af4:1041", mib: int = TRANSFER_MIB) -> str:
    """ping 1000 adaptive, large pings, an nc transfer, MTU change, link down/up,
    driver unbind/bind (a device reset) and traffic again."""
    return ",".join([
        *BRING_UP,
        f"ping:{HOST_ADDRESS}:count=1000:flood",
        f"ping:{HOST_ADDRESS}:count=20:size=8000:flood",
        f"nc-send:{HOST_ADDRESS}:{sink_port}:mib={mib}:timeout=90",
        "mtu:eth0:1400",
        f"ping:{HOST_ADDRESS}:count=10:size=4000:flood",
        "link:eth0:down",
        "link:eth0:up",
        "wait-link:eth0",
        f"ping:{HOST_ADDRESS}:count=10:flood",
        "stats:eth0",
        f"unbind:{ids.replace(':', ':')}",
        f"bind:{ids}",
        "wait-if:eth0",
        f"ip:{GUEST_ADDRESS}/{PREFIX_LENGTH}",
        "wait-link:eth0",
        f"ping:{HOST_ADDRESS}:count=100:flood",
    ])


def check_traffic(report: GuestReport, sink: TcpSink, *, mib: int = TRANSFER_MIB) -> None:
    """Every step passed (check_passed did that); the numbers behind them are right."""
    for index, count in enumerate((5, 1000, 20, 10, 10, 100)):
        ping = report.step("ping", index)
        assert ping.int_field("count") == count
        assert (ping.int_field("transmitted"), ping.int_field("received")) == (count, count)
        assert ping.fields["loss"] == "0"
    assert report.step("ping", 2).int_field("size") == 8000

    sent = report.step("nc-send")
    assert sent.int_field("bytes") == mib << 20
    assert (sink.received, sink.sha256) == (mib << 20, sent.fields["sha256"])

    assert report.step("mtu").fields["mtu"] == "1400"
    assert report.step("link", 0).fields["operstate"] == "down"
    stats = report.step("stats")
    assert stats.int_field("tx_bytes") > mib << 20
    assert stats.int_field("rx_errors") == 0 and stats.int_field("tx_errors") == 0

    unbound, bound = report.step("unbind"), report.step("bind")
    assert unbound.fields["bdf"] == bound.fields["bdf"]
    assert (unbound.fields["driver"], bound.fields["driver"]) == ("none", "virtio-pci")


def run_traffic_plan(guests: Guests, netns: NetNamespace, socket: Path, *, append: str = "",
                     ids: str = "1af4:1041") -> tuple[GuestReport, TcpSink]:
    """Boot the guest with the traffic plan against ``socket``; the report and the sink.

    No retries: a boot whose queue breaks ("id N is not a head!") fails the test."""
    with TcpSink(netns, timeout=300) as sink:
        run = guests.boot(traffic_plan(sink.port, ids=ids), append=append, sockets=[socket],
                          timeout=300)
        report = run.check_passed()
        sink.wait(timeout=30)
        return report, sink
