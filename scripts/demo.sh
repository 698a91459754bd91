#!/usr/bin/env bash
# The README's demo: start vfuserver, boot a small Linux guest under QEMU 11 with the device
# attached, and show what the guest sees and that it pings the host through our device.
# Everything lives in a private network namespace that is deleted at the end.
#   PROFILE=modern|transitional   how the device presents itself (default: modern)
#   APPEND="virtio_pci.force_legacy=1"   extra guest kernel arguments
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${PROFILE:-modern}
APPEND=${APPEND:-}
NS=vfu-demo-$$
TAP=vfudemo0
WORK=$(mktemp -d /tmp/vfu-demo.XXXXXX)
SOCK=$WORK/net0.sock
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

echo "== vfuserver run --socket $SOCK --profile $PROFILE --netdev tap,ifname=$TAP"
ip netns exec "$NS" "$TOP/.venv/bin/vfuserver" run --socket "$SOCK" --profile "$PROFILE" \
    --netdev "tap,ifname=$TAP" 2> "$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { cat "$WORK/server.log"; echo "demo: the server did not start" >&2; exit 1; }
sed 's/^/  server: /' "$WORK/server.log"

PLAN=lspci,virtio,wait-if:eth0,ip:10.0.2.15/24,ping:10.0.2.1:count=5:interval=0.2,ping:10.0.2.1:count=1000:flood,stats:eth0
echo "== booting the guest (QEMU $("$QEMU" --version | head -1 | awk '{print $4}'), TCG) with plan: $PLAN"
ip netns exec "$NS" "$TOP/.venv/bin/python" "$TOP/contrib/qemu/vfuserver-qemu" --qemu "$QEMU" \
    --socket "$SOCK" --plan "$PLAN" --append "vfu.timeout=90 $APPEND" </dev/null \
    | tee "$WORK/console.log" | grep --line-buffered -E '^@@VFU (step|done)|packets transmitted|round-trip' \
    | sed -u -e 's/^@@VFU /  guest: /'

echo "== server log"
sed 's/^/  server: /' "$WORK/server.log" | grep -v "DEBUG" | tail -n 8
if grep -q '^@@VFU done .*failed=0' "$WORK/console.log"; then
    echo "== demo passed: the guest pinged 10.0.2.1 through vfuserver's virtio-net"
else
    echo "== demo FAILED (console: see above)"; exit 1
fi
