#!/usr/bin/env bash
# The main job on the embedded default: set up (idempotent, cached), then
# convert the shipped digits model and map the shipped scene (and CaffeNet on
# Caffe's cat.jpg if its weights were fetched). Outputs go to ./fcnify-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/fcnify demo "$@"
