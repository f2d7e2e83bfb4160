#!/usr/bin/env bash
# What bench/gateway.py compares fleetd's gateway against, installed once (idempotent):
#   nginx, wrk     (Debian packages): the reverse-proxy baseline and the HTTP load generator;
#   LiteLLM proxy  (PyPI litellm[proxy], pinned) in its own venv, .cache/bench-litellm, made
#                  with the project's pinned uv (.cache/tools/bin/uv, from scripts/bootstrap.sh).
# Only the benchmark needs these; tests and CI do not. The Debian packages are installed only
# on Debian/Ubuntu as root (their services are not started); otherwise the script says what is
# missing and the benchmark reports those targets as not available.
# LiteLLM is pinned, and bumped deliberately: 1.107.0 was reported as a compromised release (it
# is not on the index), and from 1.108.8 on the [proxy] extra needs a separate `litellm-proxy`
# package that the index here does not have (uv cannot resolve it).
set -euo pipefail
cd "$(dirname "$0")/.."

LITELLM_VERSION=1.108.7
LITELLM_VENV=.cache/bench-litellm
PY=${PYTHON:-python3}

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    # nginx's postinst would start a server on port 80: keep services down while installing.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\n# temporary, from fleetd scripts/bench_deps.sh\nexit 101\n' >"$policy"
      chmod 0755 "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    echo "bench_deps: installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bench_deps: ${missing[*]} missing; install them (apt-get install ${missing[*]})" >&2
  fi
fi

[ -x .cache/tools/bin/uv ] || ./scripts/bootstrap.sh
UV=.cache/tools/bin/uv
export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy
if [ "$("$LITELLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null)" != "$LITELLM_VERSION" ]; then
  echo "bench_deps: installing litellm[proxy]==$LITELLM_VERSION into $LITELLM_VENV"
  start=$SECONDS
  # not fatal: the benchmark then reports LiteLLM as not available and measures the rest
  if "$UV" venv --quiet --allow-existing --python "$PY" "$LITELLM_VENV" &&
    "$UV" pip install --quiet --python "$LITELLM_VENV/bin/python" "litellm[proxy]==$LITELLM_VERSION"; then
    echo "bench_deps: litellm installed in $((SECONDS - start)) s"
  else
    echo "bench_deps: could not install litellm[proxy]==$LITELLM_VERSION (see above);" \
      "bench/gateway.py will report LiteLLM as not available" >&2
  fi
fi
echo "bench_deps: nginx $(command -v nginx || echo /usr/sbin/nginx), wrk $(command -v wrk || echo missing), litellm $LITELLM_VENV/bin/litellm"
