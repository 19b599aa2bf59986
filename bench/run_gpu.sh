#!/usr/bin/env bash
# Superseded by bench/gpu/run.py (staged, bounded, no network, JSON under $OUT):
# this wrapper keeps the old entry point working. Usage:  bash bench/run_gpu.sh [--stage 1|2|all]
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu/run.py "$@"
