"""``python -m benchmarks``: run the benchmarks, write the results as JSON and markdown.

A complete run (every section, not --smoke) writes benchmarks/results/latest.json, latest.md
and latest-profile.txt (all git-ignored); ``--out FILE`` writes the JSON to FILE and the
markdown next to it (FILE with the suffix .md), whatever the run.
The markdown is printed as well, ready to paste into the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks import cbuild, disk, guest, hostile, inprocess, region, report, scale, stress
from benchmarks.common import (
    DEFAULT_SECTIONS,
    RESULTS_DIR,
    SECTIONS,
    JsonDict,
    Section,
    Settings,
    code_version,
    loadavg,
    machine_description,
    vfuserver_cli,
)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown section {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,64,512") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("device counts must be >= 1")
    return counts


def _guest_configs(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    known = [c.key for c in guest.CONFIGS]
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown guest configuration {', '.join(unknown)}; choose from {', '.join(known)}")
    return keys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="vfuserver's benchmarks: region accesses vs a C server, the in-process "
                    "cost of the legacy translation, a guest's ping and transfer vs QEMU's "
                    "own virtio-net-pci, and one process serving many devices.")
    parser.add_argument("--smoke", action="store_true",
                        help="run every benchmark very briefly (for the test suite); "
                             "writes only --out")
    parser.add_argument("--only", type=_names, metavar="SECTIONS",
                        help=f"comma-separated sections to run ({','.join(SECTIONS)}; default: "
                             f"{','.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--skip", type=_names, default=(), metavar="SECTIONS",
                        help="comma-separated sections not to run")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write the JSON to FILE and the markdown next to it (suffix .md) "
                             "(results/latest.* are written by complete runs only)")
    parser.add_argument("--seconds", type=float, help="length of one region-access loop")
    parser.add_argument("--repeats", type=int, help="loops per access kind and server")
    parser.add_argument("--placement", choices=("same", "cross", "free"),
                        help="CPU placement of client and server (default: the region "
                             "section measures cross, then same; the others use same)")
    parser.add_argument("--scale-counts", type=_counts, metavar="N,N,...",
                        help="device counts of the scale section (default 1,64,512)")
    parser.add_argument("--guest-configs", type=_guest_configs, metavar="KEYS",
                        help="guest configurations to boot: "
                             + ",".join(c.key for c in guest.CONFIGS))
    parser.add_argument("--guest-repeats", type=int, help="boots per guest configuration")
    parser.add_argument("--ping-count", type=int, help="pings of the guest section")
    parser.add_argument("--transfer-mib", type=int, help="MiB the guest sends")
    parser.add_argument("--disk-mib", type=int, help="MiB the disk section writes and reads")
    parser.add_argument("--disk-reads", type=int, help="random 4 KiB reads of the disk section")
    parser.add_argument("--stress-boots", type=int, help="boots of the stress section")
    parser.add_argument("--stress-parallel", type=int, help="stress boots at a time")
    parser.add_argument("--stress-hogs", type=int, help="CPU hogs during the stress section")
    parser.add_argument("--stress-mib", type=int, help="MiB each way per stress boot")
    parser.add_argument("--stress-smp", type=int, help="vCPUs of each stress guest (default 1)")
    parser.add_argument("--stress-qemu-server", metavar="QEMU",
                        help="serve the stress boots' NIC with QEMU's own x-vfio-user-server "
                             "(virtio-net-pci) from this QEMU binary, built with "
                             "--enable-vfio-user-server, instead of vfuserver")
    parser.add_argument("--stress-watch", action="store_true", default=None,
                        help="check every used ring from outside with ring_watch "
                             "(benchmarks/c/ring_watch.c) during the stress boots")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the work folder (server logs, guest consoles)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.smoke_settings() if args.smoke else Settings()
    overrides = {
        "seconds": args.seconds, "repeats": args.repeats, "placement": args.placement,
        "scale_counts": args.scale_counts, "ping_count": args.ping_count,
        "transfer_mib": args.transfer_mib, "guest_repeats": args.guest_repeats,
        "stress_boots": args.stress_boots, "stress_parallel": args.stress_parallel,
        "stress_hogs": args.stress_hogs, "stress_mib": args.stress_mib,
        "stress_watch": args.stress_watch, "stress_smp": args.stress_smp,
        "stress_qemu_server": args.stress_qemu_server,
        "disk_mib": args.disk_mib, "disk_reads": args.disk_reads,
    }
    if args.placement is not None:
        overrides["placements"] = (args.placement,)
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items()
                                            if v is not None})


def run_sections(names: Sequence[str], settings: Settings, work: Path,
                 guest_configs: tuple[str, ...] | None) -> dict[str, Section]:
    sections: dict[str, Section] = {}
    programs: cbuild.Programs | None = None
    build_error: str | None = None
    if {"region", "scale"} & set(names):
        try:
            programs = cbuild.build()
        except cbuild.BuildError as exc:
            build_error = str(exc)
    for name in names:
        print(f"benchmarks: {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        load_before = loadavg()
        try:
            if name in ("region", "scale"):
                if programs is None:
                    section = Section(name, status="failed",
                                      notes=[f"the C programs did not build: {build_error}"])
                else:
                    section = (region.run if name == "region" else scale.run)(
                        settings, programs, work)
            elif name == "inprocess":
                section = inprocess.run(settings, work)
            elif name == "stress":
                section = stress.run(settings, work)
            elif name == "disk":
                section = disk.run(settings, work)
            elif name == "hostile":
                section = hostile.run(settings, work, vfuserver_cli(log_level="info"))
            else:
                section = guest.run(settings, work, guest_configs)
        except Exception:
            section = Section(name, status="failed", notes=[traceback.format_exc()])
        section.seconds = time.monotonic() - started
        section.extra["loadavg_before"], section.extra["loadavg_after"] = load_before, loadavg()
        print(f"benchmarks: {name}: {section.status} in {section.seconds:.1f} s",
              file=sys.stderr, flush=True)
        sections[name] = section
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    names = [n for n in (args.only or DEFAULT_SECTIONS) if n not in args.skip]
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC)
    load_start = loadavg()
    code_start = code_version()
    work = Path(tempfile.mkdtemp(prefix="vfub-"))  # short: socket paths are limited
    sections: dict[str, Section] = {}
    try:
        sections = run_sections(names, settings, work, args.guest_configs)
    finally:
        troubled = [n for n, s in sections.items() if s.status in ("partial", "failed")]
        if args.keep_work or troubled or len(sections) < len(names):
            print(f"benchmarks: server logs and guest consoles kept in {work}",
                  file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    qemu = sections["guest"].extra.get("qemu_path") if "guest" in sections else None
    results: JsonDict = {
        "date": date.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "smoke": settings.smoke,
        "settings": dataclasses.asdict(settings),
        "machine": machine_description(Path(qemu) if qemu else None),
        "code": code_start,
        "code_at_end": code_version(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "duration_s": time.monotonic() - started,
        "sections": {name: section.to_json() for name, section in sections.items()},
    }
    results["targets"] = report.targets(sections)
    text = report.markdown(results, sections)
    encoded = json.dumps(results, indent=1, sort_keys=False) + "\n"
    complete = not settings.smoke and args.only is None and not args.skip
    if complete:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "latest.json").write_text(encoded)
        (RESULTS_DIR / "latest.md").write_text(text)
        profile = sections["inprocess"].extra.get("profile_text")
        if profile:
            (RESULTS_DIR / "latest-profile.txt").write_text(profile)
        print(f"benchmarks: results in {RESULTS_DIR}/latest.json and latest.md",
              file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(encoded)
        args.out.with_suffix(".md").write_text(text)
    print(text)
    return 1 if any(s.status == "failed" for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
