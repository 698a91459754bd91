#!/usr/bin/env bash
# package-tree.sh DIR: lay out the sources in DIR as the package is installed, with symlinks.
# devices/ and protocol/ are vfuserver.devices and vfuserver.protocol (a setuptools package-dir
# mapping, pyproject.toml); the editable install maps them with an import hook that tools
# reading the file system (mypy, import-linter's grimp) cannot follow. DIR is emptied first.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
TREE=$1
rm -rf "$TREE"; mkdir -p "$TREE/vfuserver"
for f in "$TOP"/vfuserver/*.py "$TOP"/vfuserver/py.typed; do ln -s "$f" "$TREE/vfuserver/"; done
for init in "$TOP"/vfuserver/*/__init__.py; do  # subpackages (vfuserver/netdev/)
    [ -e "$init" ] && ln -s "$(dirname "$init")" "$TREE/vfuserver/"
done
ln -s "$TOP/devices" "$TREE/vfuserver/devices"
ln -s "$TOP/protocol" "$TREE/vfuserver/protocol"
