#!/usr/bin/env bash
# The family matrix on a GPU (issue 20, item 7), for a session lent a device machine:
#   here:  bash bench/gpu_wheels.sh        (the device image lacks pydantic; fetches it as wheels)
#   there: run(command="bash bench/gpu_families.sh", carry=[".whl"], timeout_s=400)
# The flex-attention tree path's forward and backward, fp32 and bf16, against separate forwards on
# every family of forge/models/families.py with flex attention (python -m bench.gpu_families).
# Writes gpu-families.json and gpu-families.txt under $OUT (default bench/results/gpu-check);
# commit gpu-families.json as bench/results/gpu-families.json and regenerate the README table's
# flex column from it if it says all_ok.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # $out, and the carried wheels on PYTHONPATH
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || exit 1
timeout $(cap 360) python3 -m bench.gpu_families --device cuda --attention flex \
  --output "$out/gpu-families.json" >"$out/gpu-families.txt" 2>&1
status=$?
grep -v '^{' "$out/gpu-families.txt" | tail -40
echo "gpu_families exit $status"
exit $status
