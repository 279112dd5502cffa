#!/usr/bin/env bash
# Make sure Ceph RGW (Debian's radosgw, ceph-mon, ceph-osd) is installed, for scripts/ceph-rgw.sh and
# the S3 tests. Idempotent: does nothing when the tools are there. Installs with apt-get as root
# (about 270 MB, 15-60 s). Without apt or root it prints why and exits 0: the RGW tests then skip
# with their reason, or fail with it under CI=true (tests/support.py: CI must test against the
# real S3 server). A failed install exits 1 under CI, and warns and exits 0 elsewhere.
set -euo pipefail

PACKAGES=(radosgw ceph-mon ceph-osd)
# What scripts/ceph-rgw.sh runs; the three packages bring all of them (ceph-common, ceph-base).
TOOLS=(radosgw ceph-mon ceph-osd ceph ceph-authtool monmaptool radosgw-admin)

missing() {
  local t out=()
  for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || out+=("$t"); done
  echo "${out[*]}"
}

need=$(missing)
if [[ -z $need ]]; then
  echo "ensure-ceph: Ceph RGW present ($(radosgw --version 2>/dev/null | awk '{print $3; exit}'))"
  exit 0
fi
echo "ensure-ceph: missing: $need"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-ceph: apt is unavailable; the Ceph RGW tests will skip, or fail under CI=true" \
       "(install ${PACKAGES[*]} by hand)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "ensure-ceph: not root; the Ceph RGW tests will skip, or fail under CI=true" \
       "(run: sudo apt-get install -y --no-install-recommends ${PACKAGES[*]})"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Wait for another apt/dpkg run rather than failing on its lock.
APT=(apt-get -o DPkg::Lock::Timeout=300 -q)
install() { "${APT[@]}" install -y --no-install-recommends "${PACKAGES[@]}" </dev/null; }

start=$SECONDS
echo "ensure-ceph: apt-get install ${PACKAGES[*]}"
if ! install; then
  echo "ensure-ceph: install failed; apt-get update and retry"
  if ! { "${APT[@]}" update </dev/null && install; }; then
    echo "ensure-ceph: could not install ${PACKAGES[*]}" >&2
    if [[ -n ${CI:-} ]]; then exit 1; fi
    echo "ensure-ceph: the Ceph RGW tests will skip (they fail under CI=true)"
    exit 0
  fi
fi
need=$(missing)
if [[ -n $need ]]; then
  echo "ensure-ceph: installed, but still missing: $need" >&2
  exit 1
fi
echo "ensure-ceph: Ceph RGW installed in $((SECONDS - start)) s"
