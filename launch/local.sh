#!/usr/bin/env bash
# CPU smoke run on this machine: a local Ray instance, the tiny offline model, guess_number.
#
#   launch/local.sh [key=value ...] [--output-dir DIR]     e.g. launch/local.sh train.max_steps=20
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
unset RAY_ADDRESS  # a local run never joins a cluster by accident
export TOKENIZERS_PARALLELISM=false
exec python -m forge.cli train configs/smoke.yaml "$@"
