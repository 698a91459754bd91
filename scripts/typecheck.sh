#!/usr/bin/env bash
# mypy over the package as it is installed: devices/ and protocol/ are vfuserver.devices
# and vfuserver.protocol (a setuptools package-dir mapping that mypy cannot follow), so
# mypy reads the sources through a tree of symlinks laid out like the installed package.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
SHADOW=$TOP/.deps/typecheck
"$TOP/scripts/package-tree.sh" "$SHADOW"
ln -s "$TOP/tests" "$SHADOW/tests"
[ -d "$TOP/benchmarks" ] && ln -s "$TOP/benchmarks" "$SHADOW/benchmarks"
cd "$SHADOW"
exec "$TOP/.venv/bin/mypy" --config-file "$TOP/pyproject.toml" "$@" vfuserver tests $( [ -d benchmarks ] && echo benchmarks )
