"""Section ``inprocess``: the Python cost of one access, no socket and no libvfio-user.

The devices are built as the server builds them (``open_device``, a ``none`` backend) and
their BAR region objects are called directly: for the transitional device's BAR0 that is
the whole legacy translation (admin command built, run by the owner, parsed, answered).
Reported per access kind: microseconds per access (best of a few runs, the cost of the
timing loop itself subtracted) and, for the legacy mix (or the modern one when there is no
transitional device), a cProfile summary: the top functions by cumulative and by own time.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from benchmarks.accesses import (
    CONFIG_REGION,
    LEGACY_KINDS,
    MODERN_KINDS,
    Access,
    AccessKind,
)
from benchmarks.common import REPO, JsonDict, Section, Settings
from vfuserver.device import ServedDevice, open_device
from vfuserver.devices.pci import Region
from vfuserver.spec import DeviceSpec

RUNS = 5
PROFILE_TOP = 15

Call = tuple[Callable[..., object], tuple[object, ...]]


def _calls(regions: dict[int, Region], accesses: Sequence[Access]) -> list[Call]:
    calls: list[Call] = []
    for access in accesses:
        region = regions[access.region]
        if access.is_write:
            calls.append((region.write, (access.offset, access.data)))
        else:
            calls.append((region.read, (access.offset, access.width)))
    return calls


def _loop(calls: list[Call], iterations: int) -> float:
    """Seconds for `iterations` accesses cycling through calls."""
    n = len(calls)
    start = time.perf_counter()
    for i in range(iterations):
        function, args = calls[i % n]
        function(*args)
    return time.perf_counter() - start


def _nothing(*args: object) -> None:
    pass


def time_kind(regions: dict[int, Region], kind: AccessKind, iterations: int) -> JsonDict:
    for function, args in _calls(regions, kind.all_setup):
        function(*args)
    calls = _calls(regions, kind.accesses)
    overhead = min(_loop([(_nothing, args) for _, args in calls], iterations)
                   for _ in range(RUNS)) / iterations
    best = min(_loop(calls, iterations) for _ in range(RUNS)) / iterations
    return {"us_per_access": (best - overhead) * 1e6, "loop_overhead_us": overhead * 1e6}


def profile_kind(regions: dict[int, Region], kind: AccessKind,
                 iterations: int) -> tuple[JsonDict, str]:
    """A cProfile run of `kind`: top functions as data, and pstats' own text."""
    calls = _calls(regions, kind.accesses)
    profiler = cProfile.Profile()
    profiler.enable()
    _loop(calls, iterations)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats(pstats.SortKey.CUMULATIVE).print_stats(PROFILE_TOP)
    stats.sort_stats(pstats.SortKey.TIME).print_stats(PROFILE_TOP)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    rows: list[JsonDict] = []
    for key, (_primitive, ncalls, own, cumulative, _callers) in raw.items():
        if key[2] == _loop.__name__:
            continue  # the timing loop itself
        rows.append({"function": _where(key), "calls": ncalls, "own_s": own,
                     "cumulative_s": cumulative,
                     "cumulative_us_per_access": cumulative / iterations * 1e6})
    by_cumulative = sorted(rows, key=lambda r: -r["cumulative_s"])[:PROFILE_TOP]
    by_own = sorted(rows, key=lambda r: -r["own_s"])[:PROFILE_TOP]
    summary = {"kind": kind.key, "iterations": iterations, "by_cumulative": by_cumulative,
               "by_own_time": by_own}
    return summary, text.getvalue()


def _where(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name  # a builtin
    path = Path(filename)
    try:
        filename = str(path.resolve().relative_to(REPO))
    except ValueError:
        filename = path.name
    return f"{filename}:{line}({name})"


def _regions(device: ServedDevice) -> dict[int, Region]:
    regions: dict[int, Region] = {bar.index: bar.region for bar in device.function.bars()}
    regions[CONFIG_REGION] = device.function.config_region()
    return regions


def run(settings: Settings, work: Path) -> Section:
    section = Section("inprocess")
    section.extra["method"] = (
        f"BAR region objects called directly; best of {RUNS} runs of "
        f"{settings.inprocess_iterations} accesses, minus the loop's own cost")
    profiled: tuple[JsonDict, str] | None = None
    for profile, kinds in (("transitional", LEGACY_KINDS), ("modern", MODERN_KINDS)):
        spec = DeviceSpec(name=f"inproc-{profile}", socket=str(work / f"inproc-{profile}.sock"),
                          profile=profile)
        device = trio.run(open_device, spec)
        try:
            regions = _regions(device)
            if any(k.accesses[0].region not in regions for k in kinds):
                section.skip(f"{profile} rows: the device has no BAR for them")
                continue
            for kind in kinds:
                section.rows.append({"key": kind.key, "label": kind.label, "profile": profile,
                                     "group": kind.group,
                                     **time_kind(regions, kind, settings.inprocess_iterations)})
            if profiled is None:
                mix = next((k for k in kinds if k.group == "mix"), kinds[0])
                profiled = profile_kind(regions, mix, settings.inprocess_iterations)
        finally:
            device.close()
    if profiled is not None:
        section.extra["profile"], section.extra["profile_text"] = profiled
    return section


def markdown(section: Section) -> list[str]:
    lines = [
        f"In-process cost of one access ({section.extra.get('method', '')}).",
        "",
        "| access | µs per access |",
        "| --- | ---: |",
    ]
    lines += [f"| {row['label']} | {row['us_per_access']:.2f} |" for row in section.rows]
    profile = section.extra.get("profile")
    if profile:
        lines += [
            "",
            f"Where the time goes: cProfile of `{profile['kind']}`, top functions by "
            f"cumulative time (µs per access; cProfile's own overhead inflates them).",
            "",
            "| function | calls | cumulative µs/access | own µs/access |",
            "| --- | ---: | ---: | ---: |",
        ]
        iterations = profile["iterations"]
        for row in profile["by_cumulative"][:10]:
            lines.append(f"| `{row['function']}` | {row['calls']} "
                         f"| {row['cumulative_us_per_access']:.2f} "
                         f"| {row['own_s'] / iterations * 1e6:.2f} |")
    return lines
