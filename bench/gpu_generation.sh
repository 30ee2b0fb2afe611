#!/usr/bin/env bash
# The generation bench on one GPU (issue 18, item 5), for a session lent a device machine
# (same wheels as bench/gpu_check.sh: bash bench/gpu_wheels.sh here, then
#   run(command="bash bench/gpu_generation.sh", carry=[".whl"], timeout_s=560)).
# A 0.5B-class random-init model (Qwen2-0.5B's shapes, bf16, sdpa) samples a group of 8, 64
# and 256 completions of 128 tokens after one 256-token prompt: Forge's engine against
# model.generate, alternated, with tokens/s beside the memory-bandwidth bound (batch x
# bandwidth / weight bytes: each decode step reads every weight once). Under 8 minutes on an
# H100 or H200. Writes env.txt, bench.txt and generation-gpu.json under $OUT (default
# bench/results/gpu-check); commit generation-gpu.json as bench/results/generation-gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh  # $out, and the carried wheels on PYTHONPATH
{
  nvidia-smi
  python3 -c "import sys, torch, transformers; print(sys.version); print('torch', torch.__version__, 'transformers', transformers.__version__); print(torch.cuda.get_device_name())"
} >"$out/env.txt" 2>&1
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || exit 1

timeout $(cap 450) python3 -m bench.generation --model qwen2-0.5b --device cuda --dtype bfloat16 --batches 8 64 256 \
  --repeats 2 --output "$out/generation-gpu.json" >"$out/bench.txt" 2>&1
bench=$?
grep "^batch_" "$out/bench.txt" | python3 -c "
import json, sys
for line in sys.stdin:
    name, _, case = line.partition(' ')
    c = json.loads(case)
    print(name, 'forge', c['forge']['tokens_per_s'], 'tok/s; generate', c['generate']['tokens_per_s'],
          'tok/s; bound', c.get('bandwidth_bound_tokens_per_s'), 'tok/s; forge/generate', c['ratio'])
"
tail -c 1500 "$out/bench.txt"
echo "bench exit $bench"
exit $bench
