"""Section ``disk``: what a guest sees of a disk, vfuserver's virtio-blk vs QEMU's own
virtio-blk-pci on the same kind of image.

The test guest (tests/e2e/rig.py) runs its ``disk-bench`` step on /dev/vda: a sequential
write and a sequential read of ``disk_mib`` MiB with busybox ``dd bs=1M oflag=direct`` /
``iflag=direct``, then ``disk_reads`` reads of one random 4 KiB block, one ``dd bs=4k
count=1 iflag=direct`` each (busybox has no fio: every read costs a process start in the
guest, the same for both devices, so the IOPS compare the devices at queue depth 1 plus a
constant). Each boot gets a fresh sparse raw image of twice ``disk_mib``; both devices use
the host page cache (vfuserver without --direct, QEMU's default cache=writeback). Rows as
in the guest section: vfuserver modern and transitional against QEMU's default device
(transitional on q35's root bus), and with ``virtio_pci.force_legacy=1`` on both sides.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import JsonDict, Section, Settings, loadavg
from benchmarks.guest import (
    FORCE_LEGACY,
    GuestConfig,
    boot_rounds,
    guest_tools,
    reference_rows,
)
from tests.e2e.rig import (
    GuestRun,
    NetNamespace,
    RigError,
    Tools,
    VfuServer,
    boot_guest,
    find_vfuserver,
)

METRICS = ("seq_write_mibps", "seq_read_mibps", "read4k_iops")


CONFIGS = (
    GuestConfig("qemu-default", "QEMU virtio-blk-pci (default)", None),
    GuestConfig("vfuserver-modern", "vfuserver modern", "modern", reference="qemu-default"),
    GuestConfig("vfuserver-transitional", "vfuserver transitional", "transitional",
               reference="qemu-default"),
    GuestConfig("qemu-force-legacy", f"QEMU virtio-blk-pci, {FORCE_LEGACY}", None, FORCE_LEGACY),
    GuestConfig("vfuserver-transitional-legacy", f"vfuserver transitional, {FORCE_LEGACY}",
               "transitional", FORCE_LEGACY, reference="qemu-force-legacy"),
)
SMOKE_CONFIGS = ("qemu-default", "vfuserver-modern")


def _boot(settings: Settings, tools: Tools, ns: NetNamespace, config: GuestConfig, work: Path,
          sockets_dir: Path, round_number: int) -> JsonDict:
    image = work / f"disk-{config.key}-{round_number}.img"
    with open(image, "wb") as file:
        file.truncate(2 * settings.disk_mib << 20)
    server: VfuServer | None = None
    try:
        sockets: list[Path] = []
        qemu_args: list[str] = []
        if config.profile is None:
            qemu_args = ["-drive", f"file={image},if=none,id=disk0,format=raw",
                         "-device", "virtio-blk-pci,drive=disk0"]
        else:
            exe = find_vfuserver()
            if exe is None:
                raise RigError("no vfuserver console script next to this Python")
            server = VfuServer(exe, sockets_dir / f"{config.key}.sock",
                               work / f"disk-{config.key}-{round_number}-vfuserver.log", ns,
                               ["--device", "virtio-blk", "--image", str(image),
                                "--profile", config.profile], log_level="info")
            server.start()
            sockets.append(server.socket_path)
        load_before = loadavg()
        plan = f"lspci,virtio,disk-bench:mib={settings.disk_mib}:count={settings.disk_reads}"
        run = boot_guest(tools, work / f"disk-{config.key}-{round_number}-console.log", plan,
                         ns=ns, append=config.append, sockets=sockets, qemu_args=qemu_args,
                         timeout=settings.guest_timeout)
        return {**_result(run), "boot_seconds": run.seconds, "loadavg_before": load_before,
                "loadavg_after": loadavg()}
    finally:
        if server is not None:
            server.stop()
        image.unlink(missing_ok=True)


def _result(run: GuestRun) -> JsonDict:
    report = run.report
    if not report.complete or report.failed_steps or run.killed:
        raise RigError("; ".join(str(s) for s in report.failed_steps) or report.summary())
    bench = report.step("disk-bench")
    driver = None
    for device in report.virtio_devices():
        if device.driver == "virtio_blk":
            function = next(f for f in report.pci_functions() if f.bdf == device.pci)
            driver = {"pci_id": f"{function.vendor:04x}:{function.device:04x}",
                      "driver": "modern" if device.version_1 else "legacy"}
    if driver is None:
        raise RigError("the guest has no virtio_blk device")
    return {**driver, "mib": bench.int_field("mib"), "reads": bench.int_field("reads"),
            **{key: bench.float_field(key) for key in METRICS},
            "guest_kernel": (report.boot or {}).get("kernel")}


def run(settings: Settings, work: Path) -> Section:
    section = Section("disk")
    tools = guest_tools(section)
    if tools is None:
        return section
    wanted = SMOKE_CONFIGS if settings.smoke else tuple(c.key for c in CONFIGS)
    boots, failures = boot_rounds(
        settings, section, wanted,
        lambda ns, config, sockets, number: _boot(settings, tools, ns, config, work, sockets,
                                                  number),
        configs=CONFIGS, tap=False)
    kernel = next((b[0]["guest_kernel"] for b in boots.values() if b), None)
    section.extra["setup"] = (f"QEMU TCG, 1 vCPU, 512 MiB, guest Linux {kernel}; not pinned; "
                              f"median of {settings.guest_repeats} boots per row")
    results = {key: _aggregate(samples, failures.get(key, 0))
               for key, samples in boots.items() if samples}
    reference_rows(section, CONFIGS, results, _ratios)
    return section


def _ratios(result: JsonDict, reference: JsonDict) -> JsonDict:
    """Rates, so ours / QEMU: higher is better."""
    return {f"{key}_ratio": result[key] / reference[key]
            if result[key] > 0 and reference[key] > 0 else None for key in METRICS}


def _aggregate(samples: list[JsonDict], failed: int) -> JsonDict:
    out = {k: v for k, v in samples[0].items() if k not in ("loadavg_before", "loadavg_after")}
    for key in (*METRICS, "boot_seconds"):
        out[key] = statistics.median(s[key] for s in samples)
    out["samples"] = [{k: s[k] for k in (*METRICS, "loadavg_before", "loadavg_after")}
                      for s in samples]
    out["failed_boots"] = failed
    return out


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(section: Section) -> list[str]:
    if not section.rows:
        return []
    first = section.rows[0]
    lines = [
        f"Disk ({section.extra.get('setup', '')}): busybox dd in the guest on /dev/vda, "
        f"{first['mib']} MiB sequential with bs=1M oflag=direct / iflag=direct, then "
        f"{first['reads']} random 4 KiB reads with iflag=direct, one dd process each (queue "
        "depth 1; the process start is part of every read, on both devices); medians; ratios "
        "ours / QEMU's virtio-blk-pci with the same guest driver (higher is better).",
        "",
        "| device | PCI ID, driver | boots ok / failed | write MiB/s | read MiB/s "
        "| 4 KiB reads/s | write ours / QEMU | read ours / QEMU | 4 KiB ours / QEMU |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in section.rows:
        lines.append(
            f"| {row['label']} | {row['pci_id']}, {row['driver']} "
            f"| {len(row['samples'])} / {row['failed_boots']} "
            f"| {row['seq_write_mibps']:.1f} | {row['seq_read_mibps']:.1f} "
            f"| {row['read4k_iops']:.1f} | {_ratio(row.get('seq_write_mibps_ratio'))} "
            f"| {_ratio(row.get('seq_read_mibps_ratio'))} "
            f"| {_ratio(row.get('read4k_iops_ratio'))} |")
    return lines
