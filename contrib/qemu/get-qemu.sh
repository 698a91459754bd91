#!/usr/bin/env bash
# Find or fetch a QEMU that can attach vfio-user devices, and print its path.
#
# vfuserver needs QEMU >= 10.1.1 with the vfio-user-pci device (10.1.0 lacked the
# x-pci-class-code property). Routes, first match wins:
#   1. QEMU=<executable>: used if it qualifies, an error otherwise.
#   2. The system's qemu-system-x86_64, if it qualifies.
#   3. A private copy in $CACHE/qemu: Debian's qemu-system-x86 from trixie-backports plus
#      its whole dependency closure (trixie's libc and loader included) is downloaded with a
#      private apt configuration, unpacked with dpkg-deb (nothing is installed into the
#      system) and run through its own dynamic loader by the wrapper $CACHE/qemu/qemu.
# CACHE is ${VFU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfuserver}.
#
# The path is the last line on stdout; progress goes to stderr. Idempotent: a verified
# private copy is reused in well under a second. Needs apt-get and dpkg-deb, and network
# access to deb.debian.org the first time.
set -euo pipefail

MIN_VERSION=10.1.1
DEVICE=vfio-user-pci
PKG=${QEMU_PKG:-qemu-system-x86}
REL=${QEMU_REL:-trixie-backports}
CACHE=${VFU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfuserver}
Q=$CACHE/qemu
ROOT=$Q/root
WRAPPER=$Q/qemu
say() { echo "get-qemu: $*" >&2; }
die() { say "error: $*"; exit 1; }

# qualifies EXE: EXE runs, reports a version >= MIN_VERSION and lists the device.
# On failure, sets $why.
why=
qualifies() {
    local exe=$1 out version
    if ! out=$("$exe" --version 2>&1); then
        why="'$exe --version' failed: ${out:0:300}"; return 1
    fi
    version=$(sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' <<<"$out" | head -1)
    if [ -z "$version" ]; then
        why="'$exe --version' printed no version: ${out:0:300}"; return 1
    fi
    if [ "$(printf '%s\n%s\n' "$MIN_VERSION" "$version" | sort -V | head -1)" != "$MIN_VERSION" ]; then
        why="$exe is QEMU $version, older than $MIN_VERSION"; return 1
    fi
    if ! "$exe" -machine none -device help 2>/dev/null | grep -q "name \"$DEVICE\""; then
        why="$exe (QEMU $version) has no $DEVICE device"; return 1
    fi
    say "using $exe (QEMU $version, has $DEVICE)"
}

if [ -n "${QEMU:-}" ]; then
    qualifies "$QEMU" || die "QEMU=$QEMU does not qualify: $why"
    echo "$QEMU"; exit 0
fi
if sys=$(command -v qemu-system-x86_64 2>/dev/null); then
    if qualifies "$sys"; then echo "$sys"; exit 0; fi
    say "not using the system QEMU: $why"
fi
# Fast path: a private copy that was verified when it was built (stamp written last).
if [ -x "$WRAPPER" ] && [ -f "$Q/.stamp" ] && qualifies "$WRAPPER"; then
    echo "$WRAPPER"; exit 0
fi

command -v apt-get >/dev/null || die "apt-get is missing (this route needs Debian's apt)"
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (apt-get install dpkg)"
command -v flock >/dev/null || die "flock is missing (apt-get install util-linux)"
mkdir -p "$Q"
exec 9>"$Q/.lock"
flock 9    # one fetch at a time (parallel test sessions)
if [ -x "$WRAPPER" ] && [ -f "$Q/.stamp" ] && qualifies "$WRAPPER"; then
    echo "$WRAPPER"; exit 0     # another process finished it while we waited
fi

t0=$(date +%s.%N)
say "fetching $PKG from Debian $REL with its dependency closure into $Q"
A=$Q/apt
rm -f "$Q/.stamp"
mkdir -p "$A/etc" "$A/lists/partial" "$A/cache/archives/partial"
cat > "$A/etc/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
EOF
: > "$A/status"    # an empty dpkg status: apt resolves the whole closure
o=(-o Dir::Etc::SourceList="$A/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent
   -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o Dir::State::status="$A/status"
   -o Dir::Etc::Preferences=/nonexistent -o Dir::Etc::PreferencesParts=/nonexistent
   -o APT::Install-Recommends=0 -o APT::Get::AllowUnauthenticated=0 -o Debug::NoLocking=1)

apt-get "${o[@]}" -q update >"$A/update.log" 2>&1 \
    || { cat "$A/update.log" >&2; die "apt-get update of the trixie indexes failed (network?)"; }
apt-get "${o[@]}" -s -t "$REL" install "$PKG" >"$A/simulate.log" 2>&1 \
    || { cat "$A/simulate.log" >&2; die "apt cannot resolve $PKG from $REL"; }
awk '/^Inst /{gsub(/[()]/, "", $3); print $2 "=" $3}' "$A/simulate.log" | sort > "$Q/pkglist.txt"
say "closure: $(wc -l < "$Q/pkglist.txt") packages, $(grep "^$PKG=" "$Q/pkglist.txt" || echo "$PKG=?")"
apt-get "${o[@]}" -q -y -t "$REL" install --download-only "$PKG" >"$A/download.log" 2>&1 \
    || { cat "$A/download.log" >&2; die "downloading the packages failed"; }
grep -E '^(Need to get|Fetched)' "$A/download.log" >&2 || true

rm -rf "$ROOT"
mkdir -p "$ROOT"
# unpack only the packages of the current closure (the archive cache may hold older ones)
while IFS='=' read -r name version; do
    debs=("$A/cache/archives/${name%%:*}_${version//:/%3a}_"*.deb)
    [ -f "${debs[0]}" ] || die "no downloaded .deb for $name $version"
    dpkg-deb -x "${debs[0]}" "$ROOT"
done < "$Q/pkglist.txt"
# re-point absolute symlinks (e.g. /usr/share/qemu/*.rom -> /usr/lib/ipxe/qemu/...) into the root
find "$ROOT" -type l -lname '/*' -printf '%p\t%l\n' | while IFS=$'\t' read -r link target; do
    case $target in "$ROOT"/*) ;; *) ln -sfn "$ROOT$target" "$link" ;; esac
done
du -sb "$ROOT" | awk '{printf "get-qemu: unpacked root: %.1f MiB\n", $1 / 1048576}' >&2

LD=$ROOT/usr/lib64/ld-linux-x86-64.so.2
[ -e "$LD" ] || LD=$ROOT/lib64/ld-linux-x86-64.so.2
[ -e "$LD" ] || die "the unpacked closure has no dynamic loader (ld-linux-x86-64.so.2)"
LIBP=$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/lib/x86_64-linux-gnu
cat > "$WRAPPER" <<EOF
#!/bin/sh
# qemu-system-x86_64 from $ROOT, run through that root's own loader and libraries,
# with firmware and option ROMs from the root. Written by get-qemu.sh.
export QEMU_MODULE_DIR='$ROOT/usr/lib/x86_64-linux-gnu/qemu'
exec '$LD' --library-path '$LIBP' --argv0 qemu-system-x86_64 \\
     '$ROOT/usr/bin/qemu-system-x86_64' -L '$ROOT/usr/share/qemu' -L '$ROOT/usr/share/seabios' "\$@"
EOF
chmod +x "$WRAPPER"
qualifies "$WRAPPER" || die "the unpacked QEMU does not qualify: $why"
echo "$PKG $REL" > "$Q/.stamp"
say "done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}') s"
echo "$WRAPPER"
