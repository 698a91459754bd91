#!/usr/bin/env bash
# Debian packages vfuserver needs to build libvfio-user, fetch QEMU and the test guest,
# and run the end-to-end tests (fuse3, libfuse3-dev: pyfuse3, a test file system).
# Installs only what is missing; needs root for that.
set -euo pipefail
PKGS=(meson ninja-build pkg-config gcc libc6-dev linux-libc-dev libjson-c-dev libcmocka-dev
      xz-utils dpkg-dev iproute2 busybox-static python3-venv cpio pciutils ethtool
      fuse3 libfuse3-dev)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# the test guest is assembled from packages fetched with apt-get download: needs lists
lists_ok=1
ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || lists_ok=0
if [ ${#missing[@]} -eq 0 ] && [ $lists_ok = 1 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "system-packages: missing Debian packages: ${missing[*]}" >&2
    echo "system-packages: run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
if [ ${#missing[@]} -gt 0 ]; then
    echo "system-packages: installing ${missing[*]}" >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
