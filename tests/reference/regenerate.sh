#!/usr/bin/env bash
# Recreate the reference virtualenv (.venv-ref, git-ignored) and regenerate tests/fixtures.
# Usage: bash tests/reference/regenerate.sh [--data-dir DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.venv-ref"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -r "$ROOT/tests/reference/requirements.txt"
"$VENV/bin/python" "$ROOT/tests/reference/make_fixtures.py" "$@"
du -sh "$ROOT/tests/fixtures"
