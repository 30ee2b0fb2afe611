#!/usr/bin/env bash
# The engine's cache reuse on one GPU (issue 18's engine work; SHARED_START_MIN_TOKENS was set
# from the CPU bench alone), for a session lent a device machine (same wheels as the other
# scripts: bash bench/gpu_wheels.sh here, then
#   run(command="bash bench/gpu_prefix_reuse.sh", carry=[".whl"], timeout_s=300)).
# bench.prefix_reuse at 0.5B (Qwen2-0.5B's shapes, bf16, sdpa): a common start of N tokens run
# once apart against in each row (start-N: where it starts to pay on a GPU), 8 tasks' first
# turns in one call, and episodes arriving one by one. Writes prefix-reuse.txt and
# prefix-reuse-gpu.json under $OUT; commit the JSON as bench/results/prefix-reuse-gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'" || exit 1
timeout $(cap 240) python3 -m bench.prefix_reuse --model qwen2-0.5b --device cuda --dtype bfloat16 --repeats 3 \
  --cases start- one-call arrivals --output "$out/prefix-reuse-gpu.json" >"$out/prefix-reuse.txt" 2>&1
status=$?
tail -1 "$out/prefix-reuse.txt" | python3 -c "
import json, sys
report = json.loads(sys.stdin.read())
for case, result in report.items():
    if isinstance(result, dict):
        print(case, 'prefill', result['prefill_tokens_ratio'], 'time', result['seconds_ratio'])
" || tail -20 "$out/prefix-reuse.txt"
exit $status
