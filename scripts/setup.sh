#!/usr/bin/env bash
# Idempotent set-up: Debian build packages, Caffe's source, pycaffe (built once
# and cached in ~/.cache/fcnify), the virtualenv .venv with fcnify installed.
# A second run takes seconds. See scripts/setup/bootstrap.py for the knobs
# (FCNIFY_CAFFE=auto|build|existing, FCNIFY_CUDA=1, FCNIFY_CACHE, FCNIFY_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v python3 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3 python3-venv
fi
exec python3 scripts/setup/bootstrap.py "$@"
