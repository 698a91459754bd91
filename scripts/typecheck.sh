#!/usr/bin/env bash
# mypy over the package as it is installed: devices/ and protocol/ are vfuserver.devices
# and vfuserver.protocol (a setuptools package-dir mapping that mypy cannot follow), so
# mypy reads the sources through a tree of symlinks laid out like the installed package.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
SHADOW=$TOP/.deps/typecheck
rm -rf "$SHADOW"; mkdir -p "$SHADOW/vfuserver"
for f in "$TOP"/vfuserver/*.py "$TOP"/vfuserver/py.typed; do ln -s "$f" "$SHADOW/vfuserver/"; done
for d in "$TOP"/vfuserver/*/; do  # subpackages (vfuserver/control)
    [ -f "$d/__init__.py" ] && ln -s "${d%/}" "$SHADOW/vfuserver/"
done
ln -s "$TOP/devices" "$SHADOW/vfuserver/devices"
ln -s "$TOP/protocol" "$SHADOW/vfuserver/protocol"
ln -s "$TOP/tests" "$SHADOW/tests"
[ -d "$TOP/benchmarks" ] && ln -s "$TOP/benchmarks" "$SHADOW/benchmarks"
cd "$SHADOW"
exec "$TOP/.venv/bin/mypy" --config-file "$TOP/pyproject.toml" "$@" vfuserver tests $( [ -d benchmarks ] && echo benchmarks )
