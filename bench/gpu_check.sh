#!/usr/bin/env bash
# The GPU check of issue #18: one table (tokens/s, MFU, wall time, chrF) from tuneline's own
# runs on one GPU. See bench/gpu_check.py. Usage: bash bench/gpu_check.sh [--tiny] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TUNELINE_PROGRESS="${TUNELINE_PROGRESS:-plain}"
exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py "$@"
