"""Section ``region``: region accesses over the vfio-user socket, vfuserver vs a C server.

The C client (benchmarks/c/vfu_region_client.c) keeps one request outstanding, as a vCPU
does for an IO port access, and counts completed accesses per second. It runs against
vfuserver (``vfuserver run --profile transitional`` for the legacy BAR0 kinds, the modern
profile for the BAR4 kinds), against the C server (benchmarks/c/c_reg_server.c, the same
libvfio-user and loop structure with a trivial register file) and, as the floor, a raw
AF_UNIX ping-pong with vfio-user-sized messages. All servers run at once, each kind is
measured against each server in turn, and the whole round is repeated: drift in the
machine's load hits both sides alike. Reported: the median ops/s, the server's CPU time per
access (from /proc/PID/stat), and the ratio ours / C.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.accesses import LEGACY_BAR, LEGACY_KINDS, MODERN_KINDS, AccessKind
from benchmarks.cbuild import Programs
from benchmarks.common import (
    BenchmarkError,
    HelperProcess,
    JsonDict,
    Section,
    Settings,
    cpu_seconds,
    parse_fields,
    pinned,
    vfuserver_argv,
)
from vfuserver.client import Client


def measure(programs: Programs, server: HelperProcess, socket_path: Path, kind: AccessKind,
            seconds: float, cpu: int | None) -> JsonDict:
    """One timed loop of `kind` against a running server."""
    argv = [str(programs.client), str(socket_path), f"{seconds}"]
    for access in kind.all_setup:
        argv += ["-p", access.spec]
    argv += [access.spec for access in kind.accesses]
    return _timed_client(pinned(argv, cpu), server, seconds)


def measure_floor(programs: Programs, server: HelperProcess, socket_path: Path,
                  seconds: float, cpu: int | None) -> JsonDict:
    argv = [str(programs.pingpong), "client", str(socket_path), f"{seconds}"]
    return _timed_client(pinned(argv, cpu), server, seconds)


def _timed_client(argv: Sequence[str], server: HelperProcess, seconds: float) -> JsonDict:
    before = cpu_seconds(server.pid)
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                          timeout=seconds + 60, stdin=subprocess.DEVNULL)
    after = cpu_seconds(server.pid)
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    fields = parse_fields(proc.stdout)
    ops = int(fields["ops"])
    return {
        "ops": ops,
        "ops_per_s": float(fields["ops_per_s"]),
        "us_per_op": float(fields["us_per_op"]),
        "server_cpu_us_per_op": (after - before) / ops * 1e6,
    }


@contextmanager
def vfuserver_process(work: Path, name: str, profile: str,
                      cpu: int | None) -> Iterator[tuple[HelperProcess, Path]]:
    """A ``vfuserver run --profile PROFILE`` process pinned to cpu, and its socket."""
    socket_path = work / f"{name}.sock"
    argv = pinned(vfuserver_argv(socket_path, "--profile", profile, "--name", name),
                  cpu)
    with HelperProcess(name, argv, work / f"{name}.log") as server:
        server.start(socket_path.is_socket)
        yield server, socket_path


def transitional_unavailable(socket_path: Path) -> str | None:
    """Why a running ``--profile transitional`` server cannot be measured, or None."""
    with Client(str(socket_path)) as client:
        info = client.region_info(LEGACY_BAR)
    if info.size == 0:
        return "the transitional device has no BAR0 yet (the legacy presentation is not there)"
    return None


def run(settings: Settings, programs: Programs, work: Path) -> Section:
    """Every placement of ``settings.placements`` in turn (cross first); each row names its
    placement, the section's floor and notes are per placement."""
    section = Section("region")
    section.extra["seconds_per_loop"] = settings.seconds
    section.extra["repeats"] = settings.repeats
    section.extra["placements"] = {}
    section.extra["floor"] = {}
    for placement in settings.placements:
        placed = dataclasses.replace(settings, placement=placement)
        folder = work / f"region-{placement}"
        folder.mkdir(exist_ok=True)
        section.extra["placements"][placement] = placed.describe_placement()
        _run_placement(section, placed, programs, folder)
    return section


def _run_placement(section: Section, settings: Settings, programs: Programs,
                   work: Path) -> None:
    placement = settings.placement
    client_cpu, server_cpu = settings.cpus
    with ExitStack() as stack:
        c_socket = work / "c.sock"
        c_server = stack.enter_context(HelperProcess(
            "c_reg_server", pinned([str(programs.server), str(c_socket)], server_cpu),
            work / "c_reg_server.log"))
        c_server.start(c_socket.is_socket)
        floor_socket = work / "pingpong.sock"
        floor = stack.enter_context(HelperProcess(
            "pingpong", pinned([str(programs.pingpong), "server", str(floor_socket)],
                               server_cpu), work / "pingpong.log"))
        floor.start(floor_socket.is_socket)

        ours: dict[str, tuple[HelperProcess, Path]] = {
            "modern": stack.enter_context(vfuserver_process(work, "modern", "modern",
                                                            server_cpu))}
        kinds = list(MODERN_KINDS)
        try:
            transitional = stack.enter_context(
                vfuserver_process(work, "transitional", "transitional", server_cpu))
            reason = transitional_unavailable(transitional[1])
        except (BenchmarkError, OSError) as exc:
            reason = f"vfuserver run --profile transitional failed: {exc}"
        if reason is None:
            ours["transitional"] = transitional
            kinds = list(LEGACY_KINDS) + kinds
        else:
            section.skip(f"legacy BAR0 rows ({placement}): {reason}")

        samples: dict[tuple[str, str], list[JsonDict]] = {}
        failed: dict[str, str] = {}
        for _ in range(settings.repeats):
            samples.setdefault(("floor", "pingpong"), []).append(
                measure_floor(programs, floor, floor_socket, settings.seconds, client_cpu))
            for kind in kinds:
                if kind.key in failed:
                    continue
                server, socket_path = ours[kind.profile]
                targets = (("vfuserver", server, socket_path), ("c", c_server, c_socket))
                for side, process, path in targets:
                    try:
                        result = measure(programs, process, path, kind, settings.seconds,
                                         client_cpu)
                    except (BenchmarkError, subprocess.TimeoutExpired) as exc:
                        failed[kind.key] = f"{side}: {exc}"
                        break
                    samples.setdefault((kind.key, side), []).append(result)

    for key, error in failed.items():
        section.notes.append(f"{key} ({placement}) failed, no row: {error}")
        section.status = "partial"
    floor_row = _aggregate(samples[("floor", "pingpong")])
    section.extra["floor"][placement] = {"label": "raw AF_UNIX ping-pong (C, no libvfio-user)",
                                         **floor_row}
    for kind in kinds:
        if kind.key in failed:
            continue
        ours_row = _aggregate(samples[(kind.key, "vfuserver")])
        c_row = _aggregate(samples[(kind.key, "c")])
        section.rows.append({
            "key": kind.key,
            "label": kind.label,
            "placement": placement,
            "profile": kind.profile,
            "group": kind.group,
            "accesses": [a.spec for a in kind.accesses],
            "vfuserver": ours_row,
            "c": c_row,
            "ratio": ours_row["ops_per_s"] / c_row["ops_per_s"],
        })


def _aggregate(samples: list[JsonDict]) -> JsonDict:
    return {
        "ops_per_s": statistics.median(s["ops_per_s"] for s in samples),
        "us_per_op": statistics.median(s["us_per_op"] for s in samples),
        "server_cpu_us_per_op": statistics.median(s["server_cpu_us_per_op"] for s in samples),
        "samples": [round(s["ops_per_s"]) for s in samples],
    }


def markdown(section: Section) -> list[str]:
    lines = [
        f"Region accesses over the vfio-user socket, one request outstanding; median of "
        f"{section.extra.get('repeats')} loops of {section.extra.get('seconds_per_loop')} s. "
        f"Writes wait for their reply (QEMU waits for IO-port writes; it posts memory-BAR "
        f"writes). Server CPU: the server process's CPU time per access. Placements: "
        + "; ".join(f"{name}: {text}" for name, text in
                    section.extra.get("placements", {}).items()) + ".",
        "",
        "| placement | access | vfuserver ops/s | C server ops/s | ours / C | vfuserver µs/op "
        "| server CPU µs/op (ours / C) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for placement in section.extra.get("placements", {}):
        for row in (r for r in section.rows if r.get("placement") == placement):
            ours, c = row["vfuserver"], row["c"]
            lines.append(
                f"| {placement} | {row['label']} | {ours['ops_per_s']:,.0f} "
                f"| {c['ops_per_s']:,.0f} | {row['ratio']:.2f} | {ours['us_per_op']:.1f} "
                f"| {ours['server_cpu_us_per_op']:.1f} / {c['server_cpu_us_per_op']:.1f} |")
        floor = section.extra.get("floor", {}).get(placement)
        if floor:
            lines.append(f"| {placement} | floor: {floor['label']} | | "
                         f"{floor['ops_per_s']:,.0f} | | {floor['us_per_op']:.1f} "
                         f"| {floor['server_cpu_us_per_op']:.1f} |")
    return lines
