#!/usr/bin/env bash
# Build the vfuserver test guest: Debian 12's cloud kernel plus a busybox initramfs whose
# /init (test-guest-init.sh, next to this script) runs a test plan from the kernel command
# line and reports each step on the serial console (see the header of test-guest-init.sh).
#
# Output: $CACHE/guest/vmlinuz and $CACHE/guest/initramfs.cpio.gz, printed as the last two
# lines on stdout (progress goes to stderr), with
# CACHE=${VFU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfuserver}.
#
# Downloads with `apt-get download` from the system's (bookworm) sources: the kernel package
# that linux-image-$KFLAVOUR depends on, and busybox-static; the apt package lists must be
# present (apt-get update). Idempotent: rebuilt only when this script, the init script, KVER or
# KFLAVOUR change (stamp holds their hash), otherwise done in well under a second.
#
# Knobs: KFLAVOUR=cloud-amd64, KVER=<abi, e.g. 6.1.0-56-cloud-amd64> (default: resolved from
# the metapackage).
set -euo pipefail

CACHE=${VFU_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfuserver}
G=$CACHE/guest
HERE=$(cd "$(dirname "$0")" && pwd)
INIT=$HERE/test-guest-init.sh
KFLAVOUR=${KFLAVOUR:-cloud-amd64}
# top-level modules; their dependencies (virtio, virtio_ring, virtio_pci_legacy_dev,
# virtio_pci_modern_dev, failover, net_failover) are added from each .ko's modinfo;
# virtio_blk for the disk tests (Debian's cloud kernel builds it as a module)
MODS="virtio_pci virtio_net virtio_blk"
say() { echo "make-test-guest: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ -f "$INIT" ] || die "$INIT is missing"
stamp=$(cat "$0" "$INIT" - <<<"KFLAVOUR=$KFLAVOUR KVER=${KVER:-auto}" | sha256sum | cut -d' ' -f1)
done_already() {
    [ -f "$G/.stamp" ] && [ "$(cat "$G/.stamp")" = "$stamp" ] \
        && [ -f "$G/vmlinuz" ] && [ -f "$G/initramfs.cpio.gz" ]
}
if done_already; then
    echo "$G/vmlinuz"; echo "$G/initramfs.cpio.gz"; exit 0
fi

for t in apt-get apt-cache dpkg-deb flock gzip; do
    command -v $t >/dev/null || die "'$t' is missing"
done
mkdir -p "$G/dl"
exec 9>"$G/.lock"
flock 9    # one build at a time (parallel test sessions)
if done_already; then
    echo "$G/vmlinuz"; echo "$G/initramfs.cpio.gz"; exit 0
fi
t0=$(date +%s.%N)

if [ -z "${KVER:-}" ]; then
    # the ABI package behind the metapackage, e.g. linux-image-6.1.0-56-cloud-amd64
    KPKG=$(apt-cache depends "linux-image-$KFLAVOUR" 2>/dev/null \
           | awk '/Depends: linux-image-/ { print $2; exit }') || true
    [ -n "$KPKG" ] || die "apt does not know linux-image-$KFLAVOUR (run apt-get update?)"
    KVER=${KPKG#linux-image-}
else
    KPKG=linux-image-$KVER
fi
say "building the test guest with $KPKG and busybox-static into $G"
fetch() {   # fetch PACKAGE: apt-get download it into dl/ unless a .deb of it is there
    local deb
    deb=$(ls "$G"/dl/"$1"_*.deb 2>/dev/null | sort -V | tail -1) || true
    if [ -z "$deb" ]; then
        (cd "$G/dl" && apt-get -q -o APT::Sandbox::User=root download "$1" >&2) || die "apt-get download $1 failed"
        deb=$(ls "$G"/dl/"$1"_*.deb | sort -V | tail -1)
    fi
    echo "$deb"
}
kdeb=$(fetch "$KPKG")
bdeb=$(fetch busybox-static)

W=$G/work
rm -rf "$W"
mkdir -p "$W/kroot" "$W/bbroot"
dpkg-deb -x "$kdeb" "$W/kroot"
dpkg-deb -x "$bdeb" "$W/bbroot"
[ -f "$W/kroot/boot/vmlinuz-$KVER" ] || die "$kdeb has no boot/vmlinuz-$KVER"
MD=$W/kroot/lib/modules/$KVER

I=$W/initrd
mkdir -p "$I"/{bin,sbin,proc,sys,dev,tmp,etc,lib/modules}
cp "$W/bbroot/bin/busybox" "$I/bin/busybox"
for a in $("$I/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$I/bin/$a"
done

# modules and their dependencies, in load order (the .deb has no modules.dep)
declare -A seen=()
order=()
modfile() { find "$MD" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" \) | head -1; }
add() {
    local m=${1//-/_} f deps d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    f=$(modfile "$m"); [ -n "$f" ] || f=$(modfile "${1//_/-}")
    if [ -z "$f" ]; then
        grep -q "/$m.ko" "$MD/modules.builtin" && return 0
        die "module $m is neither in $KPKG nor built in"
    fi
    case $f in
        *.xz) xz -dc "$f" > "$I/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" > "$I/lib/modules/$m.ko" ;;
        *) cp "$f" "$I/lib/modules/$m.ko" ;;
    esac
    # .modinfo holds NUL-separated key=value strings, among them depends=a,b
    deps=$(tr '\0' '\n' < "$I/lib/modules/$m.ko" | sed -n 's/^depends=//p' | head -1 | tr , ' ')
    for d in $deps; do add "$d"; done
    order+=("$m")
}
for m in $MODS; do add "$m"; done
printf '%s\n' "${order[@]}" > "$I/lib/modules/load-order"
say "modules: ${order[*]}"

cp "$INIT" "$I/init"
chmod 755 "$I/init"
(cd "$I" && find . | LC_ALL=C sort | "$W/bbroot/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -9n) \
    > "$G/initramfs.cpio.gz.new"
cp "$W/kroot/boot/vmlinuz-$KVER" "$G/vmlinuz.new"
mv "$G/vmlinuz.new" "$G/vmlinuz"
mv "$G/initramfs.cpio.gz.new" "$G/initramfs.cpio.gz"
echo "$KVER" > "$G/kernel-release"
rm -rf "$W"
echo "$stamp" > "$G/.stamp"
say "done in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}') s" \
    "(initramfs $(stat -c %s "$G/initramfs.cpio.gz") bytes)"
echo "$G/vmlinuz"
echo "$G/initramfs.cpio.gz"
