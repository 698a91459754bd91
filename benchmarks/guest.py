"""Section ``guest``: what a real guest sees, vfuserver's device vs QEMU's own virtio-net-pci.

The end-to-end rig (tests/e2e/rig.py) boots the test guest under QEMU in a private network
namespace with a tap at 10.0.2.1; the guest runs ``ping -A -c 1000``, sends 64 MiB with nc
to a sink on the host and receives 64 MiB of random data with nc from a source on the host,
and reports the wall time of each. The same guest, tap and plan
run through vfuserver (modern profile; transitional profile with and without
``virtio_pci.force_legacy=1``) and through QEMU's built-in virtio-net-pci (QEMU's default,
transitional on q35's root bus, and the same with force_legacy), one boot each, in the
same run. Ratios compare each vfuserver row with the QEMU row whose guest driver matches.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import JsonDict, Section, Settings, loadavg
from tests.e2e.report import GuestReport
from tests.e2e.rig import (
    HOST_ADDRESS,
    TAP,
    GuestRun,
    NamespaceNames,
    NetNamespace,
    RigError,
    TcpSink,
    TcpSource,
    Tools,
    VfuServer,
    boot_guest,
    find_vfuserver,
    unusable_machine_reason,
)
from tests.e2e.traffic import BRING_UP

FORCE_LEGACY = "virtio_pci.force_legacy=1"


@dataclass(frozen=True)
class GuestConfig:
    """One way of giving the guest its NIC."""

    key: str
    label: str
    profile: str | None
    """vfuserver's profile; None: QEMU's built-in virtio-net-pci."""
    append: str = ""
    reference: str | None = None
    """The QEMU configuration a vfuserver row is compared with."""
    server_args: tuple[str, ...] = ()
    """More ``vfuserver run`` options."""
    target: bool = True
    """Whether the row counts for the issue's targets (False: an operator's trade-off,
    shown beside the defaults)."""


CONFIGS = (
    GuestConfig("qemu-default", "QEMU virtio-net-pci (default)", None),
    GuestConfig("vfuserver-modern", "vfuserver modern", "modern", reference="qemu-default"),
    GuestConfig("vfuserver-transitional", "vfuserver transitional", "transitional",
                reference="qemu-default"),
    GuestConfig("qemu-force-legacy", f"QEMU virtio-net-pci, {FORCE_LEGACY}", None,
                FORCE_LEGACY),
    GuestConfig("vfuserver-transitional-legacy", f"vfuserver transitional, {FORCE_LEGACY}",
                "transitional", FORCE_LEGACY, reference="qemu-force-legacy"),
    # Polling across a ping's round trip instead of the default 32 us: the serving thread
    # is not woken for the next kick or the transmit timer (latency for CPU, as QEMU's
    # IOThread poll-max-ns).
    GuestConfig("vfuserver-modern-poll", "vfuserver modern, poll-max-ns 400000", "modern",
                reference="qemu-default", server_args=("--poll-max-ns", "400000"),
                target=False),
)
SMOKE_CONFIGS = ("qemu-default", "vfuserver-modern")


def plan(settings: Settings, sink_port: int, source_port: int) -> str:
    timeout = settings.step_timeout
    return ",".join([
        *BRING_UP,
        f"ping:{HOST_ADDRESS}:count={settings.ping_count}:flood:deadline={timeout}",
        f"nc-send:{HOST_ADDRESS}:{sink_port}:mib={settings.transfer_mib}"
        f":timeout={timeout}",
        f"nc-recv:{HOST_ADDRESS}:{source_port}:timeout={timeout}",
    ])


def _driver(report: GuestReport) -> JsonDict:
    """PCI IDs of the function behind eth0 and whether the modern or legacy driver runs it."""
    for device in report.virtio_devices():
        if device.ifname == "eth0":
            for function in report.pci_functions():
                if function.bdf == device.pci:
                    return {"pci_id": f"{function.vendor:04x}:{function.device:04x}",
                            "driver": "modern" if device.version_1 else "legacy"}
    return {"pci_id": None, "driver": None}


def _device_errors(console: str, limit: int = 3) -> list[str]:
    """The guest kernel's complaints about the NIC (e.g. "output.0:id 4 is not a head!")."""
    lines = [line.strip() for line in console.splitlines()
             if ("virtio_net" in line or "net eth0:" in line) and "@@VFU" not in line]
    return lines[:limit]


def _check_plan(run: GuestRun) -> None:
    """RigError naming the failed steps and the kernel's NIC errors, unless all passed."""
    report = run.report
    failed = [str(step) for step in report.failed_steps]
    if run.killed:
        failed.append(f"QEMU killed by the host's timeout (console {run.console_path})")
    if not report.complete or failed:
        errors = _device_errors(run.console)
        raise RigError("; ".join(failed or [report.summary()])
                       + (f"; guest kernel: {' | '.join(errors)}" if errors else ""))


def _result(settings: Settings, report: GuestReport, sink: TcpSink,
            source: TcpSource) -> JsonDict:
    """The numbers of one boot whose plan passed; RigError if the data did not arrive
    intact in either direction."""
    ping = report.step("ping", 1)
    sent = report.step("nc-send")
    size = settings.transfer_mib << 20
    if sent.int_field("bytes") != size or (sink.received, sink.sha256) != (
            size, sent.fields["sha256"]):
        raise RigError(f"transfer mismatch: guest sent {sent.fields}, host got "
                       f"{sink.received} bytes")
    got = report.step("nc-recv")
    if (got.int_field("bytes"), got.fields["sha256"]) != (len(source.data), source.sha256):
        raise RigError(f"receive mismatch: guest got {got.fields}, host sent "
                       f"{len(source.data)} bytes sha256 {source.sha256}")
    return {
        "ping_count": ping.int_field("count"),
        "ping_seconds": ping.float_field("seconds"),
        "rtt_avg_ms": float(ping.fields.get("rtt_avg", "nan")),
        "transfer_mib": settings.transfer_mib,
        "transfer_seconds": sent.float_field("seconds"),
        "receive_seconds": got.float_field("seconds"),
        "guest_kernel": (report.boot or {}).get("kernel"),
        **_driver(report),
    }


def _boot(settings: Settings, tools: Tools, ns: NetNamespace, config: GuestConfig,
          work: Path, sockets_dir: Path, round_number: int) -> JsonDict:
    server: VfuServer | None = None
    try:
        sockets: list[Path] = []
        builtin: list[str] = []
        if config.profile is None:
            builtin.append(TAP)
        else:
            exe = find_vfuserver()
            if exe is None:
                raise RigError("no vfuserver console script next to this Python")
            server = VfuServer(exe, sockets_dir / f"{config.key}.sock",
                               work / f"guest-{config.key}-{round_number}-vfuserver.log", ns,
                               [*config.server_args, "--profile", config.profile,
                                "--netdev", f"tap,ifname={TAP}"],
                               log_level="info")
            server.start()
            sockets.append(server.socket_path)
        load_before = loadavg()
        data = os.urandom(settings.transfer_mib << 20)
        with TcpSink(ns, timeout=settings.guest_timeout) as sink, \
                TcpSource(ns, data, timeout=settings.guest_timeout) as source:
            run = boot_guest(tools, work / f"guest-{config.key}-{round_number}-console.log",
                             plan(settings, sink.port, source.port), ns=ns,
                             append=config.append, sockets=sockets, builtin_net=builtin,
                             timeout=settings.guest_timeout)
            _check_plan(run)
            sink.wait(timeout=30)
            result = _result(settings, run.report, sink, source)
        return {**result, "boot_seconds": run.seconds, "loadavg_before": load_before,
                "loadavg_after": loadavg()}
    finally:
        if server is not None:
            server.stop()


def guest_tools(section: Section) -> Tools | None:
    """QEMU and the test guest, or None with the section marked skipped (and why)."""
    reason = unusable_machine_reason()
    if reason is not None:
        section.skip(reason)
        print(f"benchmarks: {section.name} section skipped: {reason}", file=sys.stderr)
        return None
    try:
        return Tools.prepare()
    except (RigError, OSError) as exc:
        section.skip(f"QEMU or the test guest is unavailable: {exc}")
        return None


Boot = Callable[[NetNamespace, GuestConfig, Path, int], JsonDict]
"""One boot of a configuration: (namespace, config, sockets folder, round) -> numbers."""


def boot_rounds(settings: Settings, section: Section, wanted: Sequence[str], boot: Boot, *,
                configs: Sequence[GuestConfig] = CONFIGS, tap: bool = True,
                ) -> tuple[dict[str, list[JsonDict]], dict[str, int]]:
    """``settings.guest_repeats`` rounds over the wanted ``configs``, interleaved, in one
    namespace (with the tap if ``tap``); the numbers of each configuration's boots and how
    many failed (their errors are the section's notes)."""
    boots: dict[str, list[JsonDict]] = {}
    failures: dict[str, int] = {}
    sockets_dir = Path(tempfile.mkdtemp(prefix="vfub-"))  # short paths: sun_path is 108 bytes
    ns = NetNamespace(NamespaceNames().next())
    try:
        ns.create()
        if tap:
            ns.add_tap(TAP)
        for round_number in range(settings.guest_repeats):
            for config in configs:
                if config.key not in wanted:
                    continue
                try:
                    boots.setdefault(config.key, []).append(
                        boot(ns, config, sockets_dir, round_number))
                except (RigError, OSError, AssertionError, KeyError) as exc:
                    section.notes.append(f"{config.key} boot {round_number + 1} failed: {exc}")
                    section.status = "partial"
                    failures[config.key] = failures.get(config.key, 0) + 1
    finally:
        ns.delete()
        shutil.rmtree(sockets_dir, ignore_errors=True)
    return boots, failures


def run(settings: Settings, work: Path, configs: tuple[str, ...] | None = None) -> Section:
    section = Section("guest")
    tools = guest_tools(section)
    if tools is None:
        return section
    section.extra["qemu_path"] = str(tools.qemu)
    wanted = configs or (SMOKE_CONFIGS if settings.smoke else tuple(c.key for c in CONFIGS))
    boots, failures = boot_rounds(
        settings, section, wanted,
        lambda ns, config, sockets, number: _boot(settings, tools, ns, config, work, sockets,
                                                  number))

    kernel = next((b[0]["guest_kernel"] for b in boots.values() if b), None)
    section.extra["setup"] = (f"QEMU TCG, 1 vCPU, 512 MiB, guest Linux {kernel}; not pinned; "
                              f"median of {settings.guest_repeats} boots per row, the rows "
                              "interleaved")
    results = {key: {**_aggregate(samples), "failed_boots": failures.get(key, 0)}
               for key, samples in boots.items() if samples}
    reference_rows(section, CONFIGS, results, _ratios)
    return section


def _ratios(result: JsonDict, reference: JsonDict) -> JsonDict:
    return {
        "ping_ratio": _ratio(result["ping_seconds"], reference["ping_seconds"]),
        "transfer_ratio": _ratio(reference["transfer_seconds"], result["transfer_seconds"]),
        "receive_ratio": _ratio(reference["receive_seconds"], result["receive_seconds"]),
        # best against best: what is left when the machine's noise is taken out
        "ping_ratio_best": _ratio(result["ping_range"][0], reference["ping_range"][0]),
        "transfer_ratio_best": _ratio(reference["transfer_range"][0],
                                      result["transfer_range"][0]),
        "receive_ratio_best": _ratio(reference["receive_range"][0],
                                     result["receive_range"][0]),
    }


def reference_rows(section: Section, configs: Sequence[GuestConfig],
                   results: dict[str, JsonDict],
                   ratios: Callable[[JsonDict, JsonDict], JsonDict]) -> None:
    """One row per configuration that has results, in ``configs`` order; a row with a
    reference configuration also gets ``ratios(its result, the reference's)``. A section
    without rows has failed."""
    for config in configs:
        result = results.get(config.key)
        if result is None:
            continue
        row: JsonDict = {"key": config.key, "label": config.label, "append": config.append,
                         **result}
        reference = results.get(config.reference) if config.reference else None
        if reference is not None:
            row["reference"] = config.reference
            row["target"] = config.target
            row.update(ratios(result, reference))
        section.rows.append(row)
    if not section.rows:
        section.status = "failed"


def _aggregate(samples: list[JsonDict]) -> JsonDict:
    """Medians of the numbers of a configuration's boots; the samples themselves too."""
    out = dict(samples[0])
    for key in ("ping_seconds", "rtt_avg_ms", "transfer_seconds", "receive_seconds",
                "boot_seconds"):
        out[key] = statistics.median(s[key] for s in samples)
    for key in ("ping_seconds", "transfer_seconds", "receive_seconds"):
        out[key.replace("seconds", "range")] = [min(s[key] for s in samples),
                                                max(s[key] for s in samples)]
    for direction in ("transfer", "receive"):
        seconds = out[f"{direction}_seconds"]
        out[f"{direction}_mib_per_s"] = out["transfer_mib"] / seconds if seconds else None
    out["samples"] = [{k: s[k] for k in ("ping_seconds", "transfer_seconds", "receive_seconds",
                                         "loadavg_before", "loadavg_after")}
                      for s in samples]
    del out["loadavg_before"], out["loadavg_after"]
    return out


def _ratio(numerator: float, denominator: float) -> float | None:
    """None when the guest's clock (10 ms steps) saw no time pass."""
    return numerator / denominator if numerator > 0 and denominator > 0 else None


def _format(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pair(median: float | None, best: float | None) -> str:
    return "" if median is None else f"{median:.2f} ({_format(best)})"


def markdown(section: Section) -> list[str]:
    if not section.rows:
        return []
    first = section.rows[0]
    lines = [
        f"Guest-visible ({section.extra.get('setup', '')}): `ping -A -c "
        f"{first['ping_count']}`, an nc transfer of {first['transfer_mib']} MiB from the "
        f"guest to the host (send) and one of {first['transfer_mib']} MiB of random data "
        f"from the host to the guest (receive); times are medians (min-max); ratios "
        f"against the QEMU row with the same guest driver, median (best against best); "
        f"ping: time ours / QEMU, send and receive: throughput ours / QEMU.",
        "",
        "| device | PCI ID, driver | boots ok / failed | ping s | rtt avg ms | send s "
        "| send MiB/s | receive s | receive MiB/s | ping ours / QEMU | send ours / QEMU "
        "| receive ours / QEMU |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in section.rows:
        ping_lo, ping_hi = row["ping_range"]
        cells = [f"{row['ping_seconds']:.2f} ({ping_lo:.2f}-{ping_hi:.2f})",
                 f"{row['rtt_avg_ms']:.3f}"]
        for direction in ("transfer", "receive"):
            low, high = row[f"{direction}_range"]
            cells += [f"{row[f'{direction}_seconds']:.2f} ({low:.2f}-{high:.2f})",
                      _format(row[f"{direction}_mib_per_s"], 1)]
        cells += [_pair(row.get(f"{name}_ratio"), row.get(f"{name}_ratio_best"))
                  for name in ("ping", "transfer", "receive")]
        lines.append(f"| {row['label']} | {row['pci_id']}, {row['driver']} "
                     f"| {len(row['samples'])} / {row['failed_boots']} | "
                     + " | ".join(cells) + " |")
    return lines
