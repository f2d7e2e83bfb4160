#!/usr/bin/env bash
# System tools that some tests use, installed from the distribution when we may:
#   promtool         (Debian package `prometheus`): tests/unit/test_metrics.py lints /metrics
#   systemd-analyze  (Debian package `systemd`):    checks the shipped systemd unit
# Idempotent: does nothing when both are on PATH. Installs only on Debian/Ubuntu as root;
# otherwise it prints which tests will be skipped and exits 0 (the suite still runs).
# `prometheus` (Debian 12: 2.42) pulls 12 packages with --no-install-recommends (37 with
# recommends, node-exporter among them): ~22 MB to download, ~316 MB on disk, most of it web-UI
# JavaScript (libjs-moment-timezone alone is ~213 MB); promtool itself is 46 MB.
set -euo pipefail

start=$SECONDS
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)

if [ ${#missing[@]} -eq 0 ]; then
  echo "system_deps: promtool and systemd-analyze are present; nothing to do"
  exit 0
fi

skipped_note() {
  echo "system_deps: not installing ${missing[*]} ($1)." >&2
  echo "system_deps: tests that need promtool or systemd-analyze will be skipped." >&2
  echo "system_deps: to run them: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
}

if [ "$(id -u)" -ne 0 ]; then
  skipped_note "not root"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! grep -qiE '^(ID|ID_LIKE)=.*(debian|ubuntu)' /etc/os-release 2>/dev/null; then
  skipped_note "not a Debian/Ubuntu system"
  exit 0
fi

# The prometheus package ships a service (init.d script and systemd unit); we want only its
# promtool binary. Where no policy-rc.d exists (CI VMs; Docker images usually have one),
# put a temporary one in place so the package's postinst does not start a Prometheus server.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# temporary, from fleetd scripts/system_deps.sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
echo "system_deps: installing ${missing[*]} (apt-get update, then install)"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for tool in promtool systemd-analyze; do
  command -v "$tool" >/dev/null 2>&1 || { echo "system_deps: $tool still missing" >&2; exit 1; }
done
echo "system_deps: installed ${missing[*]} in $((SECONDS - start)) s"
