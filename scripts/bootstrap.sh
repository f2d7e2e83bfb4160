#!/usr/bin/env bash
# Set up (or refresh) the project's virtualenv in .venv from the lock file.
# Needs only python3 (>= 3.11) and access to PyPI. Idempotent and quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "fleetd needs Python >= 3.11; '$PY' is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

UV_VERSION=0.13.9
TOOLS=.cache/tools
if [ ! -x "$TOOLS/bin/uv" ] || [ "$("$TOOLS/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  echo "bootstrap: installing uv $UV_VERSION into $TOOLS" >&2
  "$PY" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy
"$TOOLS/bin/uv" sync --quiet --frozen --python "$PY" "$@"
