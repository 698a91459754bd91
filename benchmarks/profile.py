"""Where the server's CPU time goes: ``perf record`` on a vfuserver process, by component.

    python -m benchmarks.profile access [--kind legacy-mac-read-1] [--seconds 5]
                                        [--placement same|cross] [--repo PATH]
    python -m benchmarks.profile ping [--profile transitional] [--count 40000]
                                      [--append virtio_pci.force_legacy=1] [--repo PATH]

``access`` runs the region benchmark's C client on one access kind (benchmarks/accesses.py)
against ``vfuserver run`` and records the server; ``ping`` boots the test guest against
vfuserver and records the server while the guest pings the host (``ping -A``). Either
prints the server's CPU time per access (or per ping round trip) split by component, from
``perf report --sort dso,sym``: the kernel's scheduler (context switches), the rest of the
kernel (syscalls, sockets, eventfds), the Python interpreter, cffi, libvfio-user, libc and
the rest. ``--repo`` runs another checkout's server (its .venv), e.g. an older commit, for a
before/after comparison; the client, guest and perf stay this checkout's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.accesses import ALL_KINDS
from benchmarks.cbuild import build
from benchmarks.common import REPO, HelperProcess, cpu_seconds, parse_fields, pinned

SCHEDULER = re.compile(r"finish_task_switch|__schedule|schedule|pick_next|switch_mm|"
                       r"__switch_to|context_switch|enqueue_task|dequeue_task|ttwu|"
                       r"try_to_wake_up|select_task_rq|update_curr|__update_load")
COMPONENTS = ("kernel: scheduler and wake-ups", "kernel: syscalls, sockets, eventfds",
              "Python interpreter", "cffi", "libvfio-user", "libc", "other")


def component(dso: str, symbol: str) -> str:
    if "kernel" in dso:
        return COMPONENTS[0] if SCHEDULER.search(symbol) else COMPONENTS[1]
    if "libpython" in dso or dso.startswith("python"):
        return COMPONENTS[2]
    if "cffi" in dso:
        return COMPONENTS[3]
    if "libvfio-user" in dso:
        return COMPONENTS[4]
    if "libc" in dso:
        return COMPONENTS[5]
    return COMPONENTS[6]


def breakdown(perf_data: Path) -> dict[str, float]:
    """Share of the samples (0..1) per component."""
    report = subprocess.run(
        ["perf", "report", "-i", str(perf_data), "--no-children", "--sort", "dso,sym",
         "--stdio", "-g", "none", "--percent-limit", "0"],
        capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = defaultdict(float)
    for line in report.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)", line)
        if match:
            shares[component(match.group(2), match.group(3))] += float(match.group(1)) / 100
    return shares


def table(title: str, per_unit_us: float, shares: dict[str, float], unit: str) -> str:
    lines = [f"{title}: server CPU {per_unit_us:.1f} µs per {unit}", "",
             f"| component | share | µs per {unit} |", "| --- | ---: | ---: |"]
    for name in COMPONENTS:
        share = shares.get(name, 0.0)
        lines.append(f"| {name} | {share * 100:.1f} % | {share * per_unit_us:.2f} |")
    return "\n".join(lines)


def record(pid: int, seconds: float, out: Path) -> None:
    subprocess.run(["perf", "record", "-F", "4999", "-g", "-p", str(pid), "-o", str(out),
                    "--", "sleep", f"{seconds}"], capture_output=True, check=True)


def python_of(repo: Path) -> str:
    python = repo / ".venv" / "bin" / "python"
    return str(python) if python.exists() else sys.executable


def profile_access(args: argparse.Namespace, work: Path) -> str:
    kind = next(k for k in ALL_KINDS if k.key == args.kind)
    programs = build()
    client_cpu, server_cpu = (0, 1) if args.placement == "cross" else (0, 0)
    socket_path = work / "s.sock"
    argv = pinned([python_of(args.repo), "-m", "vfuserver.cli", "--log-level", "warning",
                   "run", "--socket", str(socket_path), "--profile", kind.profile], server_cpu)
    with HelperProcess("vfuserver", argv, work / "server.log", cwd=args.repo) as server:
        server.start(socket_path.is_socket)
        client = [str(programs.client), str(socket_path), f"{args.seconds + 2}"]
        for access in kind.all_setup:
            client += ["-p", access.spec]
        client += [access.spec for access in kind.accesses]
        loop = subprocess.Popen(pinned(client, client_cpu), stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        before = cpu_seconds(server.pid)
        record(server.pid, args.seconds, work / "perf.data")
        spent = cpu_seconds(server.pid) - before
        out, _ = loop.communicate(timeout=60)
    fields = parse_fields(out)
    ops = float(fields["ops_per_s"]) * args.seconds
    shares = breakdown(work / "perf.data")
    return table(f"{kind.label}, {args.placement} CPU, {fields['ops_per_s']} accesses/s, "
                 f"server at {args.repo}", spent / ops * 1e6, shares, "access")


def profile_ping(args: argparse.Namespace, work: Path) -> str:
    """Boot the guest against vfuserver (tap in a namespace of our own) with a plan of
    pings only, and record the server during the flood ping."""
    from tests.e2e.rig import (  # the guest rig: only this subcommand needs QEMU
        HOST_ADDRESS,
        TAP,
        NamespaceNames,
        NetNamespace,
        Tools,
        VfuServer,
        boot_guest,
    )
    from tests.e2e.traffic import BRING_UP

    tools = Tools.prepare()
    exe = Path(python_of(args.repo)).parent / "vfuserver"
    sockets = Path(tempfile.mkdtemp(prefix="vfup-"))  # sun_path is 108 bytes
    ns = NetNamespace(NamespaceNames().next())
    ns.create()
    try:
        ns.add_tap(TAP)
        server = VfuServer(exe, sockets / "net0.sock", work / "server.log", ns,
                           ["--profile", args.profile, "--netdev", f"tap,ifname={TAP}"],
                           log_level="warning")
        server.start()
        try:
            plan = ",".join([*BRING_UP, f"ping:{HOST_ADDRESS}:count={args.count}:flood"
                             f":deadline=300"])
            result: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: result.setdefault("run", boot_guest(
                tools, work / "console.log", plan, ns=ns, append=args.append,
                sockets=[server.socket_path], timeout=400)))
            thread.start()
            console = work / "console.log"
            while thread.is_alive() and "PING" not in (
                    console.read_text(errors="replace") if console.exists() else ""):
                time.sleep(0.1)
            time.sleep(0.5)
            assert server.process is not None
            pid = server.process.pid
            before = cpu_seconds(pid)
            time.sleep(args.seconds)  # first without the profiler, which slows Python
            plain = cpu_seconds(pid) - before
            before = cpu_seconds(pid)
            record(pid, args.seconds, work / "perf.data")
            spent = cpu_seconds(pid) - before
            thread.join()
        finally:
            server.stop()
    finally:
        ns.delete()
    ping = result["run"].check_passed().step("ping", 1)
    if ping.float_field("seconds") < 2 * args.seconds + 1:
        # the windows started half a second into the ping: they must end before the ping
        raise SystemExit(f"the ping took {ping.float_field('seconds'):.1f} s, not longer "
                         f"than the 2 x {args.seconds:g} s measured: raise --count")
    per_ping = ping.float_field("seconds") / ping.int_field("count")
    label = args.profile + (f", {args.append}" if args.append else "")
    pings = args.seconds / per_ping  # in each window, at the ping's average pace
    return table(f"ping -A round trips ({label}; {per_ping * 1e6:.0f} µs each in the guest), "
                 f"server at {args.repo}; server CPU without the profiler "
                 f"{plain / pings * 1e6:.1f} µs per round trip, with it",
                 spent / pings * 1e6, breakdown(work / "perf.data"), "round trip")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    access = sub.add_parser("access")
    access.add_argument("--kind", default="legacy-mac-read-1",
                        choices=[k.key for k in ALL_KINDS])
    access.add_argument("--placement", choices=("same", "cross"), default="same")
    ping = sub.add_parser("ping")
    ping.add_argument("--profile", default="transitional")
    ping.add_argument("--append", default="")
    ping.add_argument("--count", type=int, default=40000)
    for p in (access, ping):
        p.add_argument("--seconds", type=float, default=5.0)
        p.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args(argv)
    args.repo = args.repo.resolve()
    with tempfile.TemporaryDirectory(prefix="vfuserver-profile-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        print(profile_access(args, work) if args.what == "access" else profile_ping(args, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
