"""Compile the benchmark's C programs (benchmarks/c/) into a git-ignored folder.

They are built against the libvfio-user vfuserver itself links with: the include and
library directories come from vfuserver's cffi build script, which locates it (VFU_PREFIX,
pkg-config, then the project prefix .deps/prefix of scripts/get-libvfio-user.sh).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = Path(__file__).resolve().parent / "c"
BUILD_DIR = REPO / ".deps" / "bench"
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Werror"]


class BuildError(Exception):
    """gcc is missing or a program did not compile; the message carries gcc's output."""


@dataclass(frozen=True)
class Programs:
    """The compiled benchmark programs."""

    client: Path
    """vfu_region_client: the region-access loop (a vfio-user client)."""
    server: Path
    """c_reg_server: the C reference server on libvfio-user."""
    pingpong: Path
    """pingpong: raw AF_UNIX request/response, the floor."""
    ring_watch: Path
    """ring_watch: checks a guest's used rings against vfuserver's ring journals."""


def _compile(source: Path, output: Path, flags: list[str]) -> None:
    if output.exists() and output.stat().st_mtime >= source.stat().st_mtime:
        return
    cmd = ["gcc", *CFLAGS, "-o", str(output), str(source), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stderr}")


def build(dest: Path = BUILD_DIR) -> Programs:
    """Compile what is out of date into dest; the programs' paths."""
    if shutil.which("gcc") is None:
        raise BuildError("gcc is missing (apt-get install gcc)")
    from vfuserver._build import INCLUDE_DIRS, LIBRARY_DIRS

    includes = [f"-I{d}" for d in INCLUDE_DIRS]
    libs = [f for d in LIBRARY_DIRS for f in (f"-L{d}", f"-Wl,-rpath,{d}")]
    dest.mkdir(parents=True, exist_ok=True)
    programs = Programs(dest / "vfu_region_client", dest / "c_reg_server", dest / "pingpong",
                        dest / "ring_watch")
    _compile(SOURCES / "vfu_region_client.c", programs.client, includes)
    _compile(SOURCES / "c_reg_server.c", programs.server, [*includes, *libs, "-lvfio-user"])
    _compile(SOURCES / "pingpong.c", programs.pingpong, [])
    _compile(SOURCES / "ring_watch.c", programs.ring_watch, [])
    return programs
