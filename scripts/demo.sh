#!/usr/bin/env bash
# The README's demo: start vfuserver, boot a small Linux guest under QEMU 11 with the device
# attached, and show what the guest sees and that it pings the host through our device.
# Everything lives in a private network namespace that is deleted at the end.
#   PROFILE=modern|transitional   one round with this profile (default: both, the
#                                 transitional one driven by Linux's legacy driver)
#   APPEND="virtio_pci.force_legacy=1"   extra guest kernel arguments
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
APPEND=${APPEND:-}
NS=vfu-demo-$$
TAP=vfudemo0
WORK=$(mktemp -d /tmp/vfu-demo.XXXXXX)
SERVER_PID=

cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "demo: needs root (network namespace and tap)" >&2; exit 1; }
QEMU=$("$TOP/contrib/qemu/get-qemu.sh" | tail -1)
"$TOP/contrib/qemu/make-test-guest.sh" >/dev/null

echo "== network namespace $NS with tap $TAP at 10.0.2.1/24"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" tuntap add dev "$TAP" mode tap
ip -n "$NS" addr add 10.0.2.1/24 dev "$TAP"
ip -n "$NS" link set "$TAP" up

run_round() {  # PROFILE APPEND: one server, one guest boot
    local profile=$1 append=$2
    SOCK=$WORK/$profile.sock
    echo
    echo "== vfuserver run --socket $SOCK --profile $profile --netdev tap,ifname=$TAP"
    ip netns exec "$NS" "$TOP/.venv/bin/vfuserver" run --socket "$SOCK" --profile "$profile" \
        --netdev "tap,ifname=$TAP" 2> "$WORK/server.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
    [ -S "$SOCK" ] || { cat "$WORK/server.log"; echo "demo: the server did not start" >&2; exit 1; }

    local plan=lspci,virtio,wait-if:eth0,ip:10.0.2.15/24,ping:10.0.2.1:count=5:interval=0.2,ping:10.0.2.1:count=1000:flood
    echo "== guest (QEMU $QEMU_VERSION, TCG), kernel args '${append:-none}', plan: $plan"
    ip netns exec "$NS" "$TOP/.venv/bin/python" "$TOP/contrib/qemu/vfuserver-qemu" --qemu "$QEMU" \
        --socket "$SOCK" --plan "$plan" --append "vfu.timeout=90 $append" </dev/null \
        > "$WORK/console.log" 2>&1 || true
    grep -E '^@@VFU step=.*(vendor=1af4|name=virtio record|status=fail|name=ping status)' \
        "$WORK/console.log" | sed -e 's/^@@VFU /  guest: /' -e 's/ features=[01]*//'
    kill "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=
    grep -E "listening|stats of" "$WORK/server.log" | sed -e 's/^[0-9-]* [0-9:,]* //' \
        -e 's/^/  server: /' | cut -c1-400
    if grep -q '^@@VFU done .*failed=0' "$WORK/console.log"; then
        echo "== $profile: the guest pinged 10.0.2.1 through vfuserver's virtio-net"
    else
        echo "== $profile: FAILED"; tail -n 30 "$WORK/console.log"; exit 1
    fi
}

QEMU_VERSION=$("$QEMU" --version | head -1 | awk '{print $4}')
if [ -n "${PROFILE:-}" ]; then
    run_round "$PROFILE" "$APPEND"
else
    # the device as it is, then the transitional presentation driven by Linux's legacy driver
    run_round modern ""
    run_round transitional "virtio_pci.force_legacy=1"
fi
echo
echo "== demo passed"
