"""The benchmark report's targets and markdown, over hand-built results (no benchmark runs)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import report
from benchmarks.common import JsonDict, Section

MACHINE = {"qemu": "11.1.3", "cpu_model": "AMD EPYC", "cpus": 2, "os": "Debian 12",
           "kernel": "6.18", "python": "3.11.7", "gcc": "12.2.0"}
CODE = {"commit": "abc1234", "uncommitted": []}


def guest_row(key: str, label: str, reference: str | None = None, *, ping: float = 0.2,
              transfer: float = 1.3, receive: float = 1.1, ping_ratio: float | None = None,
              transfer_ratio: float | None = None, receive_ratio: float | None = None,
              failed: int = 0, target: bool = True) -> JsonDict:
    """A row as benchmarks.guest.run builds it (medians of three boots)."""
    row: JsonDict = {
        "key": key, "label": label, "append": "", "ping_count": 1000, "ping_seconds": ping,
        "rtt_avg_ms": 0.2, "transfer_mib": 64, "transfer_seconds": transfer,
        "guest_kernel": "6.1.0", "pci_id": "1af4:1000", "driver": "modern",
        "boot_seconds": 9.0, "ping_range": [ping, ping], "transfer_range": [transfer, transfer],
        "transfer_mib_per_s": 64 / transfer, "receive_seconds": receive,
        "receive_range": [receive, receive], "receive_mib_per_s": 64 / receive,
        "samples": [{}, {}, {}], "failed_boots": failed,
    }
    if reference is not None:
        row.update(reference=reference, target=target, ping_ratio=ping_ratio,
                   transfer_ratio=transfer_ratio, ping_ratio_best=ping_ratio,
                   transfer_ratio_best=transfer_ratio, receive_ratio=receive_ratio,
                   receive_ratio_best=receive_ratio)
    return row


GUEST_ROWS = [
    guest_row("qemu-default", "QEMU virtio-net-pci (default)"),
    guest_row("vfuserver-modern", "vfuserver modern", "qemu-default", ping_ratio=2.28,
              transfer_ratio=0.66, receive_ratio=0.95, failed=1),
    guest_row("vfuserver-transitional", "vfuserver transitional", "qemu-default",
              ping_ratio=2.25, transfer_ratio=0.84, receive_ratio=0.71),
    guest_row("qemu-force-legacy", "QEMU virtio-net-pci, virtio_pci.force_legacy=1"),
    guest_row("vfuserver-transitional-legacy",
              "vfuserver transitional, virtio_pci.force_legacy=1", "qemu-force-legacy",
              ping_ratio=3.11, transfer_ratio=1.01, receive_ratio=1.2),
]


def results_for(sections: dict[str, Section]) -> JsonDict:
    results: JsonDict = {
        "date": "2026-11-21 17:19 UTC", "command": "python -m benchmarks", "smoke": False,
        "machine": MACHINE, "code": CODE, "code_at_end": CODE, "loadavg_start": [0.16],
        "loadavg_end": [1.26], "duration_s": 661.0,
    }
    results["targets"] = report.targets(sections)
    return results


def tables(markdown: str) -> dict[str, list[str]]:
    """The body rows of each markdown table, by the heading above it."""
    out: dict[str, list[str]] = {}
    heading = ""
    for line in markdown.splitlines():
        if line.startswith("### "):
            heading = line[4:]
        elif line.startswith("| ") and not line.startswith("| ---"):
            out.setdefault(heading, []).append(line)
    return {name: rows[1:] for name, rows in out.items()}  # without the header row


def test_every_guest_row_is_printed_once() -> None:
    guest = Section("guest", rows=[dict(row) for row in GUEST_ROWS])
    guest.extra["setup"] = "QEMU TCG, 1 vCPU"
    sections = {"guest": guest}
    text = report.markdown(results_for(sections), sections)
    by_table = tables(text)

    guest_table = by_table["Guest-visible (data path)"]
    assert [line.split(" | ")[0] for line in guest_table] == [
        f"| {row['label']}" for row in GUEST_ROWS]
    # the targets table has one line per target, not one per guest row and target
    target_lines = by_table["Targets"]
    assert len(target_lines) == len(results_for(sections)["targets"]) == 9
    for row in GUEST_ROWS:
        assert sum(f" {row['label']} vs " in line for line in target_lines) <= 1, row["label"]


def test_guest_targets_are_decided_by_the_worst_configuration() -> None:
    sections = {"guest": Section("guest", rows=[dict(row) for row in GUEST_ROWS])}
    by_key = {t["key"]: t for t in report.targets(sections)}
    ping, transfer, receive = (by_key[key] for key in ("guest-ping", "guest-transfer",
                                                         "guest-receive"))
    assert (ping["measured"], ping["met"]) == (3.11, False)
    assert ping["detail"].startswith(
        "worst of 3: vfuserver transitional, virtio_pci.force_legacy=1 vs qemu-force-legacy")
    assert (transfer["measured"], transfer["met"]) == (0.66, False)
    assert transfer["detail"].startswith("worst of 3: vfuserver modern vs qemu-default")
    assert "1 boot(s) failed" in transfer["detail"]
    # each direction has its own worst configuration
    assert (receive["measured"], receive["met"]) == (0.71, False)
    assert receive["detail"].startswith("worst of 3: vfuserver transitional vs qemu-default")


def test_a_trade_off_row_is_shown_but_decides_no_target() -> None:
    """benchmarks.guest's polling row (target False): an operator's choice of CPU for
    latency, beside the defaults the targets are about."""
    polling = guest_row("vfuserver-modern-poll", "vfuserver modern, poll-max-ns 400000",
                        "qemu-default", ping_ratio=1.2, transfer_ratio=0.5, target=False)
    sections = {"guest": Section("guest", rows=[dict(row) for row in [*GUEST_ROWS, polling]])}
    by_key = {t["key"]: t for t in report.targets(sections)}
    assert (by_key["guest-ping"]["measured"], by_key["guest-transfer"]["measured"]) == \
        (3.11, 0.66)
    assert "worst of 3:" in by_key["guest-transfer"]["detail"]
    guest_table = tables(report.markdown(results_for(sections), sections))[
        "Guest-visible (data path)"]
    assert sum(polling["label"] in line for line in guest_table) == 1


@pytest.mark.parametrize(("ping_ratio", "transfer_ratio", "receive_ratio", "met"), [
    pytest.param(1.3, 0.9, 0.9, (True, True, True), id="at-the-limits"),
    pytest.param(1.31, 0.89, 0.89, (False, False, False), id="just-beyond"),
    pytest.param(1.0, 1.0, 1.0, (True, True, True), id="as-fast-as-qemu"),
    pytest.param(1.0, 1.0, 0.89, (True, True, False), id="receive-alone-short"),
])
def test_guest_target_thresholds(ping_ratio: float, transfer_ratio: float,
                                 receive_ratio: float, met: tuple[bool, bool, bool]) -> None:
    rows = [GUEST_ROWS[0], guest_row("vfuserver-modern", "vfuserver modern", "qemu-default",
                                     ping_ratio=ping_ratio, transfer_ratio=transfer_ratio,
                                     receive_ratio=receive_ratio)]
    by_key = {t["key"]: t for t in report.targets({"guest": Section("guest", rows=rows)})}
    assert tuple(by_key[key]["met"] for key in ("guest-ping", "guest-transfer",
                                                "guest-receive")) == met


@pytest.mark.parametrize(("sections", "reason"), [
    pytest.param({}, "not measured: the guest section did not run", id="not-run"),
    pytest.param({"guest": Section("guest", status="skipped",
                                   notes=["skipped: not root"])},
                 "not measured: no guest rows: skipped: not root", id="skipped"),
    pytest.param({"guest": Section("guest", rows=[GUEST_ROWS[0]])},
                 "not measured: no guest row this target compares", id="qemu-only"),
    pytest.param({"guest": Section("guest", rows=[GUEST_ROWS[0], guest_row(
        "vfuserver-modern", "vfuserver modern", "qemu-default")])},
        "not measured: the guest's clock (10 ms steps) saw no time pass", id="no-ratio"),
])
def test_a_target_without_a_measurement_says_why(sections: dict[str, Section],
                                                 reason: str) -> None:
    by_key = {t["key"]: t for t in report.targets(sections)}
    for key in ("guest-ping", "guest-transfer"):
        assert (by_key[key]["measured"], by_key[key]["met"]) == (None, None)
        assert by_key[key]["detail"] == reason


def test_met_is_a_bool_exactly_when_measured() -> None:
    """The contract the smoke test checks on a real run."""
    region = Section("region", rows=[
        {"profile": "transitional", "group": "register", "key": "legacy-status",
         "label": "legacy STATUS read", "ratio": 0.57, "placement": placement}
        for placement in ("cross", "same")] + [
        {"profile": "transitional", "group": "notify", "key": "legacy-notify",
         "label": "legacy QUEUE_NOTIFY write", "ratio": 0.6, "placement": placement}
        for placement in ("cross", "same")],
        extra={"placements": {"cross": "client on CPU 0, server on 1",
                              "same": "both on CPU 0"}})
    scale = Section("scale", rows=[
        {"devices": 1, "profile": "modern", "rss_per_extra_device_kib": None,
         "idle_cpu_percent": 0.0, "idle_attached_cpu_percent": 0.0},
        {"devices": 512, "profile": "transitional", "rss_per_extra_device_kib": 38.0,
         "idle_cpu_percent": 0.1, "idle_attached_cpu_percent": 0.3},
    ])
    all_targets: list[dict[str, Any]] = report.targets(
        {"region": region, "scale": scale, "guest": Section("guest", rows=GUEST_ROWS)})
    assert [t["key"] for t in all_targets] == [
        "legacy-access-cross", "legacy-notify-cross", "legacy-access-same", "legacy-notify-same",
        "guest-ping", "guest-transfer", "guest-receive", "rss-per-device", "idle-cpu"]
    for target in all_targets:
        assert isinstance(target["measured"], float)
        assert isinstance(target["met"], bool)
    assert [t["met"] for t in all_targets] == [False] * 7 + [True, True]
