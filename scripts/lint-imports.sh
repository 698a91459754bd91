#!/usr/bin/env bash
# import-linter over the package as it is installed; the contracts are [tool.importlinter] in
# pyproject.toml. grimp finds modules by walking the package's directory, so it reads a tree
# of symlinks laid out like the installed package (scripts/package-tree.sh), in which the
# compiled extension, which it cannot read, gets an empty stand-in so contracts can name it.
# It runs in that tree because lint-imports puts its working directory first on sys.path.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
TREE=$TOP/.deps/import-tree
"$TOP/scripts/package-tree.sh" "$TREE"
# Always: an editable install keeps the built extension outside the source tree, and the
# contracts only need its name.
: > "$TREE/vfuserver/_vfu_cffi.py"
cd "$TREE"
exec "$TOP/.venv/bin/lint-imports" --no-cache --no-logo "$@" "$TOP/pyproject.toml"
