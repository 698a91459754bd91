"""The targets, computed from the measurements, and the markdown the README carries."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from benchmarks import disk, guest, hostile, inprocess, region, scale, stress
from benchmarks.common import JsonDict, Section

MARKDOWN: Mapping[str, Callable[[Section], list[str]]] = {
    "region": region.markdown,
    "inprocess": inprocess.markdown,
    "guest": guest.markdown,
    "disk": disk.markdown,
    "scale": scale.markdown,
    "stress": stress.markdown,
    "hostile": hostile.markdown,
}
TITLES = {
    "region": "Region accesses (legacy translation path)",
    "inprocess": "In-process cost of the translation",
    "guest": "Guest-visible (data path)",
    "disk": "Disk (virtio-blk)",
    "scale": "Scale",
    "stress": "Stress: loaded boots, queue failures",
    "hostile": "Misbehaving clients: what another device sees",
}

LEGACY_ACCESS_MIN = 0.9
NOTIFY_MIN = 0.9
PING_MAX = 1.3
TRANSFER_MIN = 0.9
RSS_PER_DEVICE_MAX_MIB = 2.0
IDLE_CPU_MAX_PERCENT = 1.0
"""Issue 13: the idle CPU of 512 devices stays below 1 % of a core."""


def _target(key: str, name: str, threshold: str, measured: float | None, met: bool | None,
            detail: str) -> JsonDict:
    """One target: ``met`` is a bool whenever ``measured`` is a number, None only when it
    is not (and then ``detail`` says why)."""
    return {"key": key, "target": name, "threshold": threshold, "measured": measured,
            "met": met, "detail": detail}


def _unmeasured(key: str, name: str, threshold: str, reason: str) -> JsonDict:
    return _target(key, name, threshold, None, None, f"not measured: {reason}")


def _why_no_rows(sections: Mapping[str, Section], name: str) -> str:
    """Why section ``name`` gave nothing to compute a target from."""
    section = sections.get(name)
    if section is None:
        return f"the {name} section did not run"
    if section.rows:
        return f"no {name} row this target compares"
    if section.notes:
        return f"no {name} rows: {section.notes[0].splitlines()[0]}"
    return f"no {name} rows ({section.status})"


def _guest_target(key: str, name: str, rows: list[JsonDict], ratio_key: str, limit: float, *,
                  at_most: bool, no_rows: str) -> JsonDict:
    """A guest target over every vfuserver row with a QEMU reference row: the worst row
    decides. The guest table alone lists the rows and their ratios; a target line per row
    and target printed each of them again."""
    threshold = f"{'<=' if at_most else '>='} {limit}"
    if not rows:
        return _unmeasured(key, name, threshold, no_rows)
    rated = [r for r in rows if r.get(ratio_key) is not None]
    if not rated:
        return _unmeasured(key, name, threshold,
                           "the guest's clock (10 ms steps) saw no time pass")
    worst = (max if at_most else min)(rated, key=lambda r: r[ratio_key])
    ratio = worst[ratio_key]
    best = worst.get(f"{ratio_key}_best")
    failed = sum(r.get("failed_boots", 0) for r in rows)
    detail = (f"worst of {len(rated)}: {worst['label']} vs {worst['reference']}, medians"
              + ("" if best is None else f"; best against best {best:.2f}")
              + (f"; {failed} boot(s) failed" if failed else ""))
    return _target(key, name, threshold, ratio, ratio <= limit if at_most else ratio >= limit,
                   detail)


def targets(sections: Mapping[str, Section]) -> list[JsonDict]:
    """The issue's targets, each met, missed, or not measured (met None, with the reason)
    in this run."""
    out: list[JsonDict] = []
    rows = sections["region"].rows if "region" in sections else []
    placements = sections["region"].extra.get("placements", {}) if "region" in sections else {}
    for placement in placements or ("cross", "same"):
        placed = [r for r in rows if r.get("placement") == placement]
        where = "cross-CPU" if placement == "cross" else f"{placement} CPU"
        legacy = [r for r in placed if r["profile"] == "transitional"
                  and r["group"] == "register"]
        name = f"legacy register access rate, ours / C server, {where} (worst kind)"
        threshold = f">= {LEGACY_ACCESS_MIN}"
        if legacy:
            worst = min(legacy, key=lambda r: r["ratio"])
            out.append(_target(f"legacy-access-{placement}", name, threshold, worst["ratio"],
                               worst["ratio"] >= LEGACY_ACCESS_MIN,
                               f"worst: {worst['label']}; "
                               f"best: {max(r['ratio'] for r in legacy):.2f}"))
        else:
            out.append(_unmeasured(f"legacy-access-{placement}", name, threshold,
                                   _why_no_rows(sections, "region")))
        notify = next((r for r in placed if r["key"] == "legacy-notify"), None)
        name = f"legacy queue notify rate, ours / C server, {where}"
        threshold = f">= {NOTIFY_MIN}"
        if notify:
            out.append(_target(f"legacy-notify-{placement}", name, threshold, notify["ratio"],
                               notify["ratio"] >= NOTIFY_MIN, notify["label"]))
        else:
            out.append(_unmeasured(f"legacy-notify-{placement}", name, threshold,
                                   _why_no_rows(sections, "region")))

    guest_rows = [r for r in sections["guest"].rows if "reference" in r and r.get("target", True)] \
        if "guest" in sections else []
    no_guest_rows = _why_no_rows(sections, "guest")
    out.append(_guest_target(
        "guest-ping", "guest ping time, ours / QEMU's device (worst configuration)",
        guest_rows, "ping_ratio", PING_MAX, at_most=True, no_rows=no_guest_rows))
    out.append(_guest_target(
        "guest-transfer", "guest bulk transfer rate, guest to host, ours / QEMU's device "
        "(worst configuration)", guest_rows, "transfer_ratio", TRANSFER_MIN, at_most=False,
        no_rows=no_guest_rows))
    out.append(_guest_target(
        "guest-receive", "guest bulk transfer rate, host to guest, ours / QEMU's device "
        "(worst configuration)", guest_rows, "receive_ratio", TRANSFER_MIN, at_most=False,
        no_rows=no_guest_rows))

    scale_rows = [r for r in sections["scale"].rows if r["rss_per_extra_device_kib"] is not None] \
        if "scale" in sections else []
    name = "RSS per extra device (worst N)"
    threshold = f"<= {RSS_PER_DEVICE_MAX_MIB} MiB"
    if scale_rows:
        worst = max(scale_rows, key=lambda r: r["rss_per_extra_device_kib"])
        mib = worst["rss_per_extra_device_kib"] / 1024
        out.append(_target("rss-per-device", name, threshold, mib,
                           mib <= RSS_PER_DEVICE_MAX_MIB,
                           f"{worst['devices']} {worst['profile']} devices, idle"))
    else:
        out.append(_unmeasured("rss-per-device", name, threshold,
                               _why_no_rows(sections, "scale")))
    idle_rows = [r for r in sections["scale"].rows if "idle_cpu_percent" in r] \
        if "scale" in sections else []
    name = "idle CPU of the most devices, % of a core (worst of no client / all attached)"
    threshold = f"< {IDLE_CPU_MAX_PERCENT}"
    if idle_rows:
        most = max(idle_rows, key=lambda r: r["devices"])
        worst = max(most["idle_cpu_percent"], most["idle_attached_cpu_percent"])
        out.append(_target("idle-cpu", name, threshold, worst, worst < IDLE_CPU_MAX_PERCENT,
                           f"{most['devices']} {most['profile']} devices: "
                           f"{most['idle_cpu_percent']:.2f} % without clients, "
                           f"{most['idle_attached_cpu_percent']:.2f} % attached"))
    else:
        out.append(_unmeasured("idle-cpu", name, threshold, _why_no_rows(sections, "scale")))
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
