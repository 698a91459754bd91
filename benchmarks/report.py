"""The targets, computed from the measurements, and the markdown the README carries."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from benchmarks import guest, inprocess, region, scale, stress
from benchmarks.common import JsonDict, Section

MARKDOWN: Mapping[str, Callable[[Section], list[str]]] = {
    "region": region.markdown,
    "inprocess": inprocess.markdown,
    "guest": guest.markdown,
    "scale": scale.markdown,
    "stress": stress.markdown,
}
TITLES = {
    "region": "Region accesses (legacy translation path)",
    "inprocess": "In-process cost of the translation",
    "guest": "Guest-visible (data path)",
    "scale": "Scale",
    "stress": "Stress: loaded boots, queue failures",
}

LEGACY_ACCESS_MIN = 0.9
NOTIFY_MIN = 0.9
PING_MAX = 1.3
TRANSFER_MIN = 0.7
RSS_PER_DEVICE_MAX_MIB = 2.0


def _target(name: str, threshold: str, measured: float | None, met: bool | None,
            detail: str) -> JsonDict:
    return {"target": name, "threshold": threshold, "measured": measured, "met": met,
            "detail": detail}


def _guest_detail(row: JsonDict, best_key: str) -> str:
    best = row.get(best_key)
    failed = row.get("failed_boots", 0)
    return (f"vs {row['reference']}, medians"
            + ("" if best is None else f"; best against best {best:.2f}")
            + (f"; {failed} boot(s) failed" if failed else ""))


def targets(sections: Mapping[str, Section]) -> list[JsonDict]:
    """The issue's targets, each met, missed, or not measured (met None) in this run."""
    out: list[JsonDict] = []
    rows = sections["region"].rows if "region" in sections else []
    legacy = [r for r in rows if r["profile"] == "transitional" and r["group"] == "register"]
    name = "legacy register access rate, ours / C server (worst kind)"
    if legacy:
        worst = min(legacy, key=lambda r: r["ratio"])
        out.append(_target(name, f">= {LEGACY_ACCESS_MIN}", worst["ratio"],
                           worst["ratio"] >= LEGACY_ACCESS_MIN,
                           f"worst: {worst['label']}; "
                           f"best: {max(r['ratio'] for r in legacy):.2f}"))
    else:
        out.append(_target(name, f">= {LEGACY_ACCESS_MIN}", None, None, "not measured"))
    notify = next((r for r in rows if r["key"] == "legacy-notify"), None)
    name = "legacy queue notify rate, ours / C server"
    out.append(_target(name, f">= {NOTIFY_MIN}", notify["ratio"] if notify else None,
                       notify["ratio"] >= NOTIFY_MIN if notify else None,
                       notify["label"] if notify else "not measured"))

    guest_rows = [r for r in sections["guest"].rows if "reference" in r] \
        if "guest" in sections else []
    if not guest_rows:
        out.append(_target("guest ping time, ours / QEMU's device", f"<= {PING_MAX}", None,
                           None, "not measured"))
        out.append(_target("guest bulk transfer rate, ours / QEMU's device",
                           f">= {TRANSFER_MIN}", None, None, "not measured"))
    for row in guest_rows:
        ratio = row.get("ping_ratio")
        out.append(_target(f"guest ping time, ours / QEMU's device: {row['label']}",
                           f"<= {PING_MAX}", ratio,
                           None if ratio is None else ratio <= PING_MAX,
                           _guest_detail(row, "ping_ratio_best")))
    for row in guest_rows:
        ratio = row.get("transfer_ratio")
        out.append(_target(f"guest bulk transfer rate, ours / QEMU's device: {row['label']}",
                           f">= {TRANSFER_MIN}", ratio,
                           None if ratio is None else ratio >= TRANSFER_MIN,
                           _guest_detail(row, "transfer_ratio_best")))

    scale_rows = [r for r in sections["scale"].rows if r["rss_per_extra_device_kib"] is not None] \
        if "scale" in sections else []
    name = "RSS per extra device (worst N)"
    if scale_rows:
        worst = max(scale_rows, key=lambda r: r["rss_per_extra_device_kib"])
        mib = worst["rss_per_extra_device_kib"] / 1024
        out.append(_target(name, f"<= {RSS_PER_DEVICE_MAX_MIB} MiB", mib,
                           mib <= RSS_PER_DEVICE_MAX_MIB,
                           f"{worst['devices']} {worst['profile']} devices, idle"))
    else:
        out.append(_target(name, f"<= {RSS_PER_DEVICE_MAX_MIB} MiB", None, None,
                           "not measured"))
    return out


def _machine_line(results: JsonDict) -> str:
    m = results["machine"]
    qemu = m.get("qemu") or "not used"
    code = results["code"]
    changed = code["uncommitted"]
    version = f"vfuserver {code['commit']}" + (
        f" with uncommitted changes to {', '.join(changed)}" if changed else "")
    if results["code_at_end"] != code:
        version += (f" (**the code changed during the run**: {results['code_at_end']['commit']}"
                    " at the end)")
    return (f"Measured {results['date']}, {version}, on {m['cpu_model']} ({m['cpus']} CPUs), "
            f"{m['os']}, Linux {m['kernel']}, Python {m['python']}, QEMU {qemu}, "
            f"gcc {m['gcc']}; load average {results['loadavg_start'][0]} at the start, "
            f"{results['loadavg_end'][0]} at the end; `{results['command']}`, "
            f"{results['duration_s']:.0f} s.")


def markdown(results: JsonDict, sections: Mapping[str, Section]) -> str:
    lines = ["## Benchmarks", ""]
    if results["smoke"]:
        lines += ["**Smoke run**: every benchmark very briefly; the numbers mean nothing.", ""]
    lines += [_machine_line(results), "", "### Targets", "",
              "| target | wanted | measured | met |", "| --- | --- | ---: | --- |"]
    for t in results["targets"]:
        measured = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} ({t['detail']}) | {t['threshold']} | {measured} "
                     f"| {met} |")
    for name, section in sections.items():
        lines += ["", f"### {TITLES[name]}", ""]
        if section.rows:
            lines += MARKDOWN[name](section)
        for note in section.notes:
            lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
