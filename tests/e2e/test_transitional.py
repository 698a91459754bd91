"""The transitional profile under QEMU 11 with a real guest: legacy and modern drivers."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from .rig import TAP, Guests, NetNamespace, Servers
from .traffic import check_traffic, run_traffic_plan

pytestmark = pytest.mark.e2e

VENDOR = 0x1AF4
TRANSITIONAL_NET = 0x1000


@pytest.mark.parametrize(("append", "version_1"), [
    pytest.param("virtio_pci.force_legacy=1", False, id="legacy-driver"),
    # no MSI in the guest: the interrupts are INTx with the ISR (vp_interrupt), raised
    # by the data run in C as the model raises them (VirtioPciTransport._raise)
    pytest.param("virtio_pci.force_legacy=1 pci=nomsi", False, id="legacy-driver-intx"),
    pytest.param("", True, id="modern-driver"),
])
def test_transitional_traffic_plan(servers: Servers, guests: Guests, netns: NetNamespace,
                                   append: str, version_1: bool) -> None:
    server = servers.start("--profile", "transitional", "--netdev", f"tap,ifname={TAP}")
    report, sink = run_traffic_plan(guests, netns, server.socket_path, append=append,
                                    ids="1af4:1000")

    function = report.pci_function(VENDOR, TRANSITIONAL_NET)
    assert function.revision == 0
    assert (function.subvendor, function.subdevice) == (VENDOR, 0x0001)
    assert function.class_code == 0x020000
    assert len(function.io_bars) == 1
    device = report.virtio_device_on(function.bdf)
    assert (device.device_id, device.driver) == (1, "virtio_net")
    assert device.version_1 == version_1
    check_traffic(report, sink)

    server.stop()
    stats = server_stats(server.log)
    legacy = defaultdict(int, stats["legacy"])
    admin = defaultdict(int, stats["admin"])
    fast = defaultdict(int, stats["fast_path"])
    legacy_fast = ("fast:legacy-notify", "fast:legacy-isr-read", "fast:legacy-status-read")
    # the data path's runs went through C whole (vfuserver/netpath.py NetRun), most of them
    assert stats["net_path"]["runs"] > stats["net_path"]["runs_left"]
    # the owner never failed nor crashed on a command (names: tests/devices/test_legacy_io.py)
    assert (admin["malformed"], admin["bugs"]) == (0, 0)
    legacy_cfg = ("LEGACY_COMMON_CFG_READ", "LEGACY_COMMON_CFG_WRITE", "LEGACY_DEV_CFG_READ",
                  "LEGACY_DEV_CFG_WRITE")
    if version_1:
        # the modern driver never touches the IO BAR: no access, no legacy admin command
        assert not any(k.startswith("access:") for k in legacy) and legacy["fast_notifies"] == 0
        assert [fast[name] for name in legacy_fast] == [0, 0, 0]
        # every kick took the native fast path: the driver kicks the receive queue when it
        # fills it (virtnet_open) and the transmit queue for the transfer; how often is up to
        # event idx and timing (the tx timer keeps notifications off while frames flow), so
        # only "at least once" is the driver's behaviour, and no kick reached Python
        assert fast["fast:notify-0"] > 0 and fast["fast:notify-1"] > 0
        assert fast["kick_signals"] == 0
        assert [admin[f"opcode:{name}"] for name in legacy_cfg] == [0, 0, 0, 0]
    else:
        # every register access of the legacy driver went through an admin command, or was
        # answered natively from the register image the model published (reads without a
        # side effect once the mode is settled, QUEUE_SEL, a STATUS rewrite); Linux's
        # legacy probe reads each queue's size (setup_vq: rx, tx, control) and the MAC
        # from the device config (virtnet_probe), and places each queue with QUEUE_PFN
        def seen(verb: str, register: str) -> int:
            return legacy[f"access:{verb}:{register}"] + fast[f"fast:legacy-{verb}:{register}"]

        assert seen("write", "STATUS") > 0 and seen("read", "HOST_FEATURES") > 0
        assert seen("read", "QUEUE_NUM") >= 3 and legacy["access:write:QUEUE_PFN"] >= 3
        assert seen("read", "device-config") >= 6
        reads = sum(v for k, v in legacy.items() if k.startswith("access:read:"))
        writes = sum(v for k, v in legacy.items() if k.startswith("access:write:"))
        assert admin["opcode:LEGACY_COMMON_CFG_READ"] + admin["opcode:LEGACY_DEV_CFG_READ"] \
            == reads
        assert admin["opcode:LEGACY_COMMON_CFG_WRITE"] + admin["opcode:LEGACY_DEV_CFG_WRITE"] \
            == writes
        # ... and all succeeded; kicks took the native fast path (no Python, no admin
        # command), and so did the ISR reads of the INTx handler (vp_interrupt)
        for name in legacy_cfg:
            assert admin[f"status:{name}:OK"] == admin[f"opcode:{name}"], name
        # (how many is up to timing, as above; none reached Python)
        assert fast["fast:legacy-notify"] > 0 and legacy["fast_notifies"] == 0
        assert fast["kick_signals"] == 0
        if "pci=nomsi" in append:
            assert function.msi_irqs == 0 and fast["fast:legacy-isr-read"] > 0


def server_stats(log: str) -> dict[str, dict[str, int]]:
    match = re.search(r"stats of net0 \(profile transitional\): (\{.*\})$", log, re.MULTILINE)
    assert match, "the server logs its counters when it stops"
    stats: dict[str, dict[str, int]] = json.loads(match.group(1))
    return stats
