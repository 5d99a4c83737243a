#!/usr/bin/env bash
# The test command: set up (idempotent, cached), then run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k geometry
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
