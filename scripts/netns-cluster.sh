#!/usr/bin/env bash
# An emulated multi-host cluster on one machine: N network namespaces on one switch, links shaped.
#
#   netns-cluster.sh up N RATE PREFIX [both|egress]   create the cluster (default shaping: both)
#   netns-cluster.sh down N PREFIX                    remove it (idempotent)
#   netns-cluster.sh check                            exit 0 if this machine can run `up`
#
# Topology: a star. Namespace PREFIX-sw holds a bridge `br0` (the switch); host i (1 <= i <= N <= 254)
# is namespace PREFIX-i with interface `eth0` at 198.18.0.i/24 and loopback up, cabled by a veth pair
# to switch port `pI` (p1, p2, ...). 198.18.0.0/15 is RFC 2544's benchmarking range: the only
# addresses this script ever assigns, so test traffic can never leave the machine or hit a real host.
#
# Shaping (RATE as tc writes it: 100mbit, 1gbit, 500kbit, 10mbps ...):
#   egress  host i's eth0 sends at most RATE (htb), as a NIC's line rate caps what it sends;
#   both    also switch port pI sends at most RATE towards host i, so host i *receives* at most RATE
#           in total, as a real NIC's inbound line rate does: two senders to one receiver share it.
# The inbound cap sits on the switch port's egress, where a real switched network queues, rather than
# on an IFB device behind host i's ingress (the usual recipe): the same cap with one device and one
# redirect filter fewer per host. Measured at 100mbit, 6 MiB per sender: 1 sender 95-97 Mbit/s,
# 2 senders to one host 95-97 Mbit/s together, the same as with IFB (190+ with egress shaping only).
# Each shaped link queues at most max(128 KiB, RATE x 50 ms) bytes (a byte FIFO, since veth carries
# 64 KiB GSO packets: a packet count would not bound the delay). The kernel here has htb and tbf but
# no netem: rate limits yes, added delay or loss no.
#
# Interface names are fixed and short (eth0, pI, br0 <= 15 chars, Linux's IFNAMSIZ) because every
# interface is created directly inside its namespace: nothing is named in the root namespace, so
# clusters with different prefixes never collide, whatever the prefix length.
#
# `up` refuses (exit 3) when any namespace it would create already exists: run `down` first. A failed
# `up` removes what it had created. `down` ends the processes still inside PREFIX-1..N and PREFIX-sw
# (by pid, from `ip netns pids`: only processes in these namespaces) so the namespaces and their links
# really go, then deletes exactly those namespaces; a missing one is not an error.
#
# Needs root and iproute2 (`ip`, `tc`; Debian package iproute2) and a kernel with network namespaces,
# veth, bridge and htb. Exit codes: 0 done; 1 failed (or `check`: unavailable, reason on stderr);
# 2 usage error; 3 `up` on a prefix that exists.
set -euo pipefail

readonly SUBNET=198.18.0  # RFC 2544. Never any other range.
readonly MAX_HOSTS=254
readonly KILL_WAIT_S=2    # `down`: how long processes get after SIGTERM before SIGKILL

me=$(basename "$0")
die() { echo "$me: $*" >&2; exit 1; }
usage() { echo "usage: $me up N RATE PREFIX [both|egress] | down N PREFIX | check" >&2; exit 2; }
bad() { echo "$me: $*" >&2; usage; }

need_tools() {
  local t
  for t in ip tc; do
    command -v "$t" >/dev/null 2>&1 \
      || die "'$t' not found: install iproute2 (apt-get install -y --no-install-recommends iproute2)"
  done
}
need_root() {
  [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, links and qdiscs are privileged)"
}

check_n() {
  if ! [[ $1 =~ ^[0-9]+$ ]] || (( 10#$1 < 1 || 10#$1 > MAX_HOSTS )); then
    bad "N must be an integer in 1..$MAX_HOSTS (one /24 of $SUBNET.0), got '$1'"
  fi
}
check_prefix() {
  [[ $1 =~ ^[A-Za-z][A-Za-z0-9_.]{0,31}$ ]] \
    || bad "PREFIX must be a letter then up to 31 of [A-Za-z0-9_.], got '$1'"
}
# RATE in bits per second, for the queue size; tc itself parses RATE for the shaping.
rate_bits_per_s() {
  awk -v r="$1" 'BEGIN {
    if (!match(r, /^[0-9]+(\.[0-9]+)?/)) exit 1
    v = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
    m["bit"] = 1; m["kbit"] = 1e3; m["mbit"] = 1e6; m["gbit"] = 1e9; m["tbit"] = 1e12
    m["bps"] = 8; m["kbps"] = 8e3; m["mbps"] = 8e6; m["gbps"] = 8e9; m["tbps"] = 8e12
    if (!(u in m) || v * m[u] < 1000) exit 1  # tc rejects rates that round to 0
    printf "%.0f\n", v * m[u] }'
}

ns_exists() { [[ -e /run/netns/$1 ]] || ip netns list 2>/dev/null | awk '{print $1}' | grep -qxF -- "$1"; }

# shape NS DEV RATE QUEUE_BYTES: DEV sends at most RATE through one htb class and a byte FIFO.
shape() {
  # quantum: one class, so it only sets the dequeue granularity; explicit to silence htb's
  # "quantum is big" warning above ~20 Mbit/s (rate / r2q > 200000 B).
  tc -n "$1" qdisc add dev "$2" root handle 1: htb default 10
  tc -n "$1" class add dev "$2" parent 1: classid 1:10 htb rate "$3" ceil "$3" quantum 65536
  tc -n "$1" qdisc add dev "$2" parent 1:10 handle 10: bfifo limit "$4"
}

# The namespaces of cluster PREFIX with N hosts, switch first.
cluster_namespaces() { local i; echo "$2-sw"; for ((i = 1; i <= $1; i++)); do echo "$2-$i"; done; }

any_alive() { local pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

cmd_down() {  # N PREFIX
  local n=$1 p=$2 ns sig t
  local -a all pids
  mapfile -t all < <(cluster_namespaces "$n" "$p")
  for sig in TERM KILL; do
    pids=()
    for ns in "${all[@]}"; do
      ns_exists "$ns" && mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null)
    done
    (( ${#pids[@]} )) || break
    kill -s "$sig" "${pids[@]}" 2>/dev/null || true
    for ((t = 0; t < KILL_WAIT_S * 10; t++)); do
      any_alive "${pids[@]}" || break
      sleep 0.1
    done
  done
  for ns in "${all[@]}"; do
    ns_exists "$ns" || continue
    ip netns del "$ns" 2>/dev/null || ! ns_exists "$ns" || die "could not delete namespace $ns"
  done
  return 0
}

cmd_up() {  # N RATE PREFIX SHAPING
  local n=$1 rate=$2 p=$3 shaping=$4 i ns sw=$3-sw bits queue_bytes
  bits=$(rate_bits_per_s "$rate") \
    || bad "RATE must be a number (>= 1kbit) and a tc unit (kbit mbit gbit, kbps mbps gbps), got '$rate'"
  queue_bytes=$(( bits / 8 / 20 ))  # 50 ms at RATE ...
  (( queue_bytes >= 131072 )) || queue_bytes=131072  # ... and at least two 64 KiB GSO packets
  for ns in $(cluster_namespaces "$n" "$p"); do
    if ns_exists "$ns"; then
      echo "$me: namespace $ns exists: cluster '$p' is (partly) up; run '$me down $n $p' first" >&2
      exit 3
    fi
  done
  # From here on a failure (or SIGINT/SIGTERM) removes whatever was created.
  trap 'exit 130' INT; trap 'exit 143' TERM
  # shellcheck disable=SC2064  # n and p are expanded now: they are locals, gone when the trap runs
  trap "rc=\$?; if (( rc )); then echo '$me: up failed; removing cluster $p' >&2; cmd_down $n $p || :; fi" \
    EXIT
  ip netns add "$sw"
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  for ((i = 1; i <= n; i++)); do
    ns=$p-$i
    ip netns add "$ns"
    ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n "$sw" link set "p$i" master br0
    ip -n "$sw" link set "p$i" up
    # No IPv6 on the cluster links: keeps them silent (no router/neighbour solicitations) for benchmarks.
    ip netns exec "$ns" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6' 2>/dev/null || true
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    shape "$ns" eth0 "$rate" "$queue_bytes"
    [[ $shaping == both ]] && shape "$sw" "p$i" "$rate" "$queue_bytes"
  done
  trap - EXIT INT TERM
  echo "$me: cluster $p up: $n hosts $SUBNET.1-$n, $rate per link ($shaping)"
}

# check: create and remove a throwaway namespace with a shaped veth pair on a bridge.
cmd_check() {
  need_tools
  need_root
  local probe=fsqcheck$$
  # shellcheck disable=SC2064  # expanded now: probe is a local
  trap "ip netns del $probe 2>/dev/null || true" EXIT
  ip netns add "$probe" 2>/dev/null || die "cannot create network namespaces (ip netns add failed)"
  ip netns exec "$probe" true 2>/dev/null || die "cannot enter network namespaces (ip netns exec failed)"
  ip -n "$probe" link add br0 type bridge 2>/dev/null || die "kernel lacks bridge support"
  ip -n "$probe" link add v0 type veth peer name v1 2>/dev/null || die "kernel lacks veth support"
  ip -n "$probe" link set v0 master br0 2>/dev/null || die "cannot attach a veth to a bridge"
  tc -n "$probe" qdisc add dev v0 root handle 1: htb default 10 2>/dev/null \
    || die "kernel lacks htb (sch_htb)"
  tc -n "$probe" class add dev v0 parent 1: classid 1:10 htb rate 1mbit quantum 1514 2>/dev/null \
    || die "cannot add an htb class"
  tc -n "$probe" qdisc add dev v0 parent 1:10 handle 10: bfifo limit 131072 2>/dev/null \
    || die "kernel lacks the bfifo qdisc"
  echo "$me: ok (root, iproute2 $(ip -V | awk '{print $3}' | tr -d ,), netns, veth, bridge, htb)"
}

[[ $# -ge 1 ]] || usage
case $1 in
  up)
    [[ $# -eq 4 || $# -eq 5 ]] || usage
    check_n "$2"; check_prefix "$4"
    shaping=${5:-both}
    [[ $shaping == both || $shaping == egress ]] || bad "shaping must be 'both' or 'egress', got '$shaping'"
    need_tools; need_root
    cmd_up "$((10#$2))" "$3" "$4" "$shaping" ;;
  down)
    [[ $# -eq 3 ]] || usage
    check_n "$2"; check_prefix "$3"
    need_tools; need_root
    cmd_down "$((10#$2))" "$3" ;;
  check)
    [[ $# -eq 1 ]] || usage
    cmd_check ;;
  *) usage ;;
esac
