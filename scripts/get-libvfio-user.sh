#!/usr/bin/env bash
# Obtain libvfio-user for vfuserver and print the prefix to build against.
#
# Routes, first match wins:
#   1. VFU_PREFIX=<prefix> already holding include/vfio-user/libvfio-user.h: used as is.
#   2. A system libvfio-user that pkg-config finds: used as is.
#   3. LIBVFIO_USER_SRC=<checkout>: that tree is built into the project prefix.
#   4. Debian's qemu source package (trixie) ships libvfio-user in subprojects/;
#      it is downloaded (cached in $VFU_CACHE), its wrap file is checked to pin the
#      expected upstream commit, and the tree is built into the project prefix.
# The project prefix is .deps/prefix in the repository (git-ignored).
# Idempotent: a prefix built from the same source is reused.
set -euo pipefail

PIN=0b28d205572c80b568a1003db2c8f37ca333e4d7
TOP=$(cd "$(dirname "$0")/.." && pwd)
DEPS=$TOP/.deps
PREFIX=$DEPS/prefix
CACHE=${VFU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfuserver}
say() { echo "get-libvfio-user: $*" >&2; }
die() { say "error: $*"; exit 1; }

if [ -n "${VFU_PREFIX:-}" ]; then
    [ -f "$VFU_PREFIX/include/vfio-user/libvfio-user.h" ] \
        || die "VFU_PREFIX=$VFU_PREFIX has no include/vfio-user/libvfio-user.h"
    echo "$VFU_PREFIX"; exit 0
fi
if command -v pkg-config >/dev/null && pkg-config --exists libvfio-user 2>/dev/null; then
    say "using the system libvfio-user $(pkg-config --modversion libvfio-user)"
    echo "system"; exit 0
fi

need() {  # tool, Debian package
    command -v "$1" >/dev/null || die "'$1' is missing: apt-get install $2 (or run 'make setup' as root)"
}
need meson meson; need ninja ninja-build; need cc gcc
for h in json-c/json.h cmocka.h; do
    printf '#include <stdarg.h>\n#include <stddef.h>\n#include <setjmp.h>\n#include <stdint.h>\n#include <%s>\n' "$h" \
        | cc -E -x c - >/dev/null 2>&1 \
        || die "header <$h> is missing: apt-get install libjson-c-dev libcmocka-dev"
done

if [ -n "${LIBVFIO_USER_SRC:-}" ]; then
    SRC=$(cd "$LIBVFIO_USER_SRC" && pwd)
    [ -f "$SRC/meson.build" ] || die "LIBVFIO_USER_SRC=$SRC is not a libvfio-user tree (no meson.build)"
    STAMP="src:$SRC"
else
    SRC=$CACHE/libvfio-user-$PIN
    STAMP="debian-qemu:$PIN"
    if [ ! -f "$SRC/meson.build" ]; then
        need apt-get apt; need dpkg-source dpkg-dev
        A=$CACHE/apt
        mkdir -p "$A/etc" "$A/lists/partial" "$A/cache/archives/partial" "$A/src"
        echo 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main' \
            > "$A/etc/sources.list"
        o=(-o Dir::Etc::SourceList="$A/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent
           -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o Debug::NoLocking=1)
        say "downloading Debian's qemu source package (trixie) for its bundled libvfio-user"
        apt-get "${o[@]}" -q update >"$A/update.log" 2>&1 \
            || { cat "$A/update.log" >&2; die "apt-get update of the trixie source index failed (network?)"; }
        (cd "$A/src" && apt-get "${o[@]}" -q source --download-only qemu >"$A/source.log" 2>&1) \
            || die "could not download the qemu source package; set LIBVFIO_USER_SRC=<libvfio-user checkout> instead"
        ORIG=$(ls -t "$A"/src/qemu_*.orig.tar.xz | head -1)
        X=$(mktemp -d "$CACHE/extract.XXXXXX")
        trap 'rm -rf "$X"' EXIT
        tar --wildcards -xJf "$ORIG" -C "$X" '*/subprojects/libvfio-user.wrap' '*/subprojects/libvfio-user/*'
        top=$(ls "$X")
        rev=$(sed -n 's/^revision *= *//p' "$X/$top/subprojects/libvfio-user.wrap")
        [ "$rev" = "$PIN" ] || die "$(basename "$ORIG") pins libvfio-user $rev, expected $PIN; set LIBVFIO_USER_SRC"
        rm -rf "$SRC"; mv "$X/$top/subprojects/libvfio-user" "$SRC"; rm -rf "$X"
        say "libvfio-user $PIN from $(basename "$ORIG") unpacked into $SRC"
    fi
fi

if [ -f "$PREFIX/.stamp" ] && [ "$(cat "$PREFIX/.stamp")" = "$STAMP" ] \
   && [ -f "$PREFIX/include/vfio-user/libvfio-user.h" ]; then
    echo "$PREFIX"; exit 0
fi
say "building libvfio-user ($STAMP) into $PREFIX"
rm -rf "$DEPS/build-libvfio-user" "$PREFIX"
mkdir -p "$DEPS"
meson setup "$DEPS/build-libvfio-user" "$SRC" --prefix="$PREFIX" --libdir=lib \
    -Dbuildtype=release >&2
ninja -C "$DEPS/build-libvfio-user" >&2
ninja -C "$DEPS/build-libvfio-user" install >&2
echo "$STAMP" > "$PREFIX/.stamp"
echo "$PREFIX"
