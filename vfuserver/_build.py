"""cffi build script for the libvfio-user binding (API mode, out-of-line).

Run by setuptools at install time (``cffi_modules`` in setup.py). Where libvfio-user
comes from, first match wins: ``VFU_PREFIX`` (a prefix with include/vfio-user/ and lib/),
pkg-config's ``libvfio-user``, or the project-local prefix ``.deps/prefix`` that
scripts/get-libvfio-user.sh builds.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
DECLARATIONS = HERE / "decl" / "libvfio-user.h"
"""The cdef: what Python sees of libvfio-user and of C_SOURCE."""
C_SOURCE = HERE / "csrc" / "vfuserver.c"
"""vfuserver's own C code, compiled with the generated module."""


def _pkg_config() -> tuple[list[str], list[str]] | None:
    try:
        cflags = subprocess.run(["pkg-config", "--cflags-only-I", "libvfio-user"],
                                check=True, capture_output=True, text=True).stdout
        libs = subprocess.run(["pkg-config", "--libs-only-L", "libvfio-user"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    incs = [f[2:] for f in shlex.split(cflags)]
    libdirs = [f[2:] for f in shlex.split(libs)]
    # the library's own includes are "libvfio-user.h", under <prefix>/include/vfio-user
    incs += [os.path.join(i, "vfio-user") for i in incs]
    return incs, libdirs


def _locate() -> tuple[list[str], list[str]]:
    prefix = os.environ.get("VFU_PREFIX")
    if not prefix:
        found = _pkg_config()
        if found is not None:
            return found
        prefix = str(HERE.parent / ".deps" / "prefix")
    include = Path(prefix) / "include" / "vfio-user"
    if not (include / "libvfio-user.h").is_file():
        sys.exit(
            f"vfuserver: libvfio-user not found (looked in VFU_PREFIX, pkg-config and {prefix}).\n"
            "Run scripts/get-libvfio-user.sh (or 'make setup') first, or set VFU_PREFIX."
        )
    libdirs = [str(Path(prefix) / d) for d in ("lib", "lib64", "lib/x86_64-linux-gnu")
               if (Path(prefix) / d).is_dir()]
    return [str(include)], libdirs


INCLUDE_DIRS, LIBRARY_DIRS = _locate()

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS.read_text())
ffibuilder.set_source(
    "vfuserver._vfu_cffi",
    C_SOURCE.read_text(),
    include_dirs=[str(C_SOURCE.parent), *INCLUDE_DIRS],
    library_dirs=LIBRARY_DIRS,
    runtime_library_dirs=LIBRARY_DIRS,
    libraries=["vfio-user"],
    define_macros=[("_GNU_SOURCE", None)],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent), verbose=True)
