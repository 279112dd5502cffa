#!/usr/bin/env bash
# A single-node Ceph cluster (one mon, one in-memory OSD) with radosgw: a real S3 endpoint on loopback.
#
#   scripts/ceph-rgw.sh up DIR PORT    start it; S3 on http://127.0.0.1:PORT, state and logs in DIR
#   scripts/ceph-rgw.sh down DIR       stop it: kill the pids in DIR/pids, and nothing else
#
# `up` writes DIR/pids (ceph-mon, ceph-osd, radosgw: one pid a line, in that order), DIR/endpoint
# (the URL) and creates the S3 user with access/secret key from env AK/SK (default
# testkey/testsecret). Env: MON_PORT (default: a free port, so several clusters can run side by
# side), RGW_HOST (the IPv4 address radosgw listens on, default 127.0.0.1: an emulated host's
# address puts the store on that host's link), MEMSTORE_BYTES (the OSD's RAM budget, default 2 GiB), OWNER_PID (if set, the cluster is
# stopped when that process exits, so a killed test run leaves no daemons behind).
# Every wait is bounded; a failure names the step, prints the tail of its log and stops what
# `up` started. Needs radosgw, ceph-mon, ceph-osd: scripts/ensure-ceph.sh installs them.
# Boots in about 15 s on 2 cores. Adapted from shared/recipes/ceph-rgw-up.sh.
set -euo pipefail

usage() { echo "usage: $0 up DIR PORT | down DIR" >&2; exit 2; }

die() {  # die MESSAGE [LOG]: the error, then the last lines of LOG and of LOG.out (what a daemon
  # printed itself: a fatal check such as the mon's free-space one goes there, not to its log)
  echo "ceph-rgw: error: $1" >&2
  local f
  for f in ${2:+"$2" "$2.out"}; do
    [[ -s $f ]] || continue
    echo "ceph-rgw: last lines of $f:" >&2
    tail -n 30 "$f" | sed 's/^/  | /' >&2
  done
  exit 1
}

# A pid is ours only while its command line names this cluster's ceph.conf: pids in a stale
# DIR/pids may since belong to someone else's process.
ours() {
  [[ $1 =~ ^[0-9]+$ && -r /proc/$1/cmdline ]] &&
    tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- " -c $2/ceph.conf "
}

gone() {  # the process has exited (a zombie counts: it only waits to be reaped)
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  s=${s##*) }
  [[ ${s%% *} == Z ]]
}

stop_pids() {  # stop_pids DIR PID...: TERM, up to 15 s to exit, then KILL
  local d=$1 p live=() left deadline; shift
  for p in "$@"; do ours "$p" "$d" && live+=("$p"); done
  [[ ${#live[@]} -eq 0 ]] && return 0
  kill -TERM "${live[@]}" 2>/dev/null || true
  deadline=$((SECONDS + 15))
  while :; do
    left=()
    for p in "${live[@]}"; do gone "$p" || left+=("$p"); done
    [[ ${#left[@]} -eq 0 ]] && return 0
    ((SECONDS < deadline)) || break
    sleep 0.2
  done
  for p in "${left[@]}"; do ours "$p" "$d" && kill -KILL "$p" 2>/dev/null; done
  return 0
}

stop_all() {  # stop_all DIR PID...: one at a time in reverse start order (radosgw, OSD, mon): an OSD
  # whose mon is gone waits 5 s for it on shutdown.
  local d=$1 i; shift
  local pids=("$@")
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pids "$d" "${pids[i]}"; done
}

down() {
  local d
  d=$(cd "$1" 2>/dev/null && pwd) || { echo "ceph-rgw: no such directory: $1" >&2; exit 1; }
  [[ -f $d/pids ]] || { echo "ceph-rgw: nothing to stop in $d (no pids file)"; return 0; }
  local pids
  mapfile -t pids <"$d/pids"
  stop_all "$d" "${pids[@]}"
  echo "ceph-rgw: stopped ($d)"
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

port_free() {  # nothing listens on ${2:-127.0.0.1}:$1
  "$PY" - "$1" "${2:-127.0.0.1}" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
try:
    s.bind((sys.argv[2], int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
}

# listens PID PORT: 0 if PID owns every socket listening on PORT, 1 if none listens yet, 3 if
# another process does (radosgw that cannot bind its port logs it and keeps running).
listens() {
  "$PY" - "$1" "$2" <<'PY'
import os, sys
pid, port = sys.argv[1], int(sys.argv[2])
inodes = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        f = row.split()
        if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
            inodes.add(f[9])
if not inodes:
    sys.exit(1)
mine = set()
for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        continue
    if link.startswith("socket:["):
        mine.add(link[8:-1])
sys.exit(0 if inodes <= mine else 3)
PY
}

rgw_ready() {  # rgw_ready PID PORT: PID serves HTTP on PORT; sets FATAL if another process holds it
  local rc=0
  listens "$1" "$2" || rc=$?
  ((rc != 3)) || FATAL="another process listens on $RGW_HOST:$2"
  ((rc == 0)) && http_ok "http://$RGW_HOST:$2/"
}

http_ok() {  # any HTTP answer counts: radosgw is serving
  if command -v curl >/dev/null 2>&1; then
    curl -s -o /dev/null --max-time 3 "$1"
  else
    "$PY" - "$1" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=3)
except urllib.error.HTTPError:
    pass
PY
  fi
}

# wait_until DESC TIMEOUT_S LOG PID CMD...: retry CMD every 0.5 s until it succeeds; fail fast if
# PID has exited or CMD has set FATAL (it will never succeed).
wait_until() {
  local desc=$1 timeout_s=$2 log=$3 pid=$4 deadline; shift 4
  deadline=$((SECONDS + timeout_s))
  FATAL=
  until "$@" >/dev/null 2>&1; do
    [[ -z $FATAL ]] || die "$desc: $FATAL" "$log"
    gone "$pid" && die "$desc: the daemon (pid $pid) exited" "$log"
    ((SECONDS < deadline)) || die "$desc: not done after ${timeout_s} s" "$log"
    sleep 0.5
  done
}

step() {  # step DESC TIMEOUT_S LOG CMD...: one bounded command; its output goes to LOG
  local desc=$1 timeout_s=$2 log=$3; shift 3
  timeout "$timeout_s" "$@" >>"$log" 2>&1 || die "$desc failed (exit $?)" "$log"
}

start() {  # start NAME LOG CMD...: run a daemon in the foreground of a background job; what it
  # prints goes to LOG.out (writing it into LOG too, at another offset, would overwrite lines)
  "${@:3}" -f </dev/null >>"$2.out" 2>&1 &
  STARTED+=("$!")
  echo "$!" >>"$D/pids"
}

up() {
  D=$1; PORT=$2
  [[ $PORT =~ ^[0-9]+$ ]] || usage
  local ak=${AK:-testkey} sk=${SK:-testsecret}
  local mem_bytes=${MEMSTORE_BYTES:-$((2 << 30))}
  local t0=$SECONDS tool
  for tool in radosgw ceph-mon ceph-osd ceph ceph-authtool monmaptool radosgw-admin; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/ensure-ceph.sh"
  done
  PY=$(command -v python3 || echo /usr/bin/python3)
  mkdir -p "$D"; D=$(cd "$D" && pwd)
  # Reuse DIR only if it holds nothing but an earlier cluster's files, and that one is stopped.
  local p entry old=()
  [[ -f $D/pids ]] && mapfile -t old <"$D/pids"
  for p in "${old[@]}"; do
    ours "$p" "$D" && die "a cluster is already running in $D (pid $p): run '$0 down $D' first"
  done
  RGW_HOST=${RGW_HOST:-127.0.0.1}
  [[ $RGW_HOST =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "RGW_HOST must be an IPv4 address, got '$RGW_HOST'"
  port_free "$PORT" "$RGW_HOST" || die "port $PORT on $RGW_HOST is in use (or the address is not this host's): choose another"
  local mon_port=${MON_PORT:-$(free_port)}
  [[ $mon_port != "$PORT" ]] || die "MON_PORT and PORT are both $PORT"
  port_free "$mon_port" || die "mon port $mon_port on 127.0.0.1 is in use: set MON_PORT to a free one"
  for entry in "$D"/* "$D"/.[!.]*; do
    [[ -e $entry ]] || continue
    case ${entry##*/} in
      mon | osd0 | rgw | run | log | ceph.conf | pids | endpoint | monmap | *.keyring) ;;
      *) die "$D holds files that are not a cluster's (${entry##*/}): give an empty or new directory" ;;
    esac
  done
  rm -rf "$D"/{mon,osd0,rgw,run,log} "$D"/{ceph.conf,pids,endpoint,monmap,*.keyring}
  mkdir -p "$D"/{mon,osd0,rgw,run,log}; cd "$D"
  : >pids
  STARTED=()
  trap 'rc=$?; if ((rc != 0)); then stop_all "$D" "${STARTED[@]}"; fi' EXIT
  trap 'exit 1' INT TERM HUP  # interrupted: the EXIT trap stops what was started

  local fsid osd_uuid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  cat >ceph.conf <<EOF
[global]
fsid = $fsid
mon_host = v2:127.0.0.1:$mon_port
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $D/ceph.client.admin.keyring
run_dir = $D/run
pid_file = $D/run/\$name.pid
log_file = $D/log/\$name.log
admin_socket = $D/run/\$name.asok
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 1
# The mon refuses to start when its filesystem has under 5 % free (the default), which a large,
# busy disk reaches with gigabytes left; this cluster's mon stores a few MiB (the OSD is in memory).
mon_data_avail_crit = 0
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
ms_bind_ipv6 = false
public_network = 127.0.0.0/8
cluster_network = 127.0.0.0/8
[mon.a]
mon_data = $D/mon
[osd.0]
osd_data = $D/osd0
keyring = $D/osd0/keyring
osd_objectstore = memstore
memstore_device_bytes = $mem_bytes
[client.rgw.s3]
keyring = $D/rgw/keyring
rgw_frontends = beast endpoint=$RGW_HOST:$PORT
rgw_data = $D/rgw
EOF
  local c=(-c "$D/ceph.conf") setup=log/setup.log
  step "ceph-authtool (mon key)" 30 $setup \
    ceph-authtool --create-keyring mon.keyring --gen-key -n mon. --cap mon 'allow *'
  step "ceph-authtool (admin key)" 30 $setup \
    ceph-authtool --create-keyring ceph.client.admin.keyring --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *'
  step "ceph-authtool (import)" 30 $setup \
    ceph-authtool mon.keyring --import-keyring ceph.client.admin.keyring
  step "monmaptool" 30 $setup \
    monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" monmap
  step "ceph-mon --mkfs" 60 log/mon.a.log \
    ceph-mon "${c[@]}" --mkfs -i a --monmap monmap --keyring mon.keyring

  start mon log/mon.a.log ceph-mon "${c[@]}" -i a
  wait_until "ceph-mon on 127.0.0.1:$mon_port" 60 log/mon.a.log "${STARTED[0]}" \
    timeout 5 ceph "${c[@]}" health

  step "ceph osd new" 30 $setup ceph "${c[@]}" osd new "$osd_uuid"
  step "ceph-osd --mkfs" 60 log/osd.0.log \
    ceph-osd "${c[@]}" -i 0 --mkfs --mkkey --osd-uuid "$osd_uuid" --no-mon-config
  step "ceph auth add osd.0" 30 $setup ceph "${c[@]}" auth add osd.0 osd 'allow *' \
    mon 'allow profile osd' mgr 'allow profile osd' -i osd0/keyring
  step "ceph osd crush add" 30 $setup \
    ceph "${c[@]}" osd crush add osd.0 1.0 host=localhost root=default
  start osd log/osd.0.log ceph-osd "${c[@]}" -i 0
  osd_up() { timeout 5 ceph "${c[@]}" osd stat 2>/dev/null | grep -q "1 up"; }
  wait_until "ceph-osd up" 90 log/osd.0.log "${STARTED[1]}" osd_up

  step "ceph auth get-or-create client.rgw.s3" 30 $setup ceph "${c[@]}" auth get-or-create \
    client.rgw.s3 mon 'allow rw' osd 'allow rwx' mgr 'allow rw' -o rgw/keyring
  port_free "$PORT" "$RGW_HOST" || die "port $PORT on $RGW_HOST was taken while the cluster booted"
  start rgw log/client.rgw.s3.log radosgw "${c[@]}" -n client.rgw.s3
  # The first start creates radosgw's pools: the slowest step. Only our radosgw's answer counts.
  wait_until "radosgw on $RGW_HOST:$PORT" 120 log/client.rgw.s3.log "${STARTED[2]}" \
    rgw_ready "${STARTED[2]}" "$PORT"
  step "radosgw-admin user create" 60 $setup radosgw-admin "${c[@]}" user create --uid=test \
    --display-name=test --access-key="$ak" --secret="$sk"

  echo "http://$RGW_HOST:$PORT" >endpoint
  if [[ -n ${OWNER_PID:-} ]]; then
    # Stop the cluster once OWNER_PID is gone; exit by itself once the daemons are gone.
    (
      trap - EXIT
      while kill -0 "$OWNER_PID" 2>/dev/null; do
        any=0; for p in "${STARTED[@]}"; do ours "$p" "$D" && any=1; done
        ((any)) || exit 0
        sleep 2
      done
      stop_all "$D" "${STARTED[@]}"
    ) </dev/null >/dev/null 2>&1 &
    disown
  fi
  echo "ceph-rgw: up in $((SECONDS - t0)) s: S3 at http://$RGW_HOST:$PORT (mon 127.0.0.1:$mon_port," \
       "pids ${STARTED[*]}, dir $D)"
}

case ${1:-} in
  up) [[ $# -eq 3 ]] || usage; up "$2" "$3" ;;
  down) [[ $# -eq 2 ]] || usage; down "$2" ;;
  *) usage ;;
esac
