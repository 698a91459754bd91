#!/bin/sh
# /init of the vfuserver test guest (busybox ash; built into the initramfs by
# make-test-guest.sh). It loads the virtio modules, runs the TEST PLAN given on the kernel
# command line, reports every step on the console in a machine-readable form, and powers off,
# whatever happens.
#
# Kernel command line:
#   vfu.plan=STEP[,STEP...]    steps, run in order (default: lspci,virtio)
#       STEP = NAME[:ARG...]   ARG = KEY=VALUE (an option) or WORD (positional, also a flag)
#   vfu.timeout=SECONDS        watchdog: report "@@VFU timeout" and power off after SECONDS
#   MODULE.PARAM=VALUE         passed to insmod of MODULE (e.g. virtio_pci.force_legacy=1)
#
# Report lines (one line each, space-separated KEY=VALUE fields, no spaces inside values):
#   @@VFU boot uptime=S kernel=RELEASE plan=PLAN
#   @@VFU module name=MOD status=pass|fail [params=P,..]
#   @@VFU step=N name=NAME record=KIND KEY=VALUE...   data records of step N (before its status)
#   @@VFU step=N name=NAME status=pass|fail KEY=VALUE...   exactly one per step
#   @@VFU timeout seconds=S                            the watchdog fired
#   @@VFU done steps=N passed=P failed=F uptime=S
# Anything else on the console (kernel messages, command output) is for humans.
#
# Steps (IF defaults to eth0; DEV selects a PCI function as VENDOR:DEVICE[:INDEX], default
# 1af4:1041:0, the first modern virtio-net function, which is vfuserver's device in our setups:
# QEMU's own virtio-net-pci on the q35 root bus is transitional 1af4:1000):
#   lspci                        record=pci per PCI function: bdf class vendor device subvendor
#                                subdevice revision driver irq msi barN=KIND:START:SIZE:FLAGS
#                                rom=...  (KIND: io, mem32, mem64, with -pref if prefetchable)
#   virtio                       record=virtio per virtio device: dev pci device vendor driver
#                                status features (bit 0 first) ifname
#   config[:DEV][:bytes=N]       record=config bdf bytes hex, config space of DEV (default: all
#                                functions), first N bytes (default 256)
#   irq                          record=irq per virtio interrupt: irq count chip handler
#   ip:ADDR/LEN[:IF]             bring lo and IF up, add ADDR
#   ping:HOST[:count=N][:size=N][:deadline=S][:wait=S][:interval=S][:flood|adaptive]
#                                busybox ping -q; flood/adaptive = -A; pass iff every echo
#                                request got its reply; transmitted received loss seconds rtt_*
#   nc-send:HOST:PORT[:mib=N|kib=N|bytes=N][:timeout=S]
#                                random data (from /dev/urandom, saved first) sent with nc;
#                                bytes sha256 seconds (of the transfer) prepare_seconds
#   nc-recv:HOST:PORT[:timeout=S]  connect, read until EOF; bytes sha256 seconds
#   mtu:IF:N                     set the MTU; pass iff IF reports N afterwards
#   link:IF:up|down              ip link set; operstate carrier
#   wait-if:IF[:timeout=S]       wait until IF exists (default 10 s)
#   wait-link:IF[:timeout=S]     wait until IF has carrier (default 10 s)
#   wait-ping:HOST[:timeout=S]   ping once a second until HOST answers (default 30 s)
#   stats:IF                     rx/tx packets bytes errors dropped of IF
#   unbind[:DEV]                 unbind DEV from virtio-pci (sysfs drivers/virtio-pci/unbind)
#   bind[:DEV][:timeout=S]       bind DEV to virtio-pci, wait for its virtio device and netdev
#   sleep:S
#   disk-write[:DEV][:mib=N][:seek=M][:buffered][:timeout=S]
#                                N MiB (default 1) of random data (made in /tmp first) onto
#                                /dev/DEV (default vda) at MiB M with dd bs=1M oflag=direct, or
#                                through the page cache and then `sync` (buffered); waits up to
#                                S s (default 10) for DEV; bytes sha256 seconds
#   disk-read[:DEV][:mib=N][:skip=M][:timeout=S]
#                                N MiB from MiB M with dd bs=1M iflag=direct; bytes sha256 seconds
#   disk-bench[:DEV][:mib=N][:count=N]
#                                dd oflag=direct / iflag=direct: seq_write_mibps and
#                                seq_read_mibps (bs=1M, N MiB, default 64), then 4 KiB reads of
#                                random blocks (one dd each, N of them, default 200): read4k_iops

export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp
set -f    # words of the command line and the plan are never globbed (steps turn it back on)

emit() { echo "@@VFU $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
clean() { printf '%s' "$*" | tr -s ' \t\r\n' '____'; }    # a value without spaces
arg() { for w in $CMDLINE; do case $w in "$1"=*) echo "${w#*=}"; return;; esac; done; }

CMDLINE=$(cat /proc/cmdline)
PLAN=$(arg vfu.plan)
PLAN=${PLAN:-lspci,virtio}
emit "boot uptime=$(now) kernel=$(uname -r) plan=$PLAN"

TIMEOUT=$(arg vfu.timeout)
if [ -n "$TIMEOUT" ]; then
    ( sleep "$TIMEOUT"; emit "timeout seconds=$TIMEOUT"; poweroff -f ) &
fi

for m in $(cat /lib/modules/load-order); do
    params=""
    for w in $CMDLINE; do case $w in "$m".*) params="$params ${w#"$m".}";; esac; done
    # shellcheck disable=SC2086  # params are separate words
    if out=$(insmod "/lib/modules/$m.ko" $params 2>&1); then
        emit "module name=$m status=pass params=$(echo $params | tr ' ' ,)"
    else
        echo "$out"
        emit "module name=$m status=fail params=$(echo $params | tr ' ' ,) error=$(clean "$out")"
    fi
done

# --- helpers used by steps (each step runs in a subshell: variables never leak) ---

# result STATUS [KEY=VALUE...]: the step's one status line; ends the step's subshell
result() {
    st=$1; shift
    emit "step=$STEP name=$NAME status=$st $*"
    [ "$st" = pass ] && exit 0
    exit 1
}
record() { emit "step=$STEP name=$NAME record=$*"; }
fail() { result fail "error=$(clean "$*")"; }
need() { [ -n "$2" ] || fail "$NAME needs $1"; }    # need WHAT VALUE

# parse_args ARG...: P1..Pn positionals (NPOS), O_key options, F_word flags
parse_args() {
    NPOS=0
    for a; do
        case $a in
            *=*)
                k=${a%%=*}
                case $k in ''|*[!a-z0-9_]*) fail "bad option name '$k'";; esac
                eval "O_$k=\${a#*=}";;
            *)
                NPOS=$((NPOS + 1)); eval "P$NPOS=\$a"
                case $a in ''|*[!a-zA-Z0-9_]*) ;; *) eval "F_$a=1";; esac;;
        esac
    done
}

sysfs_write() { echo "$2" > "$1"; }    # sysfs_write FILE VALUE: the write's status
drv_of() { [ -e "$1/driver" ] && basename "$(readlink "$1/driver")" || echo none; }
hex() { v=$(cat "$1"); echo "${v#0x}"; }

# pci_select [VENDOR [DEVICE [INDEX]]] -> sysfs dir of that function
pci_select() {
    sel_v=${1:-1af4}; sel_d=${2:-1041}; sel_i=${3:-0}; n=0
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor")" = "0x$sel_v" ] && [ "$(cat "$d/device")" = "0x$sel_d" ] || continue
        [ "$n" -eq "$sel_i" ] && { echo "$d"; return 0; }
        n=$((n + 1))
    done
    return 1
}

pci_fields() {
    d=$1
    c=$(hex "$d/class")
    msi=0; [ -d "$d/msi_irqs" ] && msi=$(ls "$d/msi_irqs" | wc -l)
    printf 'bdf=%s class=%s vendor=%s device=%s subvendor=%s subdevice=%s revision=%s driver=%s irq=%s msi=%s' \
        "${d##*/}" "$c" "$(hex "$d/vendor")" "$(hex "$d/device")" "$(hex "$d/subsystem_vendor")" \
        "$(hex "$d/subsystem_device")" "$(hex "$d/revision")" "$(drv_of "$d")" "$(cat "$d/irq")" "$msi"
    i=0
    while read -r start end flags; do
        if [ $((flags)) -ne 0 ] && [ $((end)) -ne 0 ]; then
            if [ $((flags & 0x100)) -ne 0 ]; then kind=io
            elif [ $((flags & 0x100000)) -ne 0 ]; then kind=mem64
            else kind=mem32; fi
            [ $((flags & 0x2000)) -ne 0 ] && kind=$kind-pref
            case $i in [0-5]) key=bar$i;; 6) key=rom;; *) key=res$i;; esac
            printf ' %s=%s:0x%x:0x%x:0x%x' "$key" "$kind" $((start)) $((end - start + 1)) $((flags))
        fi
        i=$((i + 1))
    done < "$d/resource"
    echo
}

netdev_of() { # PCI dir -> "virtioN IFNAME" (or "none none")
    for v in "$1"/virtio*; do
        [ -d "$v" ] || continue
        ifn=$(ls "$v/net" 2>/dev/null | head -1)
        echo "${v##*/} ${ifn:-none}"; return
    done
    echo "none none"
}

# --- steps ---

step_lspci() {
    n=0
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/class" ] || continue
        record "pci $(pci_fields "$d")"
        n=$((n + 1))
    done
    result pass count=$n
}

step_virtio() {
    n=0
    for v in /sys/bus/virtio/devices/*; do
        [ -e "$v" ] || continue
        p=$(readlink -f "$v"); p=${p%/*}
        ifn=$(ls "$v/net" 2>/dev/null | head -1)
        record "virtio dev=${v##*/} pci=${p##*/} device=$(hex "$v/device") vendor=$(hex "$v/vendor") driver=$(drv_of "$v") status=$(cat "$v/status") features=$(cat "$v/features") ifname=${ifn:-none}"
        n=$((n + 1))
    done
    result pass count=$n
}

step_config() {
    parse_args "$@"
    bytes=${O_bytes:-256}; n=0
    if [ -n "${P1:-}" ]; then
        d=$(pci_select "$P1" "${P2:-}" "${P3:-}") || fail "no PCI function $P1:${P2:-}"
        set -- "$d"
    else
        set -- /sys/bus/pci/devices/*
    fi
    for d; do
        record "config bdf=${d##*/} bytes=$bytes hex=$(od -An -v -tx1 -N "$bytes" "$d/config" | tr -d ' \n')"
        n=$((n + 1))
    done
    result pass count=$n
}

step_irq() {
    n=0
    for r in $(awk '/virtio/ { irq = $1; sub(":", "", irq); n = 0; i = 2;
                               while ($i ~ /^[0-9]+$/) { n += $i; i++ }
                               printf "irq=%s,count=%d,chip=%s,handler=%s\n", irq, n, $i, $NF }' /proc/interrupts); do
        record "irq $(echo "$r" | tr , ' ')"
        n=$((n + 1))
    done
    result pass count=$n
}

step_ip() {
    parse_args "$@"
    addr=${P1:-}; ifn=${P2:-eth0}; need ADDR/LEN "$addr"
    [ -d "/sys/class/net/$ifn" ] || fail "no interface $ifn"
    ip link set lo up || fail "ip link set lo up failed"
    ip link set "$ifn" up || fail "ip link set $ifn up failed"
    ip addr add "$addr" dev "$ifn" || fail "ip addr add $addr dev $ifn failed"
    result pass "dev=$ifn" "addr=$addr" "mac=$(cat "/sys/class/net/$ifn/address")" \
        "mtu=$(cat "/sys/class/net/$ifn/mtu")" "operstate=$(cat "/sys/class/net/$ifn/operstate")"
}

step_ping() {
    parse_args "$@"
    host=${P1:-}; need HOST "$host"; count=${O_count:-3}; size=${O_size:-56}
    deadline=${O_deadline:-30}; wait=${O_wait:-5}
    set -- -q -c "$count" -s "$size" -w "$deadline" -W "$wait"
    mode=normal
    if [ -n "${F_flood:-}${F_adaptive:-}" ]; then set -- "$@" -A; mode=adaptive; fi
    [ -n "${O_interval:-}" ] && set -- "$@" -i "$O_interval"
    t0=$(now)
    out=$(ping "$@" "$host" 2>&1); rc=$?
    secs=$(since "$t0")
    echo "$out"
    tx=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    rx=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    loss=$(echo "$out" | sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p')
    rtt=$(echo "$out" | sed -n 's/^round-trip min\/avg\/max = \([0-9.\/]*\) ms.*/\1/p')
    rtt_fields=""
    [ -n "$rtt" ] && rtt_fields=$(echo "$rtt" | awk -F/ '{ printf "rtt_min=%s rtt_avg=%s rtt_max=%s", $1, $2, $3 }')
    st=fail; [ "${rx:-0}" = "$count" ] && [ "${tx:-0}" = "$count" ] && st=pass
    # shellcheck disable=SC2086  # rtt_fields are separate words
    result $st "host=$host" "count=$count" "size=$size" "mode=$mode" "transmitted=${tx:-0}" \
        "received=${rx:-0}" "loss=${loss:-100}" "seconds=$secs" "rc=$rc" $rtt_fields
}

step_nc_send() {
    parse_args "$@"
    host=${P1:-}; port=${P2:-}; need HOST "$host"; need PORT "$port"
    if [ -n "${O_bytes:-}" ]; then bytes=$O_bytes
    elif [ -n "${O_kib:-}" ]; then bytes=$((O_kib * 1024))
    else bytes=$((${O_mib:-1} * 1048576)); fi
    f=/tmp/nc-send.bin
    t0=$(now)
    head -c "$bytes" /dev/urandom > "$f" || fail "cannot make $bytes random bytes in /tmp"
    sum=$(sha256sum "$f" | cut -d' ' -f1)
    prepared=$(since "$t0")
    t0=$(now)
    timeout "${O_timeout:-120}" nc "$host" "$port" < "$f"; rc=$?
    secs=$(since "$t0")
    rm -f "$f"
    st=fail; [ "$rc" -eq 0 ] && st=pass
    result $st "host=$host" "port=$port" "bytes=$bytes" "sha256=$sum" "seconds=$secs" \
        "prepare_seconds=$prepared" "rc=$rc"
}

step_nc_recv() {
    parse_args "$@"
    host=${P1:-}; port=${P2:-}; need HOST "$host"; need PORT "$port"
    f=/tmp/nc-recv.bin
    t0=$(now)
    timeout "${O_timeout:-120}" nc "$host" "$port" < /dev/null > "$f"; rc=$?
    secs=$(since "$t0")
    bytes=$(wc -c < "$f"); sum=$(sha256sum "$f" | cut -d' ' -f1)
    rm -f "$f"
    st=fail; [ "$rc" -eq 0 ] && st=pass
    result $st "host=$host" "port=$port" "bytes=$bytes" "sha256=$sum" "seconds=$secs" "rc=$rc"
}

step_mtu() {
    parse_args "$@"
    ifn=${P1:-}; mtu=${P2:-}; need IF "$ifn"; need MTU "$mtu"
    ip link set "$ifn" mtu "$mtu"; rc=$?
    got=$(cat "/sys/class/net/$ifn/mtu" 2>/dev/null || echo none)
    st=fail; [ "$got" = "$mtu" ] && st=pass
    result $st "dev=$ifn" "mtu=$got" "rc=$rc"
}

step_link() {
    parse_args "$@"
    ifn=${P1:-}; state=${P2:-}; need IF "$ifn"
    case $state in up|down) ;; *) fail "link state must be up or down, not '$state'";; esac
    ip link set "$ifn" "$state"; rc=$?
    carrier=$(cat "/sys/class/net/$ifn/carrier" 2>/dev/null || echo none)
    st=fail; [ "$rc" -eq 0 ] && st=pass
    result $st "dev=$ifn" "state=$state" "operstate=$(cat "/sys/class/net/$ifn/operstate" 2>/dev/null)" \
        "carrier=$carrier" "rc=$rc"
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.1 s; prints the seconds waited
wait_for() {
    limit=$1; shift; t0=$(now)
    until "$@"; do
        [ "$(awk -v a="$t0" -v b="$(now)" -v l="$limit" 'BEGIN { print (b - a >= l) }')" = 1 ] && {
            since "$t0"; return 1; }
        sleep 0.1
    done
    since "$t0"
}
has_if() { [ -d "/sys/class/net/$1" ]; }
has_carrier() { [ "$(cat "/sys/class/net/$1/carrier" 2>/dev/null)" = 1 ]; }

step_wait_if() {
    parse_args "$@"
    ifn=${P1:-eth0}
    if secs=$(wait_for "${O_timeout:-10}" has_if "$ifn"); then
        result pass "dev=$ifn" "seconds=$secs"
    fi
    result fail "dev=$ifn" "seconds=$secs" "error=no_interface"
}

step_wait_link() {
    parse_args "$@"
    ifn=${P1:-eth0}
    if secs=$(wait_for "${O_timeout:-10}" has_carrier "$ifn"); then
        result pass "dev=$ifn" "seconds=$secs"
    fi
    result fail "dev=$ifn" "seconds=$secs" "error=no_carrier"
}

answers_ping() { ping -q -c 1 -W 1 "$1" >/dev/null 2>&1; }

step_wait_ping() {
    parse_args "$@"
    host=${P1:-}; need HOST "$host"
    if secs=$(wait_for "${O_timeout:-30}" answers_ping "$host"); then
        result pass "host=$host" "seconds=$secs"
    fi
    result fail "host=$host" "seconds=$secs" "error=no_answer"
}

step_stats() {
    parse_args "$@"
    ifn=${P1:-eth0}; s=/sys/class/net/$ifn/statistics
    [ -d "$s" ] || fail "no interface $ifn"
    fields=""
    for k in rx_packets tx_packets rx_bytes tx_bytes rx_errors tx_errors rx_dropped tx_dropped; do
        fields="$fields $k=$(cat "$s/$k")"
    done
    # shellcheck disable=SC2086  # fields are separate words
    result pass "dev=$ifn" $fields
}

step_unbind() {
    parse_args "$@"
    d=$(pci_select "${P1:-}" "${P2:-}" "${P3:-}") || fail "no PCI function ${P1:-1af4}:${P2:-1041}"
    before=$(drv_of "$d")
    [ "$before" = virtio-pci ] || fail "${d##*/} is bound to $before, not virtio-pci"
    sysfs_write /sys/bus/pci/drivers/virtio-pci/unbind "${d##*/}"; rc=$?
    after=$(drv_of "$d")
    st=fail; [ "$after" = none ] && st=pass
    result $st "bdf=${d##*/}" "driver=$after" "rc=$rc"
}

step_bind() {
    parse_args "$@"
    d=$(pci_select "${P1:-}" "${P2:-}" "${P3:-}") || fail "no PCI function ${P1:-1af4}:${P2:-1041}"
    sysfs_write /sys/bus/pci/drivers/virtio-pci/bind "${d##*/}"; rc=$?
    after=$(drv_of "$d")
    [ "$after" = virtio-pci ] || result fail "bdf=${d##*/}" "driver=$after" "rc=$rc"
    has_netdev() { [ "$(netdev_of "$1" | cut -d' ' -f2)" != none ]; }
    secs=$(wait_for "${O_timeout:-10}" has_netdev "$d"); st=$?
    # shellcheck disable=SC2046  # two words: virtio device, interface
    set -- $(netdev_of "$d")
    [ "$st" -eq 0 ] && st=pass || st=fail
    result $st "bdf=${d##*/}" "driver=$after" "virtio=$1" "ifname=$2" "seconds=$secs" "rc=$rc"
}

wait_block() { # wait_block DEV TIMEOUT: until /dev/DEV is a block device
    is_block() { [ -b "/dev/$1" ]; }
    wait_for "$2" is_block "$1" >/dev/null || fail "no block device /dev/$1 after $2 s"
}

step_disk_write() {
    parse_args "$@"
    dev=${P1:-vda}; [ "$dev" = buffered ] && dev=vda
    mib=${O_mib:-1}; wait_block "$dev" "${O_timeout:-10}"
    f=/tmp/disk-write.bin
    head -c $((mib * 1048576)) /dev/urandom > "$f" || fail "cannot make $mib MiB in /tmp"
    sum=$(sha256sum "$f" | cut -d' ' -f1)
    t0=$(now)
    if [ -n "${F_buffered:-}" ]; then
        dd if="$f" of="/dev/$dev" bs=1M seek="${O_seek:-0}" conv=notrunc 2>/dev/null \
            && sync; rc=$?
    else
        dd if="$f" of="/dev/$dev" bs=1M seek="${O_seek:-0}" oflag=direct 2>/dev/null; rc=$?
    fi
    secs=$(since "$t0")
    rm -f "$f"
    st=fail; [ "$rc" -eq 0 ] && st=pass
    result $st "dev=$dev" "bytes=$((mib * 1048576))" "sha256=$sum" "seconds=$secs" "rc=$rc"
}

step_disk_read() {
    parse_args "$@"
    dev=${P1:-vda}; mib=${O_mib:-1}; wait_block "$dev" "${O_timeout:-10}"
    t0=$(now)
    sum=$(dd if="/dev/$dev" bs=1M skip="${O_skip:-0}" count="$mib" iflag=direct 2>/dev/null \
          | sha256sum | cut -d' ' -f1)
    secs=$(since "$t0")
    result pass "dev=$dev" "bytes=$((mib * 1048576))" "sha256=$sum" "seconds=$secs"
}

rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", (s > 0 ? n / s : 0) }'; }

step_disk_bench() {
    parse_args "$@"
    dev=${P1:-vda}; mib=${O_mib:-64}; count=${O_count:-200}; wait_block "$dev" 10
    t0=$(now)
    dd if=/dev/zero of="/dev/$dev" bs=1M count="$mib" oflag=direct 2>/dev/null \
        || fail "sequential write failed"
    write_secs=$(since "$t0")
    t0=$(now)
    dd if="/dev/$dev" of=/dev/null bs=1M count="$mib" iflag=direct 2>/dev/null \
        || fail "sequential read failed"
    read_secs=$(since "$t0")
    blocks=$((mib * 256))
    i=0; t0=$(now)
    while [ "$i" -lt "$count" ]; do
        dd if="/dev/$dev" of=/dev/null bs=4k count=1 skip=$(( (RANDOM * 32768 + RANDOM) % blocks )) \
            iflag=direct 2>/dev/null || fail "4 KiB read $i failed"
        i=$((i + 1))
    done
    rand_secs=$(since "$t0")
    result pass "dev=$dev" "mib=$mib" "seq_write_mibps=$(rate "$mib" "$write_secs")" \
        "seq_read_mibps=$(rate "$mib" "$read_secs")" "reads=$count" \
        "read4k_iops=$(rate "$count" "$rand_secs")"
}

step_sleep() {
    parse_args "$@"
    sleep "${P1:-1}" || fail "sleep ${P1:-1} failed"
    result pass "seconds=${P1:-1}"
}

# --- the plan ---
STEP=0; PASSED=0; FAILED=0
OLDIFS=$IFS
IFS=,
for s in $PLAN; do
    IFS=:
    # shellcheck disable=SC2086  # split the step into NAME and ARGs
    set -- $s
    IFS=$OLDIFS
    STEP=$((STEP + 1)); NAME=$1; shift
    fn=step_$(echo "$NAME" | tr - _)
    if ! command -v "$fn" >/dev/null; then
        emit "step=$STEP name=$NAME status=fail error=unknown_step"; rc=1
    else
        ( set +f; "$fn" "$@"; emit "step=$STEP name=$NAME status=fail error=no_result"; exit 1 ); rc=$?
    fi
    if [ "$rc" -eq 0 ]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
    IFS=,
done
IFS=$OLDIFS
emit "done steps=$STEP passed=$PASSED failed=$FAILED uptime=$(now)"
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
